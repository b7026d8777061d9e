"""`make-benchmark`: customize and sample every model of a plan, resumably, and write the
benchmark in the authors' JSON layout plus genattr's manifest.

Layout of BENCH (paths in the JSON files start with BENCH's own name, so they resolve from
BENCH's parent folder, as the authors' `dataset/...` paths resolve from their repository):
```
BENCH/exemplar/{id}/{file}                       copies of the exemplars
BENCH/models/{id}/                               Custom Diffusion weights (diffusers format)
BENCH/synth/{prompt_type}/{id}/samples/00000.png images, generation.json beside them
BENCH/state/{id}.json                            written last: the model is complete
BENCH/json/{split}_{name}.json                   the authors' test-case layout, one per split
BENCH/manifest.json                              genattr's manifest (all splits)
```
A model is complete when its state record exists, names the current plan key of the model
and all its files exist; it is then skipped. Anything else of that model is deleted and
rebuilt, so a killed run loses at most the model in progress.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from genattr.atomic import write_text_atomic
from genattr.customize.pipeline import load_base_pipeline
from genattr.customize.plan import ModelSpec, Plan, read_plan
from genattr.customize.sample import generate_images
from genattr.customize.train import Customizer
from genattr.data.benchmark import (
    SPLITS,
    BenchmarkManifest,
    CustomizedModel,
    write_abc_json,
    write_manifest,
)
from genattr.errors import GenattrError

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
ENGINES = ("local", "ray")


@dataclass
class ModelResult:
    id: str
    skipped: bool
    train_seconds: float = 0.0
    sample_seconds: float = 0.0
    images: int = 0

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.sample_seconds


def _rel(bench: Path, p: Path) -> str:
    return str(Path(bench.name) / p.relative_to(bench))


def _state_path(bench: Path, mid: str) -> Path:
    return bench / "state" / f"{mid}.json"


def _model_paths(bench: Path, spec: ModelSpec) -> list[Path]:
    paths = [bench / "exemplar" / spec.id, bench / "models" / spec.id]
    paths += [bench / "synth" / ptype / spec.id for ptype in spec.prompts]
    return paths


def is_complete(bench: Path, spec: ModelSpec, key: str) -> bool:
    """The model's state record names this plan key and every file it lists exists."""
    sp = _state_path(bench, spec.id)
    if not sp.is_file():
        return False
    try:
        state = json.loads(sp.read_text())
    except json.JSONDecodeError:
        return False
    if state.get("key") != key:
        return False
    files = [*state.get("exemplar", []), *(p for v in state.get("synth", {}).values() for p in v)]
    return all((bench.parent / f).is_file() for f in files) and bool(files)


