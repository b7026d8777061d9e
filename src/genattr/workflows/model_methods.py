"""The scoring methods that run a customized model (`genattr evaluate/attribute --method`):
one interface (`ScoringMethod`: prepare on a model's training set, score its queries, a
query-blind control of its own) and its adapters for gradients (TRAK / D-TRAK, into a
resumable store), unlearning (AbU) and plain features. Running them over a benchmark or on
images is `genattr.workflows.method_runs`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from pydantic import ValidationError

from genattr.attribution import embed
from genattr.errors import GenattrError, validation_reason
from genattr.features.embedder import embed_images
from genattr.features.registry import get_backbone
from genattr.features.text import clean_prompt, load_text_encoder, text_aware
from genattr.heads.checkpoint import MapperPair, load_heads
from genattr.methods import GradientSpec, gradient_scores, projected_gradients
from genattr.methods.gradient import damped_gram
from genattr.methods.unlearning import (
    UnlearningSpec,
    fisher_diagonal,
    image_losses,
    unlearning_scores,
)
from genattr.progress import progress_bar
from genattr.store import BackboneInfo, EmbeddingStore, ShardedVectors
from genattr.vectors import read_block
from genattr.workflows.model_cases import (
    ImageSet,
    ImageSource,
    encode,
)

logger = logging.getLogger(__name__)

METHODS = ("features", "gradient", "unlearning")


class ScoringMethod(Protocol):
    """A method that scores a model's training set (gallery, then exemplars) for a query."""

    name: str
    needs_model: bool  # False: `prepare` and `scores` get no pipeline (nothing is loaded)

    def prepare(
        self,
        pipe: Any,
        train: Sequence[ImageSource],
        work: Path | None,
        progress: bool,
        *,
        model_key: str | None = None,
    ) -> None:
        """Precompute what every query of this model shares; what is kept for the next run
        goes under `work` (None: nothing is kept), checked against the model's key."""

    def scores(self, pipe: Any, queries: ImageSet, progress: bool) -> np.ndarray:
        """(Q, T) scores against the training set, higher meaning more responsible."""

    def controls(self) -> dict[str, np.ndarray]:
        """Query-blind (T,) scores of the training set, named."""

    def storage_bytes_per_image(self) -> int:
        """What the precomputation keeps per training image."""


def _batches(source: ImageSource, batch: int, start: int = 0):
    for s in range(start, len(source), batch):
        yield s, *source.block(s, min(s + batch, len(source)))


def _fingerprint(source: ImageSource) -> str:
    h = hashlib.sha256()
    for i, p in zip(source.ids, source.prompts, strict=True):
        h.update(f"{i}\t{p}\n".encode())
    return h.hexdigest()[:16]


# -- gradients -----------------------------------------------------------------------------


def gradient_store(
    pipe: Any,
    source: ImageSource,
    spec: GradientSpec,
    out: str | os.PathLike,
    *,
    model_key: str,
    batch: int = 64,
    shard_size: int = 1024,
    progress: bool = False,
) -> EmbeddingStore:
    """Projected gradients of every image of `source` under `pipe`'s model (`model_key`: its
    key, `LoadedModel.key`), as an embedding store (shards committed as they fill, so a killed
    run resumes at its last shard); refuses a store made under another model, spec or source."""
    info = BackboneInfo(
        f"gradient/{spec.params}/{spec.output}",
        f"{model_key}-{hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]}",
        {"spec": spec.model_dump(), "model_key": model_key},
    )
    out = Path(out)
    state = {"source": _fingerprint(source), "count": len(source)}
    if EmbeddingStore.exists(out):
        store = EmbeddingStore.open(out, backbone=info)
        if store.extra.get("gradients", {}).get("source") != state["source"]:
            raise GenattrError(f"{out}: these gradients are of another image set; use a new folder")
    else:
        store = EmbeddingStore.create(out, info, spec.proj_dim, extra={"gradients": state})
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with (
        store.writing(),
        progress_bar("gradients", len(source), done=store.count, enabled=progress) as advance,
    ):
        vecs: list[np.ndarray] = []
        ids: list[str] = []
        for s, images, prompts in _batches(source, batch, store.count):
            latents, text = encode(pipe, images, prompts)
            vecs.append(projected_gradients(pipe.unet, scheduler, latents, text, spec))
            ids += source.ids[s : s + len(images)]
            advance(len(images))
            if len(ids) >= shard_size or s + len(images) >= len(source):
                store.append(np.concatenate(vecs), ids, extra={"gradients": state})
                vecs, ids = [], []
    return store


