"""The miniature world's AbC benchmark: one Custom Diffusion model per held-out exemplar set.

Made with `genattr.customize` (a plan and `make_benchmark`), exactly as a GPU user makes an
AbC benchmark on Stable Diffusion, then packed into the repository: every synthesized image in
one compressed `world_bench{size}.npz` and the models in `world_bench{size}.json` (mode,
category, split, exemplar indices into the world data, prompts, and where each prompt type's
images sit in the array). `WorldBenchmark.write_images` unpacks it into PNG files and a
genattr manifest, so the demo reads it through the same code as any benchmark on disk.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genattr.atomic import atomic_path, write_text_atomic
from genattr.customize.driver import make_benchmark
from genattr.customize.plan import assign_split
from genattr.data.benchmark import BenchmarkManifest, CustomizedModel, read_manifest
from genattr.errors import GenattrError
from genattr.world.base import GUIDANCE
from genattr.world.clipart import (
    DEFAULT_DATA_DIR,
    ClipartData,
    load_data,
    read_packed_models,
    save_png,
)

logger = logging.getLogger(__name__)

BENCH_FORMAT_VERSION = 1
BENCH_IMAGES = "world_bench{size}.npz"
BENCH_META = "world_bench{size}.json"

# The authors' two prompt types per mode, in the world's words (prompt_sets/world-*.json),
# five prompts each: ten prompts x four images per model.
WORLD_PROMPT_SETS = {
    "object": ["world-object-attributes", "world-object-scenes"],
    "style": ["world-style-object", "world-style-scene"],
}
# Most models train the heads, as the authors' 80/10/10, but more test models: the world has
# hundreds of models, not thousands. Unobserved objects are test models only (`TEST_CASES`).
WORLD_SPLIT = {"train": 0.7, "val": 0.1, "test": 0.2}
# The world's test cases, as the paper's: objects of kinds pre-training saw, objects of kinds
# it never saw (its unobserved ImageNet classes), artists' styles.
TEST_CASES = {
    "object": "object-exemplar",
    "unobserved": "unobserved-exemplar",
    "style": "style-exemplar",
}
# Fewer samples where many are not needed, so the shipped benchmark stays small: two per
# prompt for training models (more models help heads more than more samples of one model) and
# for the hundred unobserved test models; four for the other validation and test models.
SPARSE_SAMPLE = {"images_per_prompt": 2}
# Custom Diffusion on a 4M-parameter pixel model: a far higher learning rate than Stable
# Diffusion's 1e-5 (the base was trained at 1e-3; at 5e-4 the samples barely moved, measured),
# fewer steps, no rescale augmentation (at 32 px it only blurs), no prior-preservation images.
WORLD_TRAIN = {
    "resolution": 32,
    "initializer_token": "clipart",
    "learning_rate": 3e-3,
    "max_train_steps": 80,
    "augment": False,
}
# Deterministic DDIM in 10 steps (sampling is most of the benchmark's cost on a CPU) at the
# world's guidance (3, not Custom Diffusion's 6: see GUIDANCE).
WORLD_SAMPLE = {"steps": 10, "eta": 0.0, "guidance_scale": GUIDANCE, "images_per_prompt": 4}


def object_category(group: str) -> str:
    """The object word of an exemplar's curated group ('food/fruit' -> 'fruit'), as it is
    written in the pre-training captions; for unobserved exemplars, of their folder."""
    return group.rsplit("/", 1)[-1]


def test_case(record: dict[str, Any]) -> str:
    """The test case (a key of TEST_CASES) of a held-out world image's set."""
    return {v: k for k, v in TEST_CASES.items()}[record["split"]]


def write_plan(
    data: ClipartData,
    base: str | os.PathLike,
    work: str | os.PathLike,
    *,
    train: dict[str, Any] | None = None,
    sample: dict[str, Any] | None = None,
    models: list[str] | None = None,
) -> Path:
    """Exemplar PNGs (named by their index in the world data) and `plan.json` in `work`.

    Args:
        data: The world data whose held-out exemplar sets are planned.
        base: The base pipeline the plan names (resolved to an absolute path).
        work: The folder for the exemplar PNGs and `plan.json`.
        train: Training options over `WORLD_TRAIN`; none when None.
        sample: Sampling options over `WORLD_SAMPLE`; none when None.
        models: The held-out sets to plan, by id; all of them when None.
    """
    work = Path(work)
    held = data.models()
    chosen = sorted(held) if models is None else models
    unknown = sorted(set(chosen) - set(held))
    if unknown:
        raise GenattrError(f"no held-out exemplar set named {unknown}")
    entries = []
    for mid in chosen:
        folder = work / "exemplars" / mid
        for i in held[mid]:
            save_png(data.images[i], folder / f"{i:05d}.png")
        first = data.records[held[mid][0]]
        case = test_case(first)
        mode = "style" if case == "style" else "object"
        entry: dict[str, Any] = {"id": mid, "mode": mode, "exemplars": f"exemplars/{mid}/"}
        if mode == "object":
            entry["category"] = object_category(first["group"] or first["folder"])
        if case == "unobserved":
            entry["split"] = "test"
        if case == "unobserved" or assign_split(mid, WORLD_SPLIT) == "train":
            entry["sample"] = SPARSE_SAMPLE
        entries.append(entry)
    plan = {
        "format_version": 1,
        "name": f"world{data.images.shape[1]}",
        "base": str(Path(base).resolve()),
        "device": "cpu",
        "dtype": "float32",
        "train": {**WORLD_TRAIN, **(train or {})},
        "sample": {**WORLD_SAMPLE, **(sample or {})},
        "split": WORLD_SPLIT,
        "prompt_sets": WORLD_PROMPT_SETS,
        "models": entries,
    }
    path = work / "plan.json"
    write_text_atomic(path, json.dumps(plan, indent=1) + "\n")
    return path


