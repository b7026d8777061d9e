"""`genattr evaluate --method ...`: attribution methods that score a gallery, run on the
models behind a benchmark's queries and evaluated with the AbC protocol, each beside the
query-blind controls that could explain its number away.

For every customized model: load it, `prepare` the method on its training set (the gallery
plus every exemplar the model was tuned on: gradients into a resumable store, or a Fisher
diagonal and base losses), score each of its queries, and read three query-blind scores next
to the method's (the same score row for every query): the method's own control (smallest
gradient, lowest loss under the model: membership), and the mean of the model's query rows.
Two galleries: AbC's (pre-training images plus the query's own exemplars) and the model's
(plus every exemplar set the model was tuned on: for a multi-concept model, the fair one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from pydantic import ValidationError

from genattr.atomic import check_output
from genattr.attribution import AttributedImage, Attribution, embed
from genattr.customize.loading import load_custom_diffusion
from genattr.customize.pipeline import load_base_pipeline
from genattr.customize.train import read_square
from genattr.data.official import TestCaseFeatures
from genattr.devices import resolve_device
from genattr.errors import GenattrError, validation_reason
from genattr.evaluate import (
    DEFAULT_KS,
    EvaluationResult,
    evaluate_scores,
    expected_random_ap,
    write_results,
)
from genattr.features.embedder import embed_images
from genattr.features.registry import get_backbone
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
    ModelCase,
    bench_resolution,
    encode,
    folder_gallery,
    image_prompt,
    manifest_cases,
    model_key,
    multiconcept_cases,
    pipeline_resolution,
    world_cases,
    world_gallery,
    world_model,
)

logger = logging.getLogger(__name__)

METHODS = ("features", "gradient", "unlearning")
GALLERIES = ("abc", "model")


class ScoringMethod(Protocol):
    """A method that scores a model's training set (gallery, then exemplars) for a query."""

    name: str
    needs_model: bool  # False: `prepare` and `scores` get no pipeline (nothing is loaded)

    def prepare(
        self, pipe: Any, train: Sequence[ImageSource], work: Path | None, progress: bool
    ) -> None:
        """Precompute what every query of this model shares."""

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
    batch: int = 64,
    shard_size: int = 1024,
    progress: bool = False,
) -> EmbeddingStore:
    """Projected gradients of every image of `source` under `pipe`'s model, as an embedding
    store (shards committed as they fill, so a killed run resumes at its last shard); refuses
    a store made under another model, spec or source."""
    key = getattr(pipe, "genattr_model_key", None)
    if key is None:
        raise GenattrError("the pipeline carries no model key; load it through genattr")
    info = BackboneInfo(
        f"gradient/{spec.params}/{spec.output}",
        f"{key}-{hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]}",
        {"spec": spec.model_dump(), "model_key": key},
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
    batch: int = 64
    name: str = "gradient"
    needs_model: bool = True

    def prepare(
        self, pipe: Any, train: Sequence[ImageSource], work: Path | None, progress: bool
    ) -> None:
        """The gallery's gradients from (or into) its store under `work`, memory-mapped; the
        exemplars' in memory; read as one matrix, block by block."""
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        parts: list[np.ndarray] = []
        for k, source in enumerate(train):
            if k == 0 and work is not None:  # the gallery: large, shared by every query
                store = gradient_store(
                    pipe, source, self.spec, work / "gallery", batch=self.batch, progress=progress
                )
                parts += store.vectors.shards
            else:
                parts.append(self._gradients(pipe, source, progress))
        self.train = ShardedVectors(parts, self.spec.proj_dim, np.dtype(np.float32))
        self._gram: torch.Tensor | None = None

    def gram(self) -> torch.Tensor:
        """TRAK's damped Gram matrix of this model's training gradients, built once."""
        if self._gram is None:
            self._gram = damped_gram(self.train)
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
        self, pipe: Any, train: Sequence[ImageSource], work: Path | None, progress: bool
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
            pipe.unet, self.scheduler, self.latents, self.text, q_lat, q_txt, self.fisher,
            self.spec, self.base, self.flipped, progress=progress,
        )  # fmt: skip

    def controls(self) -> dict[str, np.ndarray]:
        return {"lowest loss": -self.base.min(0)}

    def storage_bytes_per_image(self) -> int:
        return 0