@dataclass
class GradientMethod:
    """TRAK / D-TRAK: projected gradients of the model's output, compared by cosine or with
    TRAK's kernel correction (`genattr.methods.gradient`)."""

    spec: GradientSpec = field(default_factory=GradientSpec)
    kernel: Literal["cosine", "trak"] = "cosine"
    damping: float = 1e-3  # TRAK's lambda over the mean of its Gram matrix's diagonal
    batch: int = 64
    name: str = "gradient"
    needs_model: bool = True

    def prepare(
        self,
        pipe: Any,
        train: Sequence[ImageSource],
        work: Path | None,
        progress: bool,
        *,
        model_key: str | None = None,
    ) -> None:
        """The gallery's gradients from (or into) its store under `work`, memory-mapped; the
        exemplars' in memory; read as one matrix, block by block."""
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        parts: list[np.ndarray] = []
        for k, source in enumerate(train):
            if k == 0 and work is not None:  # the gallery: large, shared by every query
                if model_key is None:
                    raise GenattrError("kept gradients need the model's key (LoadedModel.key)")
                store = gradient_store(
                    pipe, source, self.spec, work / "gallery", model_key=model_key,
                    batch=self.batch, progress=progress,
                )  # fmt: skip
                parts += store.vectors.shards
            else:
                parts.append(self._gradients(pipe, source, progress))
        self.train = ShardedVectors(parts, self.spec.proj_dim, np.dtype(np.float32))
        self._gram: torch.Tensor | None = None

    def gram(self) -> torch.Tensor:
        """TRAK's damped Gram matrix of this model's training gradients, built once."""
        if self._gram is None:
            self._gram = damped_gram(self.train, self.damping)
        return self._gram

    def _gradients(self, pipe: Any, source: ImageSource, progress: bool) -> np.ndarray:
        out = []
        for _, images, prompts in _batches(source, self.batch):
            latents, text = encode(pipe, images, prompts)
            out.append(
                projected_gradients(
                    pipe.unet, self.scheduler, latents, text, self.spec, progress=progress
                )
            )
        return np.concatenate(out)

    def scores(self, pipe: Any, queries: ImageSet, progress: bool) -> np.ndarray:
        q = self._gradients(pipe, queries, progress)
        gram = self.gram() if self.kernel == "trak" else None
        return gradient_scores(self.train, q, self.kernel, gram=gram)

    def controls(self) -> dict[str, np.ndarray]:
        """Gradient norms and TRAK self-influence phi (Phi^T Phi + lambda I)^-1 phi, read
        block by block (memory: the proj_dim^2 Gram matrix)."""
        cpu, n, block = torch.device("cpu"), len(self.train), 65536
        gram = self.gram()
        norms, influence = np.empty(n), np.empty(n)
        for s in range(0, n, block):
            phi = read_block(self.train, s, s + block, cpu).double()
            norms[s : s + len(phi)] = phi.norm(dim=1).numpy()
            influence[s : s + len(phi)] = (phi * torch.linalg.solve(gram, phi.T).T).sum(1).numpy()
        return {
            "smallest gradient": -norms,
            "self-influence": influence,
            "lowest self-influence": -influence,
        }

    def storage_bytes_per_image(self) -> int:
        return 4 * self.spec.proj_dim


# -- unlearning ------------------------------------------------------------------------------


@dataclass
class UnlearningMethod:
    """AbU: unlearn the query (Fisher-preconditioned ascent), score each training image by its
    loss increase (`genattr.methods.unlearning`). The Fisher diagonal comes from at most
    `fisher_images` training images (evenly spaced); the training set's latents stay in
    memory (a world-sized set; SD-scale galleries need a streamed variant)."""

    spec: UnlearningSpec = field(default_factory=UnlearningSpec)
    fisher_images: int = 256
    batch: int = 64
    name: str = "unlearning"
    needs_model: bool = True

    def prepare(
        self,
        pipe: Any,
        train: Sequence[ImageSource],
        work: Path | None,
        progress: bool,
        *,
        model_key: str | None = None,
    ) -> None:
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        lat, txt, flipped = [], [], []
        for source in train:
            for _, images, prompts in _batches(source, self.batch):
                latents, text = encode(pipe, images, prompts)
                lat.append(latents)
                txt.append(text)
                if self.spec.flip:
                    flipped.append(encode(pipe, images[:, :, ::-1], prompts)[0])
        self.latents, self.text = torch.cat(lat), torch.cat(txt)
        self.flipped = torch.cat(flipped) if flipped else None
        rows = np.linspace(0, len(self.latents) - 1, min(self.fisher_images, len(self.latents)))
        rows = rows.round().astype(int)
        fisher_lat, fisher_txt = self.latents[rows], self.text[rows]
        if self.flipped is not None:  # AbU's Fisher sees the flipped copies too
            fisher_lat = torch.cat([fisher_lat, self.flipped[rows]])
            fisher_txt = torch.cat([fisher_txt, fisher_txt])
        unet = pipe.unet
        self.fisher = fisher_diagonal(
            unet, self.scheduler, fisher_lat, fisher_txt, self.spec, progress=progress
        )
        views = [self.latents] + ([self.flipped] if self.flipped is not None else [])
        self.base = np.stack(
            [image_losses(unet, self.scheduler, v, self.text, self.spec) for v in views]
        )

    def scores(self, pipe: Any, queries: ImageSet, progress: bool) -> np.ndarray:
        q_lat, q_txt = encode(pipe, queries.images, queries.prompts)
        return unlearning_scores(
            pipe.unet, self.scheduler, self.latents, self.text, query_latents=q_lat,
            query_text=q_txt, fisher=self.fisher, spec=self.spec, base_losses=self.base,
            gallery_latents_flipped=self.flipped, progress=progress,
        )  # fmt: skip

    def controls(self) -> dict[str, np.ndarray]:
        return {"lowest loss": -self.base.min(0)}

    def storage_bytes_per_image(self) -> int:
        return 0


