"""The miniature world's captioned-set test case: the paper's generalization experiment.

The AbC benchmark tunes models on one object or a few images of one artist. The paper's last
claim is that attribution learned there carries over to models tuned on larger sets of
random, unrelated captioned images (MSCOCO in the paper). Here: sets of N random clip-art
images that pre-training never used (the world data's `unused` split) with their captions,
N in `SIZES` (`STAGES`: 8 models for each of 4, 16 and 64, then 4 for 256); every image is
trained with its own caption and no modifier token (`Customizer.train(..., mode="captioned")`,
Custom Diffusion's parameters).

The choice (deterministic from `SEED`): one shuffle of the `unused` images; stage by stage,
every set, then every model's held-out captions, is cut from it in turn, so no image is in
two sets and no held-out caption is an image of any set or repeats one of its set's captions.
Training: `WORLD_TRAIN` with `DRAWS_PER_IMAGE` x N / batch steps (each image drawn as often
whatever N; 80 steps for N = 4, as a single-object model). Sampling: `WORLD_SAMPLE`, one
image per prompt, two prompt types of `PROMPTS` prompts each: `set` (the set's captions,
cycled when N < `PROMPTS`) and `held-out` (captions of other unused images, none in a set:
"captions of the same kind"). Every sample's ground truth is the whole set: the model it
came from was tuned on exactly it.

Built with `genattr make-benchmark` (a plan of captioned entries, resumable), then packed
small into `world_sets{size}.{npz,json}` (samples only, no weights; LZMA inside the npz):

    python -m genattr.world.captioned build WORK [--pack]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genattr.atomic import write_text_atomic
from genattr.customize.driver import make_benchmark
from genattr.data.benchmark import BenchmarkManifest, CustomizedModel, read_manifest
from genattr.errors import GenattrError
from genattr.world.base import base_model_dir
from genattr.world.benchmark import WORLD_SAMPLE, WORLD_TRAIN, model_pngs
from genattr.world.clipart import (
    DEFAULT_DATA_DIR,
    ClipartData,
    load_data,
    read_packed_models,
    save_png,
    write_packed,
)

logger = logging.getLogger(__name__)

SETS_FORMAT_VERSION = 1
SETS_IMAGES = "world_sets{size}.npz"
SETS_META = "world_sets{size}.json"
# The counterfactual study of the 16-image sets (`genattr counterfactual --world-sets 16`),
# packed by experiments/counterfactual_table.py --pack: margins and scores, no weights.
COUNTERFACTUAL_PACK = "world_counterfactual16.npz"
SEED = 23
# Models per set size, in stages cut one after the other from the shuffled pool (each stage:
# its sets, then its models' held-out captions). N = 256 came later, from what the first
# stage left, so the first 24 models stayed as they were built.
STAGES: tuple[dict[int, int], ...] = ({4: 8, 16: 8, 64: 8}, {256: 4})
SIZES = tuple(n for stage in STAGES for n in stage)
DRAWS_PER_IMAGE = 40  # training draws of each image of a set, whatever its size
PROMPTS = 8  # prompts per prompt type, one sample each
POOL = "unused"  # the world data's split pre-training never used


def model_id(size: int, j: int) -> str:
    return f"set{size:03d}-{j}"


def train_steps(size: int) -> int:
    """The training steps that give every image of a set of `size` images `DRAWS_PER_IMAGE`
    draws (80 steps for 4 images), at CustomizeConfig's batch of 2, which WORLD_TRAIN keeps."""
    return DRAWS_PER_IMAGE * size // 2


def choose_sets(
    data: ClipartData,
    stages: Sequence[dict[int, int]] = STAGES,
    seed: int = SEED,
) -> list[dict[str, Any]]:
    """Every model's set: id, size, image indices into the world data (in file-name order),
    their captions and the held-out captions (none equal to one of the set's), cut in turn
    from one seeded shuffle of the unused images, stage by stage."""
    pool = [int(i) for i in np.random.default_rng(seed).permutation(data.indices(POOL))]
    need = sum(k * (n + PROMPTS) for stage in stages for n, k in stage.items())
    if need > len(pool):
        raise GenattrError(f"{len(pool)} unused images, {need} needed")
    rest = iter(pool)
    specs: list[dict[str, Any]] = []
    for stage in stages:
        cut: list[dict[str, Any]] = [
            {"id": model_id(n, j), "size": n, "images": sorted(itertools.islice(rest, n))}
            for n, k in stage.items()
            for j in range(k)
        ]
        for spec in cut:
            captions = data.captions(spec["images"])
            # Captions of other images, never one the set has (titles repeat in clip-art).
            fresh = (i for i in rest if data.records[i]["caption"] not in captions)
            spec["heldout_images"] = list(itertools.islice(fresh, PROMPTS))
            spec["captions"] = captions
            spec["prompts"] = {
                "set": [captions[k % len(captions)] for k in range(PROMPTS)],
                "held-out": data.captions(spec["heldout_images"]),
            }
        specs += cut
    return specs