def build_model(
    bench: Path,
    plan: Plan,
    spec: ModelSpec,
    customizer: Any,
) -> ModelResult:
    """Customize one model, sample its prompt sets, record it as complete (last)."""
    sample = spec.sample or plan.sample
    key = spec.key(plan.base, sample)
    if is_complete(bench, spec, key):
        logger.info(f"model {spec.id}: complete, skipped")
        return ModelResult(spec.id, skipped=True)
    _state_path(bench, spec.id).unlink(missing_ok=True)
    for p in _model_paths(bench, spec):
        shutil.rmtree(p, ignore_errors=True)
    ex_dir = bench / "exemplar" / spec.id
    ex_dir.mkdir(parents=True)
    exemplars = []
    for i, src in enumerate(spec.exemplars):
        dst = ex_dir / (
            src.name
            if len({p.name for p in spec.exemplars}) == len(spec.exemplars)
            else f"{i:03d}_{src.name}"
        )
        shutil.copyfile(src, dst)
        exemplars.append(_rel(bench, dst))

    logger.info(
        f"model {spec.id} ({spec.mode}{', ' + spec.category if spec.category else ''}): training"
    )
    stats = customizer.train(
        spec.exemplars,
        spec.mode,
        spec.category,
        spec.train,
        reg_images=spec.reg_images or None,
        reg_captions=spec.reg_captions or None,
        captions=spec.captions or None,
    )
    customizer.save(
        bench / "models" / spec.id,
        extra={"base": plan.base, "model_id": spec.id, "train_seconds": round(stats.seconds, 3)},
    )
    synth: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for ptype, prompts in spec.prompts.items():
        out = bench / "synth" / ptype / spec.id / "samples"
        record = {"model_id": spec.id, "prompt_type": ptype, "base": plan.base}
        paths, _ = generate_images(customizer.pipe, prompts, out, sample, record=record)
        synth[ptype] = [_rel(bench, p) for p in paths]
    sample_seconds = time.perf_counter() - t0
    customizer.reset()
    n_images = sum(len(v) for v in synth.values())
    state = {
        "kind": "genattr.benchmark_model",
        "format_version": STATE_FORMAT_VERSION,
        "key": key,
        "id": spec.id,
        "mode": spec.mode,
        "category": spec.category,
        "split": spec.split,
        "exemplar": exemplars,
        "synth": synth,
        "prompts": spec.prompts,
        "train_prompt": customizer.prompt,
        "model_dir": _rel(bench, bench / "models" / spec.id),
        "train_seconds": round(stats.seconds, 3),
        "train_steps": stats.steps,
        "sample_seconds": round(sample_seconds, 3),
        "images": n_images,
    }
    if spec.captions:
        state["captions"] = spec.captions
    write_text_atomic(_state_path(bench, spec.id), json.dumps(state, indent=1))
    result = ModelResult(spec.id, False, stats.seconds, sample_seconds, n_images)
    logger.info(
        f"model {spec.id}: trained {stats.steps} steps in {stats.seconds:.1f} s "
        f"({stats.steps_per_second:.2f} steps/s), sampled {n_images} images in "
        f"{sample_seconds:.1f} s ({n_images / max(sample_seconds, 1e-9):.2f} images/s), "
        f"{result.seconds:.1f} s in all"
    )
    return result


def assemble(bench: Path, plan: Plan) -> BenchmarkManifest:
    """Manifest and per-split JSON from the state records, in plan order."""
    models = []
    for spec in plan.models:
        state = json.loads(_state_path(bench, spec.id).read_text())
        models.append(
            CustomizedModel(
                id=spec.id,
                exemplars=state["exemplar"],
                synth=state["synth"],
                category=spec.category,
                mode=spec.mode,
                split=spec.split,
                extra={
                    "prompts": state["prompts"],
                    "train_prompt": state["train_prompt"],
                    "model_dir": state["model_dir"],
                    **({"captions": state["captions"]} if "captions" in state else {}),
                },
            )
        )
    manifest = BenchmarkManifest(plan.name, models)
    write_manifest(manifest, bench / "manifest.json")
    for split in SPLITS:
        part = manifest.split(split)
        target = bench / "json" / f"{split}_{plan.name}.json"
        if part.models:
            write_abc_json(part, target)
        else:
            target.unlink(missing_ok=True)
    return manifest


def _local(bench: Path, plan: Plan, device: str, dtype: str) -> list[ModelResult]:
    results, customizer = [], None
    for spec in plan.models:
        if is_complete(bench, spec, spec.key(plan.base, spec.sample or plan.sample)):
            results.append(ModelResult(spec.id, skipped=True))
            logger.info(f"model {spec.id}: complete, skipped")
            continue
        if customizer is None:  # load the base model once, and only if there is work
            customizer = Customizer(load_base_pipeline(plan.base, device, dtype))
        results.append(build_model(bench, plan, spec, customizer))
    return results


_WORKER_CACHE: dict[tuple, Any] = {}


def _ray_task(bench: str, plan_path: str, model_id: str, device: str, dtype: str) -> dict:
    """One Ray task = one model. A worker keeps its loaded base model for its next task."""
    if not logging.getLogger("genattr").handlers:  # a Ray worker: Ray forwards its stderr
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = read_plan(plan_path)
    spec = next(s for s in plan.models if s.id == model_id)
    cache_key = (plan.base, device, dtype)
    if cache_key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        _WORKER_CACHE[cache_key] = Customizer(load_base_pipeline(plan.base, device, dtype))
    result = build_model(Path(bench), plan, spec, _WORKER_CACHE[cache_key])
    return asdict(result)


