"""Counterfactual studies from files: retrain a customized model on subsets of its training
set, measure every query's margin under each retrained model, and score methods against them.

A study folder (WORK) holds:

    study.json                  the spec and the cases (ids, sizes, recipes); a resumed study
                                must ask for the same
    <case>/images/NNNN.png      the training images a world case retrains on
    <case>/units/<key>.npy      (Q,) float64 margins of one retrained model; <key> is the kept
                                images' bit mask in hex and the training seed (`-r<seed>`)
    <case>/margins.npz          `masks` (M, N) bool, `margins` (R, Q, M), `full` (R, Q)
    <case>/leave-k-out/<key>-q<q>.npz
                                leave-K-out: `margin` (1,) of query q under the model trained
                                without some images (seed 0), `image` its regeneration of q
    <case>/scores/<method>.npy  (Q, N) scores of each method against the training set
    results.json                LDS, the seed ceiling and leave-K-out per method

Each unit is trained from the base model with the case's recipe (`Customizer.train`, the
same call `make-benchmark` makes), its steps scaled to keep the draws per image
(max_train_steps x kept / N), the seed `recipe.seed + r`; only its margins are kept, never
its weights. A margin is minus the query's denoising loss at the spec's fixed (timestep,
noise) pairs, measured as the unlearning attributor measures losses. Seed r = 0 with every
image kept is the case's own model: its samples are the queries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from genattr.atomic import atomic_path, write_text_atomic
from genattr.counterfactual import draw_subsets
from genattr.customize.config import CustomizeConfig
from genattr.customize.pipeline import load_base_pipeline
from genattr.customize.sample import (
    SampleConfig,
    render,
    sample_config_from_dict,
    set_scheduler,
)
from genattr.customize.train import Customizer
from genattr.errors import GenattrError
from genattr.methods.unlearning import UnlearningSpec, image_losses
from genattr.progress import progress_bar
from genattr.workflows.model_cases import ImageSet, encode

logger = logging.getLogger(__name__)

STUDY_KIND = "genattr.counterfactual_study"
STUDY_FORMAT_VERSION = 1


class StudySpec(BaseModel):
    """How a study retrains and measures; a resumed study must ask for the same.

    `subsets` random subsets keeping `alpha` of the images (of each stratum), drawn from
    `subset_seed`; every subset (and the full set) trained with `seeds` training seeds;
    margins measured at `timesteps` timesteps spread evenly over the schedule, each with
    `noises_per_timestep` fixed noises from `measure_seed`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subsets: Annotated[int, Field(ge=2)] = 32
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.5
    seeds: Annotated[int, Field(ge=1)] = 2
    subset_seed: int = 0
    timesteps: Annotated[int, Field(ge=1)] = 32
    noises_per_timestep: Annotated[int, Field(ge=1)] = 2
    measure_seed: int = 0

    def measurement(self, num_train_timesteps: int) -> UnlearningSpec:
        """The fixed (timestep, noise) pairs, as the loss-measuring spec takes them."""
        k = self.timesteps
        ts = [(2 * i + 1) * num_train_timesteps // (2 * k) for i in range(k)]
        return UnlearningSpec(
            timesteps=ts, noises_per_timestep=self.noises_per_timestep, seed=self.measure_seed
        )


@dataclass
class SetCase:
    """One customization set: its training images (files, and in memory with their
    captions), the queries its model made, and the recipe that trained it; with `sample`
    and `query_seeds` (how and from which seed each query was sampled) a retrained model
    can regenerate a query from its own noise."""

    id: str
    train_paths: list[Path]
    train: ImageSet
    queries: ImageSet
    config: CustomizeConfig
    strata: list[int] | None = None
    sample: SampleConfig | None = None
    query_seeds: list[int] | None = None

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "images": len(self.train_paths),
            "queries": len(self.queries),
            "config": self.config.record(),
            "strata": self.strata,
        }


@dataclass(frozen=True)
class Unit:
    """One retrained model: the images it keeps and its training seed index."""

    keep: tuple[bool, ...]
    seed: int

    @property
    def key(self) -> str:
        return f"{np.packbits(np.asarray(self.keep)).tobytes().hex()}-r{self.seed}"