# -- feature similarity, on the same queries ------------------------------------------------


@dataclass
class FeatureMethod:
    """Feature similarity (the paper's method), optionally through a tuned head, scored on
    exactly the queries the model-based methods see."""

    backbone: str = "world-cnn"
    head: str | None = None
    name: str = "features"
    needs_model: bool = False

    def prepare(
        self, pipe: Any, train: Sequence[ImageSource], work: Path | None, progress: bool
    ) -> None:
        if not hasattr(self, "_backbone"):
            self._backbone = get_backbone(self.backbone)
            self._heads: MapperPair | None = load_heads(self.head)[0] if self.head else None
            self._cache: dict[str, torch.Tensor] = {}
        real = None if self._heads is None else self._heads.real.cpu().eval()
        feats = []
        for source in train:  # the gallery is the same for every model: embedded once
            key = _fingerprint(source)
            if key not in self._cache:
                self._cache[key] = self._embed(source, real)
            feats.append(self._cache[key])
        self.train = torch.cat(feats)

    def _embed(self, source: ImageSource, head: Any) -> torch.Tensor:
        out = []
        for _, images, _prompts in _batches(source, 256):
            pil = [Image.fromarray(a) for a in images]
            out.append(torch.from_numpy(embed_images(self._backbone, pil, batch_size=64)))
        with torch.no_grad():
            return embed(torch.cat(out), head)

    def scores(self, pipe: Any, queries: ImageSet, progress: bool) -> np.ndarray:
        synth = None if self._heads is None else self._heads.synth.cpu().eval()
        return (self._embed(queries, synth) @ self.train.T).numpy()

    def controls(self) -> dict[str, np.ndarray]:
        return {}

    def storage_bytes_per_image(self) -> int:
        return 4 * int(self.train.shape[1])


# -- evaluation ------------------------------------------------------------------------------


@dataclass
class MethodEvaluation:
    """A method's results on both galleries, its controls', chance and costs."""

    method: str
    results: dict[str, EvaluationResult]
    controls: dict[str, dict[str, EvaluationResult]]
    chance: dict[str, float]
    seconds: dict[str, float]
    storage_bytes_per_image: int
    n_queries: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "results": {g: r.summary() for g, r in self.results.items()},
            "controls": {
                name: {g: r.summary() for g, r in by_gallery.items()}
                for name, by_gallery in self.controls.items()
            },
            "chance": self.chance,
            "seconds": self.seconds,
            "storage_bytes_per_image": self.storage_bytes_per_image,
            "n_queries": self.n_queries,
        }


@dataclass
class _Rows:
    """Score rows, per prompt type, in the combined test case's order."""

    gallery: dict[str, list[np.ndarray]] = field(default_factory=dict)
    exemplars: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, ptype: str, g: np.ndarray, e: np.ndarray) -> None:
        self.gallery.setdefault(ptype, []).append(g)
        self.exemplars.setdefault(ptype, []).append(e)


def _testcase(cases: Sequence[ModelCase], ptypes: list[str]) -> TestCaseFeatures:
    chunks, start = [], 0
    synth_ids: dict[str, list[int]] = {p: [] for p in ptypes}
    g = 0
    for case in cases:
        for concept in case.concepts:
            chunks.append((start, start + len(concept.exemplars)))
            start += len(concept.exemplars)
            for p in ptypes:
                synth_ids[p] += [g] * len(concept.queries.get(p, ()))
            g += 1
    return TestCaseFeatures(
        [],
        chunks,
        torch.zeros(start, 1),
        {},
        synth_ids,
        {p: torch.zeros(len(ids), 1) for p, ids in synth_ids.items()},
    )


