"""The customized models behind a benchmark's queries, for methods that need the model itself
(gradient and unlearning attributors): images with their prompts, and a loader per model.

A `ModelCase` is one customized model and the concepts it was tuned on (one in AbC, several
in the multi-concept case), each with its exemplars (under its training prompt) and its
synthesized queries (under the prompts that made them). Cases come from the built-in world
(models rebuilt deterministically on demand, since the world ships samples, not weights) or
from a `genattr make-benchmark` folder (its `manifest.json`, `plan.json` and model folders).
A model loads as a `LoadedModel`: its pipeline and its key (a hash of its files), under which
methods cache what they compute for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from genattr.customize.examples import read_square
from genattr.customize.loading import load_custom_diffusion
from genattr.customize.pipeline import load_base_pipeline, prompt_ids
from genattr.customize.train import read_reg_captions
from genattr.data.benchmark import read_manifest
from genattr.data.sources import folder_images
from genattr.errors import GenattrError
from genattr.world.base import base_model_dir, load_world_base
from genattr.world.benchmark import build_benchmark, load_benchmark
from genattr.world.clipart import load_data
from genattr.world.multiconcept import load_multiconcept, multiconcept_pipeline

logger = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Images (N, S, S, 3) uint8, one prompt each, and their ids; in memory."""

    images: np.ndarray
    prompts: list[str]
    ids: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise GenattrError(f"images must be (N, S, S, 3) uint8, not {self.images.shape}")
        if not len(self.images) == len(self.prompts) == len(self.ids):
            raise GenattrError(
                f"{len(self.images)} images, {len(self.prompts)} prompts, {len(self.ids)} ids"
            )

    def __len__(self) -> int:
        return len(self.images)

    def block(self, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
        return self.images[start:stop], self.prompts[start:stop]

    def take(self, rows: Sequence[int]) -> ImageSet:
        rows = list(rows)
        return ImageSet(
            self.images[rows], [self.prompts[i] for i in rows], [self.ids[i] for i in rows]
        )


class FolderImages:
    """A gallery folder read lazily (listed and named as `genattr extract` lists it), each
    image squared and resized to `resolution` as Custom Diffusion's training does, each with
    its caption."""

    def __init__(self, folder: str | os.PathLike, captions: Sequence[str], resolution: int):
        listed = folder_images(folder)  # what extraction lists in the same folder, same ids
        self.paths = [Path(f) for f in listed.files]
        caps = list(captions)
        if len(caps) == 1:
            caps = caps * len(self.paths)
        if len(caps) != len(self.paths):
            raise GenattrError(
                f"{folder}: {len(self.paths)} images but {len(caps)} captions (one per image in "
                "name order, or one for all)"
            )
        self.prompts, self.resolution = caps, resolution
        self.ids = listed.ids

    def __len__(self) -> int:
        return len(self.paths)

    def block(self, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
        images = [read_square(p, self.resolution) for p in self.paths[start:stop]]
        return np.stack(images), self.prompts[start:stop]


ImageSource = ImageSet | FolderImages


def image_record(path: str | os.PathLike) -> dict[str, Any]:
    """What genattr's sampler wrote into a generated PNG (its `genattr` text chunk: prompt,
    seed, scheduler...); empty for other images."""
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("genattr")
    except (OSError, ValueError) as e:
        raise GenattrError(f"{path}: not a readable image ({e})") from None
    try:
        record = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def image_prompt(path: str | os.PathLike) -> str | None:
    """The prompt genattr's sampler wrote into a generated PNG."""
    return image_record(path).get("prompt")


@dataclass
class Concept:
    """One exemplar set a model was tuned on and the queries it made, by prompt type."""

    id: str
    mode: str
    exemplars: ImageSet
    queries: dict[str, ImageSet]


@dataclass(frozen=True)
class LoadedModel:
    """A customized model's pipeline and its key (`model_key` of its folder): what a method
    computes for this model is cached, and checked, under the key."""

    pipe: Any
    key: str


@dataclass
class ModelCase:
    """One customized model, its concepts, and how to load it (on demand)."""

    id: str
    concepts: list[Concept]
    load: Callable[[], LoadedModel] = field(repr=False)
    case: str = "object"

    def exemplars(self) -> ImageSet:
        """All its concepts' exemplars, concept by concept."""
        sets = [c.exemplars for c in self.concepts]
        return ImageSet(
            np.concatenate([s.images for s in sets]),
            [p for s in sets for p in s.prompts],
            [i for s in sets for i in s.ids],
        )


def select_queries(queries: dict[str, ImageSet], per_model: int | None) -> dict[str, ImageSet]:
    """At most `per_model` queries of a model, shared evenly over its prompt types and spread
    evenly over each type's images (so every prompt is represented), the same for every method."""
    if per_model is None:
        return queries
    if per_model < 1:
        raise GenattrError(f"--queries must be at least 1, not {per_model}")
    n_types = len(queries)
    out = {}
    for k, (ptype, q) in enumerate(queries.items()):
        n = per_model // n_types + (1 if k < per_model % n_types else 0)
        n = min(n, len(q))
        if n:
            out[ptype] = q.take(np.linspace(0, len(q) - 1, n).round().astype(int).tolist())
    return out


def model_key(model_dir: str | os.PathLike) -> str:
    """A short hash of a customized model's files (weights, token embeddings, its record):
    cached gradients are valid for this model only."""
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def custom_model(pipe: Any, folder: str | os.PathLike) -> LoadedModel:
    """`pipe` (the base) with the Custom Diffusion model of `folder` installed, keyed by the
    folder's files."""
    load_custom_diffusion(pipe, folder)
    return LoadedModel(pipe, model_key(folder))


# -- the built-in world ------------------------------------------------------------------


def world_gallery() -> ImageSet:
    """The world's pre-training images with their captions (the AbC gallery's distractors)."""
    data = load_data()
    pre = data.indices("pretrain")
    return ImageSet(data.images[pre], data.captions(pre), [f"{i:05d}" for i in pre])


def world_model(model_id: str, work: Path) -> LoadedModel:
    """A world benchmark model, rebuilt with the benchmark's own code and settings into
    `work` the first time (deterministic: its samples are the shipped ones), loaded from there
    afterwards."""
    bench = work / "world-models"
    if model_id not in {m["id"] for m in load_benchmark().models}:
        raise GenattrError(f"no world model named {model_id!r}")
    build_benchmark(base_model_dir(), bench, models=[model_id])
    return custom_model(load_world_base(), bench / "bench" / "models" / model_id)


def world_cases(
    work: str | os.PathLike,
    models: Sequence[str] | None = None,
    queries: int | None = None,
    split: str = "test",
) -> list[ModelCase]:
    """The world benchmark's models of `split` (or those named), one concept each; each loads
    by rebuilding the model with the benchmark's own code into `work` (once; 20-30 s)."""
    data, bench = load_data(), load_benchmark()
    by_id = {m["id"]: m for m in bench.models}
    chosen = list(models) if models else [m["id"] for m in bench.models if m["split"] == split]
    unknown = [m for m in chosen if m not in by_id]
    if unknown:
        raise GenattrError(f"no world model named {unknown}")
    cases = []
    for mid in chosen:
        m = by_id[mid]
        concept = _packed_concept(mid, m, data.images, bench.images, queries)
        load = partial(world_model, mid, Path(work))
        cases.append(ModelCase(mid, [concept], load, m.get("case", m["mode"])))
    return cases


def _packed_concept(
    cid: str,
    record: dict[str, Any],
    world_images: np.ndarray,
    synth_images: np.ndarray,
    queries: int | None,
) -> Concept:
    """A concept from a packed world record: exemplars (indices into the world data) under
    its training prompt; samples (`synth`: prompt type -> [start, count]) under the prompt
    that made each, images_per_prompt consecutive images per prompt."""
    ex = list(record["exemplars"])
    exemplars = ImageSet(
        world_images[ex], [record["train_prompt"]] * len(ex), [f"{cid}/{i:05d}" for i in ex]
    )
    qs = {}
    for ptype, (start, count) in record["synth"].items():
        prompts = record["prompts"][ptype]
        per = count // len(prompts)
        qs[ptype] = ImageSet(
            synth_images[start : start + count],
            [prompts[j // per] for j in range(count)],
            [f"{cid}/{ptype}/{j:03d}" for j in range(count)],
        )
    return Concept(cid, record["mode"], exemplars, select_queries(qs, queries))


def multiconcept_model(model_id: str, work: Path) -> LoadedModel:
    """A multi-concept world model, rebuilt into `work` the first time."""
    pipe = multiconcept_pipeline(model_id, work / "multiconcept")
    return LoadedModel(pipe, model_key(work / "multiconcept" / "models" / model_id))


def multiconcept_cases(
    work: str | os.PathLike, models: Sequence[str] | None = None, queries: int | None = None
) -> list[ModelCase]:
    """The world's multi-concept models (`genattr.world.multiconcept`), each with its K
    concepts; `queries` per concept. Each loads by rebuilding the model into `work` (once)."""
    data, bench = load_data(), load_multiconcept()
    by_id = {m["id"]: m for m in bench.models}
    chosen = list(models) if models else list(by_id)
    unknown = [m for m in chosen if m not in by_id]
    if unknown:
        raise GenattrError(f"no multi-concept world model named {unknown}")
    cases = []
    for mid in chosen:
        m = by_id[mid]
        concepts = [
            _packed_concept(f"{mid}/{c['test_model']}", c, data.images, bench.images, queries)
            for c in m["concepts"]
        ]
        load = partial(multiconcept_model, mid, Path(work))
        cases.append(ModelCase(mid, concepts, load, "multi"))
    return cases


# -- a make-benchmark folder ---------------------------------------------------------------


def _read_images(paths: Sequence[Path], resolution: int) -> np.ndarray:
    return np.stack([read_square(p, resolution) for p in paths])


def manifest_cases(
    manifest: str | os.PathLike,
    models: Sequence[str] | None = None,
    queries: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    *,
    split: str | None = None,
) -> list[ModelCase]:
    """The models of a `genattr make-benchmark` folder: its manifest names each model's folder,
    its plan the base; each query's prompt is read from the PNG genattr wrote it with."""
    manifest = Path(manifest)
    bench = manifest.parent
    root = bench.parent  # the manifest's paths start with the benchmark folder's name
    plan_path = bench / "plan.json"
    if not plan_path.is_file():
        raise GenattrError(
            f"{bench}: no plan.json; methods that load models need a folder made "
            "by `genattr make-benchmark`"
        )
    plan = json.loads(plan_path.read_text())
    base = plan["base"]
    resolution = int(plan.get("train", {}).get("resolution", 512))
    man = read_manifest(manifest)
    by_id = {m.id: m for m in man.models}
    chosen = list(models) if models else [m.id for m in man.models if split in (None, m.split)]
    unknown = [m for m in chosen if m not in by_id]
    if unknown:
        raise GenattrError(f"{manifest}: no model named {unknown}")
    cases = []
    for mid in chosen:
        m = by_id[mid]
        model_dir = m.extra.get("model_dir")
        if not model_dir:
            raise GenattrError(f"{manifest}: model {mid} names no model folder")
        ex_paths = [root / p for p in m.exemplars]
        # Each exemplar with the prompt it was trained with: a captioned set's own captions.
        train_prompts = m.extra.get("captions") or [m.extra.get("train_prompt", "")] * len(ex_paths)
        exemplars = ImageSet(
            _read_images(ex_paths, resolution),
            list(train_prompts),
            [f"{mid}/{p.name}" for p in ex_paths],
        )
        qs = {}
        for ptype, paths in m.synth.items():
            files = [root / p for p in paths]
            prompts = [image_prompt(p) for p in files]
            missing = [str(f) for f, p in zip(files, prompts, strict=True) if p is None]
            if missing:
                raise GenattrError(f"{missing[0]}: no prompt recorded in the image")
            qs[ptype] = ImageSet(
                _read_images(files, resolution),
                [str(p) for p in prompts],
                [f"{mid}/{ptype}/{f.name}" for f in files],
            )

        def load(folder: Path = root / model_dir) -> LoadedModel:
            return custom_model(load_base_pipeline(base, device, dtype), folder)

        concept = Concept(mid, m.mode, exemplars, select_queries(qs, queries))
        cases.append(ModelCase(mid, [concept], load, m.mode))
    return cases


def bench_resolution(manifest: str | os.PathLike) -> int:
    """The training resolution a make-benchmark folder's plan used (512 if it names none)."""
    plan = Path(manifest).parent / "plan.json"
    if not plan.is_file():
        raise GenattrError(f"{Path(manifest).parent}: no plan.json")
    return int(json.loads(plan.read_text()).get("train", {}).get("resolution", 512))


def folder_gallery(
    folder: str | os.PathLike, captions: str | os.PathLike, resolution: int
) -> FolderImages:
    """A gallery folder with its captions: a text file (one per line, name order) or one
    caption for all."""
    return FolderImages(folder, read_reg_captions(captions), resolution)


def pipeline_resolution(pipe: Any) -> int:
    """The image side a pipeline's UNet was built for."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def encode(pipe: Any, images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Latents (the VAE mean times its scaling factor) and text hidden states of a batch."""
    device = pipe.unet.device
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = x.to(device, torch.float32) / 127.5 - 1
    ids = prompt_ids(pipe.tokenizer, prompts).to(device)
    with torch.no_grad():
        latents = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean
        latents = latents.float() * pipe.vae.config.scaling_factor
        text = pipe.text_encoder(ids)[0].float()
    return latents, text