def study_units(case: SetCase, spec: StudySpec) -> list[Unit]:
    """The full set and every subset, each with every training seed, in a fixed order."""
    n = len(case.train_paths)
    masks = draw_subsets(
        n, spec.subsets, alpha=spec.alpha, seed=spec.subset_seed, strata=case.strata
    )
    rows = [np.ones(n, dtype=bool), *masks]
    return [Unit(tuple(bool(b) for b in m), r) for r in range(spec.seeds) for m in rows]


def open_study(work: str | os.PathLike, spec: StudySpec, cases: Sequence[SetCase]) -> Path:
    """Create WORK (or check that the study there asked for the same) and return it."""
    work = Path(work)
    header = {
        "kind": STUDY_KIND,
        "format_version": STUDY_FORMAT_VERSION,
        "spec": spec.model_dump(),
        "cases": [c.record() for c in cases],
    }
    path = work / "study.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(header)):
            raise GenattrError(
                f"{work}: a study with other settings or cases is there; use another folder"
            )
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(header, indent=1) + "\n")
    return work


class Retrainer:
    """One loaded base pipeline, retrained unit after unit (`Customizer` resets it)."""

    def __init__(self, base: str | os.PathLike, device: str = "cpu") -> None:
        self.customizer = Customizer(load_base_pipeline(str(base), device, "float32"))
        self.pipe = self.customizer.pipe
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self._encoded: dict[str, tuple[torch.Tensor, ...]] = {}

    def train(self, case: SetCase, unit: Unit) -> None:
        """Leave the pipeline trained on the unit's images with its seed."""
        kept = [p for p, k in zip(case.train_paths, unit.keep, strict=True) if k]
        captions = [c for c, k in zip(case.train.prompts, unit.keep, strict=True) if k]
        steps = max(1, round(case.config.max_train_steps * len(kept) / len(unit.keep)))
        cfg = dataclasses.replace(
            case.config, seed=case.config.seed + unit.seed, max_train_steps=steps
        )
        self.customizer.train(kept, "captioned", config=cfg, captions=captions)

    def margins(
        self, case: SetCase, spec: StudySpec, rows: Sequence[int] | None = None
    ) -> np.ndarray:
        """Minus each query's denoising loss (those in `rows`, default all) under the
        pipeline as it is now."""
        if case.id not in self._encoded:  # a captioned set trains neither VAE nor text encoder
            self._encoded[case.id] = encode(self.pipe, case.queries.images, case.queries.prompts)
        latents, text = self._encoded[case.id]
        if rows is not None:
            latents, text = latents[list(rows)], text[list(rows)]
        measure = spec.measurement(self.scheduler.config.num_train_timesteps)
        return -image_losses(self.pipe.unet, self.scheduler, latents, text, measure)

    def regenerate(self, case: SetCase, row: int) -> np.ndarray:
        """Query `row` sampled again from its own seed by the pipeline as it is now, (S, S, 3)
        uint8 at the query's size."""
        if case.query_seeds is None:
            raise GenattrError(f"case {case.id} does not record how its queries were sampled")
        return self.sample(case, [case.queries.prompts[row]], [case.query_seeds[row]])[0]

    def sample(self, case: SetCase, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """(n, S, S, 3) uint8: each prompt sampled from its seed by the pipeline as it is now,
        with the case's recorded sampler, at the queries' size (new queries of the model)."""
        if case.sample is None:
            raise GenattrError(f"case {case.id} does not record how its queries were sampled")
        original = self.pipe.scheduler
        set_scheduler(self.pipe, case.sample.scheduler)
        size = case.queries.images.shape[1:3]
        out = []
        try:
            for prompt, seed in zip(prompts, seeds, strict=True):
                (image,) = render(self.pipe, prompt, [seed], case.sample)
                if image.size != size[::-1]:
                    image = image.resize(size[::-1], Image.Resampling.BICUBIC)
                out.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        finally:
            self.pipe.scheduler = original
        return np.stack(out) if out else np.zeros((0, *size, 3), np.uint8)


def unit_path(work: Path, case: SetCase, unit: Unit) -> Path:
    return work / case.id / "units" / f"{unit.key}.npy"


@dataclass(frozen=True)
class Job:
    """One unit to train and what to measure under it: every query's margin (`query` None,
    saved as (Q,) .npy), or one query's margin and its regeneration (saved as .npz)."""

    case: SetCase
    unit: Unit
    path: Path
    query: int | None = None


def study_jobs(work: Path, case: SetCase, units: Sequence[Unit]) -> list[Job]:
    return [Job(case, u, unit_path(work, case, u)) for u in units]


def save_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Engine:
    """Where retraining runs: the device, and in this process (`local`) or on Ray over
    `workers` tasks (None: one per GPU, or per CPU)."""

    device: str = "cpu"
    name: str = "local"
    workers: int | None = None

    def options(self) -> dict[str, Any]:
        return {"device": self.device, "engine": self.name, "workers": self.workers}


def run_units(
    jobs: Sequence[Job],
    *,
    spec: StudySpec,
    base: str | os.PathLike,
    device: str = "cpu",
    shard: tuple[int, int] = (0, 1),
    engine: str = "local",
    workers: int | None = None,
    progress: bool = True,
) -> int:
    """Train and measure every job not done yet (this shard's share: jobs i, i + n, ... of
    the whole list for shard (i, n)); returns how many it ran. The base model is loaded
    only when there is something to train. `engine` ray spreads them over `workers` Ray
    tasks (default: one per GPU, or per CPU on the CPU), each loading the base model once."""
    if engine not in ENGINES:
        raise GenattrError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    index, count = shard
    todo = [j for j in jobs[index::count] if not j.path.is_file()]
    if engine == "ray" and todo:
        return _run_units_ray(todo, spec=spec, base=base, device=device, workers=workers)
    retrainer = Retrainer(base, device) if todo else None
    with progress_bar("retrain", len(todo), enabled=progress) as advance:
        for job in todo:
            if job.path.is_file():  # another shard or run finished it meanwhile
                advance(1)
                continue
            assert retrainer is not None
            retrainer.train(job.case, job.unit)
            if job.query is None:
                save_array(job.path, retrainer.margins(job.case, spec))
            else:
                margin = retrainer.margins(job.case, spec, [job.query])
                image = retrainer.regenerate(job.case, job.query)
                job.path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(job.path) as tmp, open(tmp, "wb") as f:
                    np.savez(f, margin=margin, image=image)
            advance(1)
    return len(todo)


def _units_task(jobs: list[Job], spec: StudySpec, base: str, device: str) -> int:
    """One Ray task: a share of the jobs, in one process with one loaded base model."""
    return run_units(jobs, spec=spec, base=base, device=device, progress=False)


def _run_units_ray(
    todo: list[Job], *, spec: StudySpec, base: str | os.PathLike, device: str, workers: int | None
) -> int:
    from genattr.customize.driver import ray_session

    ray = ray_session()
    gpu = device.startswith("cuda")
    if workers is None:
        workers = int(ray.available_resources().get("GPU" if gpu else "CPU", 1)) or 1
    workers = min(workers, len(todo))
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(_units_task)
    refs = [task.remote(todo[i::workers], spec, str(base), device) for i in range(workers)]
    with progress_bar("retrain (ray)", len(refs), unit="worker") as advance:
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            ray.get(done)  # a worker's failure is raised here
            advance(1)
    return len(todo)


def assemble_margins(work: Path, case: SetCase, spec: StudySpec) -> dict[str, np.ndarray] | None:
    """The case's `margins.npz` (written once every unit is there), or None if some are not."""
    units = study_units(case, spec)
    if not all(unit_path(work, case, u).is_file() for u in units):
        return None
    n, m = len(case.train_paths), spec.subsets
    masks = np.array([u.keep for u in units[1 : m + 1]], dtype=bool)
    by_seed = [units[r * (m + 1) : (r + 1) * (m + 1)] for r in range(spec.seeds)]
    full = np.stack([np.load(unit_path(work, case, s[0])) for s in by_seed])
    margins = np.stack(
        [np.stack([np.load(unit_path(work, case, u)) for u in s[1:]], axis=1) for s in by_seed]
    )
    out = {"masks": masks, "margins": margins, "full": full}
    assert masks.shape == (m, n) and margins.shape == (spec.seeds, len(case.queries), m)
    path = work / case.id / "margins.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, masks=masks, margins=margins, full=full)
    return out


def build_margins(
    cases: Sequence[SetCase],
    *,
    base: str | os.PathLike,
    work: str | os.PathLike,
    spec: StudySpec,
    device: str = "cpu",
    shard: tuple[int, int] = (0, 1),
    engine: str = "local",
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Run (or resume) a study's retraining in WORK; returns the margins of every case whose
    units are all done (with several shards, the last to finish assembles them)."""
    work = open_study(work, spec, cases)
    jobs = [j for c in cases for j in study_jobs(work, c, study_units(c, spec))]
    ran = run_units(
        jobs, spec=spec, base=base, device=device, shard=shard, engine=engine, workers=workers,
        progress=progress,
    )  # fmt: skip
    logger.info(f"{ran} model(s) retrained and measured")
    done = {}
    for case in cases:
        got = assemble_margins(work, case, spec)
        if got is not None:
            done[case.id] = got
    return done


def world_set_cases(
    work: str | os.PathLike, *, size: int = 16, models: int | None = None
) -> list[SetCase]:
    """The world's captioned-set models of `size` images (the first `models` of them) as
    study cases: the recipe they were built with, their images written as PNGs under WORK
    (the same pixels `make-benchmark` trained on), their packed samples as the queries."""
    from genattr.options import options_from_mapping
    from genattr.world.benchmark import WORLD_TRAIN
    from genattr.world.captioned import load_sets, train_steps
    from genattr.world.clipart import load_data, save_png

    data, sets = load_data(), load_sets()
    sample = sample_config_from_dict(sets.info["sample"])
    chosen = [m for m in sets.models if m["size"] == size][:models]
    if not chosen:
        raise GenattrError(f"the world has no captioned sets of {size} images ({sets.sizes()})")
    cases = []
    for m in chosen:
        folder = Path(work) / m["id"] / "images"
        paths = [folder / f"{i:05d}.png" for i in m["images"]]
        for i, p in zip(m["images"], paths, strict=True):
            if not p.is_file():
                save_png(data.images[i], p)
        spans = {ptype: range(a, a + n) for ptype, (a, n) in m["synth"].items()}
        rows = [r for span in spans.values() for r in span]
        prompts = [p for ptype in spans for p in m["prompts"][ptype]]
        ids = [f"{m['id']}/{t}/{k}" for t, span in spans.items() for k in range(len(span))]
        recipe = {**WORLD_TRAIN, "max_train_steps": train_steps(m["size"])}
        cases.append(
            SetCase(
                m["id"],
                paths,
                ImageSet(data.images[m["images"]], list(m["captions"]), [p.name for p in paths]),
                ImageSet(sets.images[rows], prompts, ids),
                options_from_mapping(CustomizeConfig, recipe, "the world's recipe"),
                sample=sample,
                query_seeds=[sample.seed + k for span in spans.values() for k in range(len(span))],
            )
        )
    return cases


def bench_set_cases(
    manifest: str | os.PathLike, models: Sequence[str] | None = None
) -> tuple[str, list[SetCase]]:
    """The captioned models of a `genattr make-benchmark` folder as study cases, with the
    base model they were tuned from: each model's exemplar files and captions, its recorded
    recipe (genattr_customize.json) and every sample it made as the queries, with the
    plan's sampling options and each sample's recorded seed."""
    from genattr.customize.sample import read_model_info
    from genattr.data.benchmark import read_manifest
    from genattr.options import options_from_mapping
    from genattr.workflows.model_cases import image_record, manifest_cases

    manifest = Path(manifest)
    root = manifest.parent.parent
    by_id = {m.id: m for m in read_manifest(manifest).models}
    plan = json.loads((manifest.parent / "plan.json").read_text())
    base, sample = plan["base"], sample_config_from_dict(plan.get("sample"))
    cases = []
    for mc in manifest_cases(manifest, models):
        m, (concept,) = by_id[mc.id], mc.concepts
        if m.mode != "captioned":
            raise GenattrError(f"{manifest}: model {m.id} is {m.mode}; studies take captioned sets")
        info = read_model_info(root / m.extra["model_dir"])
        queries = list(concept.queries.values())
        seeds = [image_record(root / p).get("seed") for paths in m.synth.values() for p in paths]
        known = len(seeds) == sum(len(q) for q in queries) and None not in seeds
        cases.append(
            SetCase(
                m.id,
                [root / p for p in m.exemplars],
                concept.exemplars,
                ImageSet(
                    np.concatenate([q.images for q in queries]),
                    [p for q in queries for p in q.prompts],
                    [i for q in queries for i in q.ids],
                ),
                options_from_mapping(CustomizeConfig, info["config"], f"model {m.id}'s recipe"),
                sample=sample,
                query_seeds=[int(str(x)) for x in seeds] if known else None,
            )
        )
    return base, cases