def _evaluate(rows: _Rows, tc: TestCaseFeatures, ks: Sequence[int]) -> dict[str, EvaluationResult]:
    ptypes = tc.prompt_types
    gal = np.concatenate([np.concatenate(rows.gallery[p]) for p in ptypes])
    ex = np.concatenate([np.concatenate(rows.exemplars[p]) for p in ptypes])
    finite = np.concatenate([gal.ravel(), ex[np.isfinite(ex)]])
    ex = np.where(np.isfinite(ex), ex, finite.min() - 1.0)  # other models' exemplars: never above
    return {
        "abc": evaluate_scores(gal, ex, tc, ks),
        "model": evaluate_scores(gal, ex, tc, ks, exemplars_as_distractors=True),
    }


def evaluate_method(
    method: ScoringMethod,
    cases: Sequence[ModelCase],
    gallery: ImageSource,
    *,
    work: str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
) -> MethodEvaluation:
    """Run `method` on every model of `cases` and evaluate it, its controls beside it.

    Args:
        method: the scoring method (gradients, unlearning, features...).
        cases: the customized models and their queries.
        gallery: the training images every model shares.
        work: where methods keep what they compute per model (gradient stores, rebuilt
            models); None: a temporary folder.
        ks: the Recall@K cut-offs.
        progress: draw progress bars.
    """
    if not cases:
        raise GenattrError("no models to evaluate")
    ptypes = list(dict.fromkeys(p for c in cases for k in c.concepts for p in k.queries))
    n_ex_total = sum(len(k.exemplars) for c in cases for k in c.concepts)
    method_rows, control_rows = _Rows(), dict[str, _Rows]()
    seconds = {"load": 0.0, "prepare": 0.0, "queries": 0.0}
    offset, n_queries = 0, 0
    for case in cases:
        t0 = time.perf_counter()
        if method.needs_model:  # a feature method never rebuilds or loads a model
            logger.info("model %s: loading", case.id)
        pipe = case.load() if method.needs_model else None
        t1 = time.perf_counter()
        exemplars = case.exemplars()
        folder = None if work is None else Path(work) / method.name / case.id
        method.prepare(pipe, [gallery, exemplars], folder, progress)
        t2 = time.perf_counter()
        per_concept = []
        for concept in case.concepts:
            per_concept.append(
                {p: method.scores(pipe, q, progress) for p, q in concept.queries.items()}
            )
        t3 = time.perf_counter()
        seconds["load"] += t1 - t0
        seconds["prepare"] += t2 - t1
        seconds["queries"] += t3 - t2
        all_rows = np.concatenate([s for d in per_concept for s in d.values()])
        n_queries += len(all_rows)
        blind = {**method.controls(), "mean query": all_rows.mean(0)}
        G = len(gallery)
        for by_type in per_concept:
            for p, s in by_type.items():
                ex = np.full((len(s), n_ex_total), np.nan)
                ex[:, offset : offset + len(exemplars)] = s[:, G:]
                method_rows.add(p, s[:, :G], ex)
                for name, c in blind.items():
                    row = np.repeat(c[None].astype(np.float64), len(s), 0)
                    ex_c = np.full((len(s), n_ex_total), np.nan)
                    ex_c[:, offset : offset + len(exemplars)] = row[:, G:]
                    control_rows.setdefault(name, _Rows()).add(p, row[:, :G], ex_c)
        offset += len(exemplars)
        del pipe
    tc = _testcase(cases, ptypes)
    results = _evaluate(method_rows, tc, ks)
    controls = {name: _evaluate(rows, tc, ks) for name, rows in control_rows.items()}
    chance = _chance(cases, len(gallery))
    seconds["per_query"] = seconds["queries"] / max(n_queries, 1)
    return MethodEvaluation(
        method.name,
        results,
        controls,
        chance,
        seconds,
        method.storage_bytes_per_image(),
        n_queries,
    )