# -- feature similarity, on the same queries ------------------------------------------------


@dataclass
class FeatureMethod:
    """Feature similarity (the paper's method), optionally through a tuned head, scored on
    exactly the queries the model-based methods see; with `text_weight` w > 0, text-aware
    (`genattr.features.text.text_aware`: (1 - w) image cosine + w caption-prompt cosine, by
    `text_encoder`; w = 1 reads the text alone)."""

    backbone: str = "world-cnn"
    head: str | None = None
    name: str = "features"
    needs_model: bool = False
    text_weight: float = 0.0
    text_encoder: str = "minilm"

    def prepare(
        self,
        pipe: Any,
        train: Sequence[ImageSource],
        work: Path | None,
        progress: bool,
        *,
        model_key: str | None = None,
    ) -> None:
        if not hasattr(self, "_backbone"):
            self._backbone = get_backbone(self.backbone)
            self._heads: MapperPair | None = load_heads(self.head)[0] if self.head else None
            self._cache: dict[str, torch.Tensor] = {}
            self._text = load_text_encoder(self.text_encoder) if self.text_weight > 0 else None
        real = None if self._heads is None else self._heads.real.cpu().eval()
        feats = []
        for source in train:  # the gallery is the same for every model: embedded once
            key = _fingerprint(source)
            if key not in self._cache:
                self._cache[key] = self._embed(source, real)
            feats.append(self._cache[key])
        self.train = torch.cat(feats)

    def _embed(self, source: ImageSource, head: Any) -> torch.Tensor:
        out, prompts = [], []
        for _, images, texts in _batches(source, 256):
            pil = [Image.fromarray(a) for a in images]
            out.append(torch.from_numpy(embed_images(self._backbone, pil, batch_size=64)))
            prompts += texts
        with torch.no_grad():
            feats = embed(torch.cat(out), head)
        if self._text is None:
            return feats
        words = self._text.encode([clean_prompt(p) for p in prompts], progress=False)
        return torch.from_numpy(text_aware(feats, words, self.text_weight))

    def scores(self, pipe: Any, queries: ImageSet, progress: bool) -> np.ndarray:
        synth = None if self._heads is None else self._heads.synth.cpu().eval()
        return (self._embed(queries, synth) @ self.train.T).numpy()

    def controls(self) -> dict[str, np.ndarray]:
        return {}

    def storage_bytes_per_image(self) -> int:
        return 4 * int(self.train.shape[1])


# -- evaluation ------------------------------------------------------------------------------


def make_method(name: str, **options: Any) -> ScoringMethod:
    """A scoring method by name; `options` are its settings (GradientSpec fields, kernel...)."""
    if name == "gradient":
        kernel = options.pop("kernel", "cosine")
        damping = float(options.pop("damping", 1e-3))
        if kernel not in ("cosine", "trak"):
            raise GenattrError(f"--kernel must be cosine or trak, not {kernel!r}")
        if not (math.isfinite(damping) and damping > 0):
            raise GenattrError(f"damping must be a positive number, not {damping}")
        try:
            spec = GradientSpec(**options)
        except ValidationError as e:
            raise GenattrError(f"gradient options: {validation_reason(e)}") from None
        return GradientMethod(spec, cast(Literal["cosine", "trak"], kernel), damping)
    if name == "unlearning":
        try:
            return UnlearningMethod(UnlearningSpec(**options))
        except ValidationError as e:
            raise GenattrError(f"unlearning options: {validation_reason(e)}") from None
    if name == "features":
        return FeatureMethod(**options)
    raise GenattrError(f"--method must be one of {', '.join(METHODS)}, not {name!r}")