def ray_session(address: str | None = None) -> Any:
    """The `ray` module, connected (to a local Ray unless `address` names a cluster); a
    one-line error where Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise GenattrError(
            "--engine ray needs Ray: pip install 'genattr[ray]' (or run without --engine ray)"
        ) from None
    if not ray.is_initialized():
        ray.init(address=address)
    return ray


def _ray(
    bench: Path,
    plan_path: Path,
    plan: Plan,
    device: str,
    dtype: str,
    address,
    gpus_per_model: float,
) -> list[ModelResult]:
    ray = ray_session(address)
    task = ray.remote(num_gpus=gpus_per_model)(_ray_task)
    pending = {}
    results: dict[str, ModelResult] = {}
    for spec in plan.models:
        if is_complete(bench, spec, spec.key(plan.base, spec.sample or plan.sample)):
            results[spec.id] = ModelResult(spec.id, skipped=True)
            logger.info(f"model {spec.id}: complete, skipped")
            continue
        ref = task.remote(str(bench), str(plan_path), spec.id, device, dtype)
        pending[ref] = spec.id
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            r = ModelResult(**ray.get(ref))
            results[pending.pop(ref)] = r
            logger.info(f"model {r.id}: done in {r.seconds:.1f} s ({r.images} images)")
    return [results[s.id] for s in plan.models]


def make_benchmark(
    plan_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    engine: str = "local",
    device: str | None = None,
    dtype: str | None = None,
    ray_address: str | None = None,
    gpus_per_model: float | None = None,
) -> tuple[BenchmarkManifest, list[ModelResult]]:
    """Build (or finish) the benchmark of a plan in `out`; returns the manifest and timings.

    Args:
        plan_path: the plan (.yaml or .json; see `genattr.customize.plan`).
        out: the benchmark folder, resumed if it exists.
        engine: local (in this process) or ray (one task per model).
        device, dtype: override the plan's.
        ray_address: a Ray cluster's address (None: a local Ray).
        gpus_per_model: GPUs per Ray task (None: 1, or 0 on the CPU).
    """
    if engine not in ENGINES:
        raise GenattrError(f"--engine must be one of {ENGINES}, not {engine!r}")
    plan_path = Path(plan_path)
    plan = read_plan(plan_path)
    bench = Path(out).resolve()
    created = not bench.exists()
    bench.mkdir(parents=True, exist_ok=True)
    write_text_atomic(bench / "plan.json", json.dumps(plan.source, indent=1, default=str))
    device = device or plan.device
    dtype = dtype or plan.dtype
    t0 = time.perf_counter()
    try:
        if engine == "local":
            results = _local(bench, plan, device, dtype)
        else:
            if gpus_per_model is None:
                gpus_per_model = 0.0 if device == "cpu" else 1.0
            results = _ray(bench, plan_path, plan, device, dtype, ray_address, gpus_per_model)
    except GenattrError:
        # Refused before any model was finished (a base model that does not load, ...):
        # a folder this run made holds nothing worth resuming.
        if created and not any((bench / "state").glob("*.json")):
            shutil.rmtree(bench, ignore_errors=True)
        raise
    manifest = assemble(bench, plan)
    built = [r for r in results if not r.skipped]
    wall = time.perf_counter() - t0
    if built:
        per_model = sum(r.seconds for r in built) / len(built)
        images = sum(r.images for r in built)
        sample_s = sum(r.sample_seconds for r in built)
        logger.info(
            f"{len(built)} model(s) built, {len(results) - len(built)} skipped in "
            f"{wall:.1f} s: {per_model:.1f} s per model, "
            f"{images / max(sample_s, 1e-9):.2f} images/s while sampling"
        )
    else:
        logger.info(f"all {len(results)} model(s) were complete; benchmark files rewritten")
    return manifest, results