def _chance(cases: Sequence[ModelCase], n_gallery: int) -> dict[str, float]:
    """Expected AP of a random ranking (`expected_random_ap`), averaged over concepts."""
    abc, model = [], []
    for case in cases:
        n_model = sum(len(k.exemplars) for k in case.concepts)
        for k in case.concepts:
            e = len(k.exemplars)
            abc.append(float(expected_random_ap(e, n_gallery + e)))
            model.append(float(expected_random_ap(e, n_gallery + n_model)))
    return {"abc": float(np.mean(abc)), "model": float(np.mean(model))}


def write_method_results(evaluation: MethodEvaluation, out: str | os.PathLike) -> None:
    """results.json and its per-query parquet (the AbC gallery's, as `genattr evaluate`), plus
    the model gallery, the controls, chance and costs in the same JSON."""
    doc = evaluation.to_json()
    write_results(
        evaluation.results["abc"],
        out,
        method=evaluation.method,
        settings=doc["settings"],
        model_gallery=doc["results"]["model"],
        controls=doc["controls"],
        chance=doc["chance"],
        seconds=doc["seconds"],
        storage_bytes_per_image=doc["storage_bytes_per_image"],
        n_queries=doc["n_queries"],
    )
    logger.info("results written to %s", out)


def results_lines(evaluation: MethodEvaluation) -> list[str]:
    """One line per (gallery, score): mAP per prompt type, the method's first, then controls."""
    lines = []
    for g in GALLERIES:
        kernel = evaluation.settings.get("kernel")
        label = evaluation.method + (f" ({kernel})" if evaluation.method == "gradient" else "")
        rows = [(label, evaluation.results[g])]
        rows += [(f"  control: {n}", r[g]) for n, r in evaluation.controls.items()]
        lines.append(f"{g} gallery (chance mAP {evaluation.chance[g]:.4f})")
        for name, r in rows:
            s = r.summary()
            cells = "  ".join(
                f"{p} mAP {v['mAP']:.3f} R@10 {v['recall'].get('10', float('nan')):.3f}"
                for p, v in s.items()
            )
            lines.append(f"  {name:<28} {cells}")
    return lines


def make_method(name: str, **options: Any) -> ScoringMethod:
    """A scoring method by name; `options` are its settings (GradientSpec fields, kernel...)."""
    if name == "gradient":
        kernel = options.pop("kernel", "cosine")
        if kernel not in ("cosine", "trak"):
            raise GenattrError(f"--kernel must be cosine or trak, not {kernel!r}")
        try:
            spec = GradientSpec(**options)
        except ValidationError as e:
            raise GenattrError(f"gradient options: {validation_reason(e)}") from None
        return GradientMethod(spec, cast(Literal["cosine", "trak"], kernel))
    if name == "unlearning":
        try:
            return UnlearningMethod(UnlearningSpec(**options))
        except ValidationError as e:
            raise GenattrError(f"unlearning options: {validation_reason(e)}") from None
    if name == "features":
        return FeatureMethod(**options)
    raise GenattrError(f"--method must be one of {', '.join(METHODS)}, not {name!r}")


def evaluate_benchmark(
    method: str,
    bench: str | os.PathLike,
    out: str | os.PathLike,
    *,
    gallery: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    work: str | os.PathLike | None = None,
    models: Sequence[str] | None = None,
    queries: int | None = None,
    device: str = "cpu",
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
    options: dict[str, Any] | None = None,
) -> MethodEvaluation:
    """`genattr evaluate --method M --bench B`: `B` is `world` (the built-in world's test
    models, rebuilt on demand into `work`), `world-multiconcept` (its multi-concept models:
    read the "model" gallery) or a make-benchmark `manifest.json` with a gallery folder and
    its captions. Writes `out` (results.json) and returns the evaluation."""
    resolve_device(device)
    check_output(out, "file")
    scorer = make_method(method, **dict(options or {}))
    work = Path(work) if work is not None else Path(out).parent / "work"
    source: ImageSource
    if str(bench) in ("world", "world-multiconcept"):
        if device != "cpu":
            raise GenattrError("the built-in world runs on the CPU; drop --device")
        if gallery is not None:
            raise GenattrError("--gallery is the world's own pre-training set; drop it")
        source = world_gallery()
        if str(bench) == "world":
            cases = world_cases(work, models, queries)
        else:
            cases = multiconcept_cases(work, models, queries)
    else:
        if gallery is None or captions is None:
            raise GenattrError("--bench MANIFEST needs --gallery DIR and --captions FILE|TEXT")
        cases = manifest_cases(bench, models, queries, device=device, split="test")
        source = folder_gallery(gallery, captions, bench_resolution(bench))
    evaluation = evaluate_method(scorer, cases, source, work=work, ks=ks, progress=progress)
    evaluation.settings = {
        "bench": str(bench),
        "models": [c.id for c in cases],
        "queries_per_model": queries,
        **{k: v for k, v in (options or {}).items()},
    }
    write_method_results(evaluation, out)
    return evaluation