def write_plan(
    data: ClipartData,
    work: str | os.PathLike,
    specs: list[dict[str, Any]],
    base: str | os.PathLike | None = None,
) -> Path:
    """The sets' PNGs (named by their index in the world data) and `plan.json` in `work`:
    captioned entries, as a Stable Diffusion user would write them for MSCOCO pairs."""
    work = Path(work)
    entries = []
    for spec in specs:
        folder = work / "sets" / spec["id"]
        for i in spec["images"]:
            save_png(data.images[i], folder / f"{i:05d}.png")
        entries.append(
            {
                "id": spec["id"],
                "mode": "captioned",
                "exemplars": f"sets/{spec['id']}/",
                "image_captions": {
                    f"{i:05d}.png": c for i, c in zip(spec["images"], spec["captions"], strict=True)
                },
                "prompts": spec["prompts"],
                "train": {"max_train_steps": train_steps(spec["size"])},
                "split": "test",
            }
        )
    plan = {
        "format_version": 1,
        "name": f"world-sets{data.images.shape[1]}",
        "base": str(Path(base or base_model_dir()).resolve()),
        "device": "cpu",
        "dtype": "float32",
        "train": WORLD_TRAIN,
        "sample": {**WORLD_SAMPLE, "images_per_prompt": 1},
        "models": entries,
    }
    path = work / "plan.json"
    write_text_atomic(path, json.dumps(plan, indent=1) + "\n")
    return path


def build_sets(
    work: str | os.PathLike,
    base: str | os.PathLike | None = None,
    data: ClipartData | None = None,
    models: Sequence[str] | None = None,
    engine: str = "local",
) -> Path:
    """Customize and sample every set (or those named) in `work/bench`, resumably."""
    data = data or load_data()
    specs = choose_sets(data)
    if models is not None:
        unknown = sorted(set(models) - {s["id"] for s in specs})
        if unknown:
            raise GenattrError(f"no captioned-set model named {unknown}")
        specs = [s for s in specs if s["id"] in models]
    plan = write_plan(data, work, specs, base)
    make_benchmark(plan, Path(work) / "bench", engine=engine)
    return Path(work) / "bench"


@dataclass
class CaptionedSets:
    """The packed test case: samples (N, S, S, 3) uint8 and one record per model (id, size,
    image indices, captions, prompts, `synth`: prompt type -> [start, count] into `images`)."""

    images: np.ndarray
    models: list[dict[str, Any]]
    info: dict[str, Any]

    def sizes(self) -> list[int]:
        return sorted({m["size"] for m in self.models})

    def write_images(
        self, data: ClipartData, out: str | os.PathLike
    ) -> tuple[BenchmarkManifest, dict[str, Path]]:
        """PNG files for the sets' images and the samples, and a genattr manifest (absolute
        paths, every model a test model of case `set-N`); returns it and the two folders."""
        out = Path(out).resolve()
        dirs = {k: out / k for k in ("exemplars", "synth")}
        models = []
        for m in self.models:
            exemplars, synth = model_pngs(
                data, self.images, m["id"], exemplars=m["images"], synth=m["synth"], dirs=dirs
            )
            extra = {"prompts": m["prompts"], "captions": m["captions"], "case": case_name(m)}
            models.append(
                CustomizedModel(m["id"], exemplars, synth, None, "captioned", "test", extra)
            )
        return BenchmarkManifest("world-sets", models), dirs


def case_name(model: dict[str, Any]) -> str:
    """The test case of a packed set model: `set-N`, one per set size."""
    return f"set-{model['size']}"


def pack_sets(
    work: str | os.PathLike, out: str | os.PathLike = DEFAULT_DATA_DIR, size: int = 32
) -> Path:
    """Pack every model of `work/bench` (all must be built) into `out`'s npz + json."""
    work = Path(work)
    specs = {s["id"]: s for s in choose_sets(load_data())}
    manifest = read_manifest(work / "bench" / "manifest.json")
    missing = sorted(set(specs) - {m.id for m in manifest.models})
    if missing:
        raise GenattrError(f"{work}: {len(missing)} model(s) not built, e.g. {missing[0]}")
    images: list[np.ndarray] = []
    models = []
    for m in manifest.models:
        spec = specs[m.id]
        synth = {}
        for ptype, paths in m.synth.items():
            synth[ptype] = [len(images), len(paths)]
            for p in paths:
                with Image.open(work / p) as im:
                    images.append(np.asarray(im.convert("RGB")))
        models.append(
            {
                "id": m.id,
                "size": spec["size"],
                "images": spec["images"],
                "captions": spec["captions"],
                "heldout_images": spec["heldout_images"],
                "prompts": spec["prompts"],
                "train_steps": train_steps(spec["size"]),
                "synth": synth,
            }
        )
    meta = {
        "kind": "genattr.world.captioned_sets",
        "format_version": SETS_FORMAT_VERSION,
        "seed": SEED,
        "sizes": list(SIZES),
        "stages": [{str(n): k for n, k in stage.items()} for stage in STAGES],
        "draws_per_image": DRAWS_PER_IMAGE,
        "train": WORLD_TRAIN,
        "sample": {**WORLD_SAMPLE, "images_per_prompt": 1},
        "models": models,
    }
    return write_packed(
        Path(out),
        meta_name=SETS_META.format(size=size),
        img_name=SETS_IMAGES.format(size=size),
        images=images,
        meta=meta,
        size=size,
    )


def load_sets(directory: str | os.PathLike = DEFAULT_DATA_DIR, size: int = 32) -> CaptionedSets:
    """The shipped (or rebuilt) captioned-set test case."""
    d = Path(directory)
    meta, models, images = read_packed_models(
        d / SETS_META.format(size=size),
        d / SETS_IMAGES.format(size=size),
        SETS_FORMAT_VERSION,
        f"{d}: no captioned-set test case; run `python -m genattr.world.captioned build`",
        lambda m: sum(c for _, c in m["synth"].values()),
    )
    return CaptionedSets(images, models, meta)


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m genattr.world.captioned")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (resumably) every captioned-set model")
    b.add_argument("work", type=Path)
    b.add_argument("--pack", action="store_true", help="then pack into the package's data")
    b.add_argument("--models", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_sets(args.work, models=args.models)
    if args.pack:
        print(pack_sets(args.work))


if __name__ == "__main__":
    _main()