def build_benchmark(
    base: str | os.PathLike,
    work: str | os.PathLike,
    data: ClipartData | None = None,
    engine: str = "local",
    models: list[str] | None = None,
    *,
    train: dict[str, Any] | None = None,
    sample: dict[str, Any] | None = None,
) -> BenchmarkManifest:
    """Customize and sample every held-out set (resumable: finished models are skipped)."""
    data = data or load_data()
    plan = write_plan(data, base, work, train=train, sample=sample, models=models)
    manifest, _ = make_benchmark(plan, Path(work) / "bench", engine=engine)
    return manifest


def model_pngs(
    data: ClipartData,
    samples: np.ndarray,
    model_id: str,
    *,
    exemplars: list[int],
    synth: dict[str, list[int]],
    dirs: dict[str, Path],
) -> tuple[list[str], dict[str, list[str]]]:
    """A packed model as PNG files: its exemplars (rows of the world data) under
    `dirs["exemplars"]/{id}/`, its samples (prompt type -> [first row, count] of `samples`)
    under `dirs["synth"]/{type}/{id}/`; their paths.

    Args:
        data: The world data (the exemplars' images).
        samples: The packed samples, one row per image.
        model_id: The model's id (its folder name).
        exemplars: The exemplars' rows of the world data.
        synth: Per prompt type, [first row, count] of the model's samples in `samples`.
        dirs: The output folders, with keys 'exemplars' and 'synth'.
    """
    ex = [
        save_png(data.images[i], dirs["exemplars"] / model_id / f"{i:05d}.png") for i in exemplars
    ]
    out = {
        ptype: [
            save_png(samples[at + k], dirs["synth"] / ptype / model_id / f"{k:03d}.png")
            for k in range(count)
        ]
        for ptype, (at, count) in synth.items()
    }
    return ex, out


@dataclass
class WorldBenchmark:
    """The packed benchmark: synthesized images (N, S, S, 3) uint8 and one record per model."""

    images: np.ndarray
    models: list[dict[str, Any]]
    info: dict[str, Any]

    def write_images(
        self, data: ClipartData, out: str | os.PathLike
    ) -> tuple[BenchmarkManifest, dict[str, Path]]:
        """PNG files for the gallery, the exemplars and the synthesized images, and a genattr
        manifest with absolute paths; returns it and the three folders."""
        out = Path(out).resolve()
        dirs = {k: out / k for k in ("pretrain", "exemplars", "synth")}
        for i in data.indices("pretrain"):
            save_png(data.images[i], dirs["pretrain"] / f"{i:05d}.png")
        models = []
        for m in self.models:
            exemplars, synth = model_pngs(
                data, self.images, m["id"], exemplars=m["exemplars"], synth=m["synth"], dirs=dirs
            )
            models.append(
                CustomizedModel(
                    m["id"],
                    exemplars,
                    synth,
                    m.get("category"),
                    m["mode"],
                    m["split"],
                    extra={"prompts": m["prompts"], "case": m.get("case", m["mode"])},
                )
            )
        return BenchmarkManifest(self.info.get("name", "world"), models), dirs


def pack_benchmark(
    work: str | os.PathLike, out: str | os.PathLike = DEFAULT_DATA_DIR, size: int = 32
) -> Path:
    """Pack `work/bench` (made by `build_benchmark`) into `out`'s npz + json."""
    work = Path(work)
    manifest = read_manifest(work / "bench" / "manifest.json")
    plan = json.loads((work / "bench" / "plan.json").read_text())
    images: list[np.ndarray] = []
    models = []
    for m in manifest.models:
        synth = {}
        for ptype, paths in m.synth.items():
            synth[ptype] = [len(images), len(paths)]
            for p in paths:
                with Image.open(work / p) as im:
                    images.append(np.asarray(im.convert("RGB")))
        models.append(
            {
                "id": m.id,
                "mode": m.mode,
                "category": m.category,
                "split": m.split,
                "case": "unobserved" if m.id.startswith("unobserved-") else m.mode,
                "exemplars": [int(Path(p).stem) for p in m.exemplars],
                "prompts": m.extra["prompts"],
                "train_prompt": m.extra["train_prompt"],
                "synth": synth,
            }
        )
    if not images or images[0].shape != (size, size, 3):
        raise GenattrError(f"{work}: expected {size}x{size} synthesized images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / BENCH_IMAGES.format(size=size)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=np.stack(images))
    meta = {
        "kind": "genattr.world.benchmark",
        "format_version": BENCH_FORMAT_VERSION,
        "name": manifest.name,
        "train": plan.get("train"),
        "sample": plan.get("sample"),
        "split": plan.get("split"),
        "prompt_sets": plan.get("prompt_sets"),
        "models": models,
    }
    write_text_atomic(out / BENCH_META.format(size=size), json.dumps(meta, indent=1) + "\n")
    return out


def load_benchmark(
    directory: str | os.PathLike = DEFAULT_DATA_DIR, size: int = 32
) -> WorldBenchmark:
    """The shipped (or rebuilt) world benchmark."""
    d = Path(directory)
    meta, models, images = read_packed_models(
        d / BENCH_META.format(size=size),
        d / BENCH_IMAGES.format(size=size),
        BENCH_FORMAT_VERSION,
        f"{d}: no world benchmark; run `genattr world build`",
        lambda m: sum(c for _, c in m["synth"].values()),
    )
    return WorldBenchmark(images, models, meta)