def _query_set(images: Sequence[str | os.PathLike], prompt: str | None, side: int) -> ImageSet:
    """Query files at the model's resolution, each with `prompt` or the prompt genattr's
    sampler recorded in it."""
    prompts = []
    for p in images:
        text = prompt if prompt is not None else image_prompt(p)
        if text is None:
            raise GenattrError(f"{p}: no prompt recorded in the image; give --prompt")
        prompts.append(text)
    arrays = np.stack([read_square(p, side) for p in images])
    return ImageSet(arrays, prompts, [str(p) for p in images])


def attribute_with_model(
    method: str,
    images: Sequence[str | os.PathLike],
    model: str,
    *,
    base: str | None = None,
    gallery: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    prompt: str | None = None,
    work: str | os.PathLike = "genattr-work",
    top_k: int = 20,
    device: str = "cpu",
    progress: bool = False,
    options: dict[str, Any] | None = None,
) -> list[Attribution]:
    """`genattr attribute --method gradient`: score a training set (`gallery` with its
    captions) for each image under the customized model that made it (`model`: a Custom
    Diffusion folder on `base`, or `world:ID` for a world model with the world's pre-training
    set as default gallery). The precomputation is cached under `work`, per model."""
    resolve_device(device)
    if top_k < 1:
        raise GenattrError(f"--top-k must be at least 1, not {top_k}")
    scorer = make_method(method, **dict(options or {}))
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:  # before any model is loaded or rebuilt
        raise GenattrError(f"{missing[0]}: no such image file")
    source: ImageSource
    if model.startswith("world:"):
        if device != "cpu":
            raise GenattrError("the built-in world runs on the CPU; drop --device")
        pipe = world_model(model.removeprefix("world:"), Path(work))
        source = world_gallery() if gallery is None else folder_gallery(
            gallery, captions or "", pipeline_resolution(pipe)
        )  # fmt: skip
    else:
        if base is None or gallery is None or captions is None:
            raise GenattrError("--model DIR needs --base, --gallery and --captions")
        pipe = load_base_pipeline(base, device)
        load_custom_diffusion(pipe, model)
        pipe.genattr_model_key = model_key(model)
        source = folder_gallery(gallery, captions, pipeline_resolution(pipe))
    queries = _query_set(images, prompt, pipeline_resolution(pipe))
    folder = Path(work) / scorer.name / pipe.genattr_model_key
    scorer.prepare(pipe, [source], folder, progress)
    scores = scorer.scores(pipe, queries, progress)
    paths = getattr(source, "paths", None)
    answers = []
    for q, row in zip(queries.ids, scores, strict=True):
        top = np.argsort(-row, kind="stable")[:top_k]
        results = [
            AttributedImage(
                r + 1,
                source.ids[i],
                str(paths[i]) if paths is not None else source.ids[i],
                float(row[i]),
                None,
            )
            for r, i in enumerate(top)
        ]
        note = f"{scorer.name} scores under {model} (not calibrated: no influence shares)"
        answers.append(Attribution(q, results, None, True, [note]))
    return answers
