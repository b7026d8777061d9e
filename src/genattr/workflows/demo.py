"""`genattr demo`: the whole method on the miniature world, on a laptop CPU, in minutes.

The world ships with the package: clip-art training images, a base text-to-image model trained
here, and its AbC benchmark (customized models' samples whose exemplars are known). The demo
unpacks it into PNG files and runs, stage by stage, the same public functions a user runs on
their own data: extract features for several backbones, train a head per backbone on the
train models, calibrate it on the val models, evaluate raw features and head on the test
models and on the captioned-set models (the paper's generalization experiment: does a head
trained on single exemplars help on models tuned on N random captioned images?), attribute a
few test queries drawn at random (`genattr.workflows.demo_queries`: a fixed seed,
`QUERY_SEED`), sample the base model, and write `report.html`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genattr.calibrate import Calibrator
from genattr.data.benchmark import BenchmarkManifest, write_manifest
from genattr.errors import GenattrError
from genattr.evaluate import EvaluationResult, evaluate_protocol, write_results
from genattr.features.extract import extract
from genattr.heads.checkpoint import load_heads
from genattr.heads.networks import HEADS
from genattr.heads.train import TrainConfig, TrainResult
from genattr.options import options_from_mapping
from genattr.report.demo_report import write_demo_report
from genattr.store import EmbeddingStore
from genattr.store.join import testcase_from_stores
from genattr.workflows.calibrate import calibrate_from_stores
from genattr.workflows.counterfactual_scores import (
    exemplar_results,
    lds_per_query,
    lds_results,
    load_packed_outcomes,
)
from genattr.workflows.demo_queries import CASES, ShownQuery, attribute_queries, shown_summary
from genattr.workflows.train_head import train_heads_from_stores
from genattr.world.base import (
    TRAINING_NAME,
    base_model_dir,
    describe_training,
    image_grid,
    load_world_base,
    sample,
)
from genattr.world.benchmark import WorldBenchmark, load_benchmark
from genattr.world.captioned import COUNTERFACTUAL_PACK, CaptionedSets, load_sets
from genattr.world.clipart import DEFAULT_DATA_DIR, ClipartData, load_data

logger = logging.getLogger(__name__)

# Raw pixels (no learning) and the world's own learned feature space. `--features
# efficientnet-lite0-96` (ImageNet) and `efficientnet-lite0-gram` (a style descriptor) add
# more: with the 400-model benchmark each would take the demo past five minutes on two cores.
DEMO_BACKBONES = ("pixel", "world-cnn")
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
TABLE_KS = (5, 10, 100)
PARTS = ("pretrain", "exemplars", "synth")
SET_PARTS = ("set-exemplars", "set-synth")  # the captioned sets' images and samples
# Head training settings per head kind, chosen on the val models' mAP with world-cnn features
# (experiments/world_heads.py; BENCHMARKS.md "Heads that learn attribution, not membership"):
# a full linear map learns most at a small step, a per-channel scale needs a large one.
HEAD_SETTINGS: dict[str, dict[str, Any]] = {
    "linear": {"temperature": 0.1, "lr": 2e-4, "batch_size": 256},
    "channel": {"temperature": 0.03, "lr": 1e-2},
    "mlp": {"temperature": 0.03, "lr": 1e-3},
}
# Every training exemplar a negative, and the best epoch chosen on the stricter gallery: a
# head trained with only the batch's exemplars as held-out negatives learned to tell held-out
# images from pre-training ones and lost to raw features on the stricter gallery (measured).
HONEST_HEADS: dict[str, Any] = {
    "exemplar_negatives": "all",
    "strict_validation": True,
    "patience": 3,
}


@dataclass
class BackboneOutcome:
    """Everything the report shows for one feature space."""

    name: str
    raw: EvaluationResult
    head: EvaluationResult
    history: list[dict]
    best_epoch: int
    calibration: dict
    reliability_plot: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    head_kind: str = "linear"
    controls: dict[str, EvaluationResult] = field(default_factory=dict)  # "raw, stricter gallery"
    # The captioned sets, one test case per set size: "raw", "head" and their controls.
    sets: dict[str, EvaluationResult] = field(default_factory=dict)
    # The gallery of the val mAP that chose the head's epoch ("stricter gallery": HONEST_HEADS).
    val_gallery: str = "AbC protocol"

    def mean_map(self, which: str) -> float:
        res = self.raw if which == "raw" else self.head
        return float(np.mean([v["mAP"] for v in res.summary().values()]))

    def results(
        self, part: str = "abc"
    ) -> tuple[EvaluationResult, EvaluationResult, dict[str, EvaluationResult]]:
        """Raw, head and controls of the AbC test cases ("abc") or of the captioned sets."""
        if part == "abc":
            return self.raw, self.head, self.controls
        controls = {k: r for k, r in self.sets.items() if ", " in k}
        return self.sets["raw"], self.sets["head"], controls


@dataclass
class DemoResult:
    out: Path
    report: Path
    outcomes: dict[str, BackboneOutcome]
    best: str
    seconds: dict[str, float]
    shown: list[ShownQuery] = field(default_factory=list)


def run_demo(
    out: str | os.PathLike = "demo-out",
    backbones: Sequence[str] = DEMO_BACKBONES,
    head: str = "linear",
    epochs: int = 30,
    n_queries: int = 6,
    *,
    progress: bool = True,
) -> DemoResult:
    """Run every stage into `out` (reusing finished stores) and write `out/report.html`.

    The head is the authors' linear one by default, trained at the `HEAD_SETTINGS` chosen on
    the val models and the `HONEST_HEADS` rules: on the 226 training models it gains
    1.3-1.6x over raw world-cnn features on the object test cases, on the stricter gallery
    too, and 1.1x on styles (BENCHMARKS.md)."""
    if head not in HEADS:
        raise GenattrError(f"unknown head {head!r}; choose from {sorted(HEADS)}")
    out = Path(out).resolve()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    with _timed(seconds, "unpack"):
        world = _unpack_world(out)
    world.log_sizes()

    outcomes: dict[str, BackboneOutcome] = {}
    for name in backbones:
        outcomes[name] = _run_backbone(name, out, world, head, epochs, progress)
        seconds.update({f"{name}: {k}": v for k, v in outcomes[name].seconds.items()})

    best = max(outcomes, key=lambda n: outcomes[n].mean_map("head"))
    with _timed(seconds, "attribute"):
        logger.info(f"attributing {n_queries} test queries with {best} + head")
        shown = attribute_queries(out, best, world.test, n_queries)
    shown_stats = shown_summary(shown, outcomes[best])
    with _timed(seconds, "base samples"):
        logger.info("sampling the base model")
        base_grid = _base_model_grid(world.data, out / "figures" / "base_samples.png")

    with _timed(seconds, "counterfactual"):
        counterfactual = counterfactual_summary()

    seconds["total"] = time.perf_counter() - t_start
    report = _write_report(
        out, world, outcomes, best, shown, shown_stats, base_grid, seconds, counterfactual
    )
    _write_summary(out, best, outcomes, shown_stats, counterfactual)
    return DemoResult(out, report, outcomes, best, seconds, shown)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Record in `seconds[stage]` how long the block took, for the report's timings."""
    t0 = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t0


@dataclass
class _World:
    """The unpacked miniature world: its data, benchmark, manifest (written) and PNG folders."""

    data: ClipartData
    bench: WorldBenchmark
    manifest: BenchmarkManifest
    manifest_path: Path
    dirs: dict[str, Path]
    test: BenchmarkManifest
    sets: CaptionedSets
    sets_manifest: BenchmarkManifest

    def log_sizes(self) -> None:
        """Say how large the world is."""
        logger.info(
            f"world: {len(self.data.indices('pretrain'))} training images, "
            f"{len(self.manifest.models)} customized models ({len(self.test.models)} for "
            f"testing), {len(self.bench.images)} samples; {len(self.sets.models)} models tuned "
            f"on captioned sets of {self.sets.sizes()} images"
        )


def _unpack_world(out: Path) -> _World:
    """The shipped world as PNG files and a manifest under `out/world`."""
    data, bench = load_data(), load_benchmark()
    manifest, dirs = bench.write_images(data, out / "world")
    manifest_path = out / "world" / "manifest.json"
    write_manifest(manifest, manifest_path)
    sets = load_sets()
    sets_manifest, set_dirs = sets.write_images(data, out / "world" / "sets")
    write_manifest(sets_manifest, out / "world" / "sets" / "manifest.json")
    dirs = {**dirs, "set-exemplars": set_dirs["exemplars"], "set-synth": set_dirs["synth"]}
    test = manifest.split("test")
    return _World(data, bench, manifest, manifest_path, dirs, test, sets, sets_manifest)


def _run_backbone(
    name: str, out: Path, world: _World, head: str, epochs: int, progress: bool
) -> BackboneOutcome:
    """Every stage for one feature space: extract, train a head, calibrate, evaluate."""
    t: dict[str, float] = {}
    stores = {p: out / "stores" / name / p for p in (*PARTS, *SET_PARTS)}
    with _timed(t, "extract"):
        _extract_parts(name, world.dirs, stores, progress)
    head_dir = out / "heads" / name
    with _timed(t, "train head"):
        trained = _train_head(name, head, epochs, world.manifest_path, stores, head_dir, progress)
    cal_path = out / "calibrators" / f"{name}.json"
    with _timed(t, "calibrate"):
        cal = _calibrate(name, world.manifest_path, stores, cal_path, head_dir)
    with _timed(t, "evaluate"):
        logger.info(f"{name}: evaluating on the test models")
        raw, mapped, controls = _evaluate(name, stores, world.test, head_dir, out / "results")
        logger.info(f"{name}: evaluating on the captioned sets")
        sets = _evaluate_sets(name, stores, world.sets_manifest, head_dir, out / "results")
    plot = cal_path.with_suffix(".reliability.png")
    outcome = BackboneOutcome(
        name,
        raw,
        mapped,
        trained.history,
        trained.best_epoch,
        cal.fit_report,
        plot if plot.is_file() else None,
        t,
        head,
        controls,
        sets,
        "stricter gallery" if trained.config.strict_validation else "AbC protocol",
    )
    logger.info(
        f"{name}: test mAP raw {outcome.mean_map('raw'):.3f}, "
        f"with head {outcome.mean_map('head'):.3f}"
    )
    return outcome


def _extract_parts(
    name: str, dirs: dict[str, Path], stores: dict[str, Path], progress: bool
) -> None:
    """Features of the pre-training images, the exemplars, the samples, the captioned sets'
    images and their samples, one store each."""
    for part in (*PARTS, *SET_PARTS):
        logger.info(f"{name}: extracting {part}")
        extract(name, dirs[part], stores[part], workers=0, progress=progress)


def _train_head(
    name: str,
    head: str,
    epochs: int,
    manifest_path: Path,
    stores: dict[str, Path],
    head_dir: Path,
    progress: bool,
) -> TrainResult:
    """A head on the train models, at the demo's `HEAD_SETTINGS` and `HONEST_HEADS` rules."""
    logger.info(f"{name}: training a {head} head on the train models")
    return train_heads_from_stores(
        manifest_path,
        stores["exemplars"],
        stores["synth"],
        head_dir,
        options_from_mapping(
            TrainConfig,
            {"head": head, "epochs": epochs, **HEAD_SETTINGS[head], **HONEST_HEADS},
            "demo head",
        ),
        distractors=stores["pretrain"],
        progress=progress,
    )


def _calibrate(
    name: str, manifest_path: Path, stores: dict[str, Path], cal_path: Path, head_dir: Path
) -> Calibrator:
    """The head's score calibration, fitted on the val models."""
    logger.info(f"{name}: calibrating on the val models")
    cal_path.parent.mkdir(parents=True, exist_ok=True)
    return calibrate_from_stores(
        manifest_path,
        stores["exemplars"],
        stores["synth"],
        stores["pretrain"],
        cal_path,
        head=head_dir,
    )


def _write_report(
    out: Path,
    world: _World,
    outcomes: dict[str, BackboneOutcome],
    best: str,
    shown: list[ShownQuery],
    shown_stats: dict[str, Any],
    base_grid: Path,
    seconds: dict[str, float],
    counterfactual: dict[str, Any] | None,
) -> Path:
    """`out/report.html`, from every stage's results and the base model's training record."""
    return write_demo_report(
        out / "report.html",
        data=world.data,
        bench=world.bench,
        manifest=world.manifest,
        outcomes=outcomes,
        best=best,
        shown=shown,
        shown_stats=shown_stats,
        base_grid=base_grid,
        base_training=describe_training(json.loads((base_model_dir() / TRAINING_NAME).read_text())),
        seconds=seconds,
        sets_manifest=world.sets_manifest,
        sets_info={
            "models": Counter(m["size"] for m in world.sets.models),
            "draws": world.sets.info["draws_per_image"],
        },
        counterfactual=counterfactual,
    )


def counterfactual_summary(path: Path | None = None) -> dict[str, Any] | None:
    """LDS, the seed ceiling and the exemplar comparison recomputed from the world's packed
    counterfactual study (`COUNTERFACTUAL_PACK`; margins and scores, no retraining), with
    the study's leave-K-out and tuning records; None where the pack is absent."""
    path = path or DEFAULT_DATA_DIR / COUNTERFACTUAL_PACK
    if not path.is_file():
        logger.info(f"no packed counterfactual study at {path}")
        return None
    outcomes, meta = load_packed_outcomes(path)
    values, ceiling = lds_per_query(outcomes, meta["labels"])
    return {
        "models": [o.id for o in outcomes],
        "queries": int(sum(o.margins.shape[1] for o in outcomes)),
        "spec": meta.get("spec"),
        "validation": meta.get("validation"),
        "tuning": meta.get("tuning"),
        "lds": lds_results(values, ceiling),
        "exemplar": exemplar_results(outcomes, meta["labels"], values),
        "leave_k_out": meta.get("leave_k_out"),
    }


def _write_summary(
    out: Path,
    best: str,
    outcomes: dict[str, BackboneOutcome],
    shown_stats: dict[str, Any],
    counterfactual: dict[str, Any] | None,
) -> None:
    """`out/summary.json`: the best backbone and each one's results, controls and timings,
    the report's attributed test queries (`shown_summary`) and the counterfactual study."""
    summary = {
        name: {
            "raw": o.raw.summary(),
            "head": o.head.summary(),
            "controls": {k: r.summary() for k, r in o.controls.items()},
            "sets": {k: r.summary() for k, r in o.sets.items()},
            "calibration": o.calibration.get("heldout", {}),
            "seconds": o.seconds,
        }
        for name, o in outcomes.items()
    }
    doc = {
        "best": best,
        "backbones": summary,
        "attributed_queries": shown_stats,
        "counterfactual": counterfactual,
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=1))


# The controls beside every result (genattr.evaluate): a stricter gallery where every held-out
# exemplar is a distractor for every query, and a score that ignores the query.
# The last pairs them: what membership in the held-out sets alone would score.
CONTROLS: dict[str | None, dict[str, bool]] = {
    "stricter gallery": {"exemplars_as_distractors": True},
    "query-independent": {"query_independent": True},
    "query-independent, stricter gallery": {
        "exemplars_as_distractors": True,
        "query_independent": True,
    },
}


def stricter_gallery(gallery: Any, exemplars: Any, tc: Any) -> torch.Tensor:
    """The stricter gallery of a test case: the pre-training images (`gallery` vectors) and
    every held-out exemplar in the `exemplars` store outside the test case `tc` (its own
    models' exemplars are added by the protocol, with `exemplars_as_distractors`)."""
    own = set(tc.exemplar_paths)
    others = np.asarray([i for i, p in enumerate(exemplars.paths) if p not in own], np.int64)
    extra = np.asarray(exemplars.vectors[others], np.float32).reshape(-1, exemplars.dim)
    return torch.from_numpy(np.concatenate([np.asarray(gallery, np.float32), extra]))


def _evaluate(
    name: str, stores: dict[str, Path], test, head_dir: Path, results_dir: Path
) -> tuple[EvaluationResult, EvaluationResult, dict[str, EvaluationResult]]:
    """The test models against the pre-training gallery (the authors' protocol: exemplars
    plus distractors), raw and through the head, with recall at every K of the curves, and
    the three CONTROLS of each. Each test case (objects of observed kinds, objects of unobserved
    kinds, styles) is evaluated apart, as the authors' test cases are; prompt types are
    reported as "object: media", "style: gpt", ..."""
    real, synth = EmbeddingStore.open(stores["exemplars"]), EmbeddingStore.open(stores["synth"])
    cases = {
        case: testcase_from_stores(BenchmarkManifest(test.name, models), real, synth)[0]
        for case in CASES
        if (models := [m for m in test.models if m.extra.get("case", m.mode) == case])
    }
    out = _case_results(stores, real, cases, head_dir)
    _write_case_results(out, name, results_dir, name)
    controls = {f"{w}, {c}": r for (w, c), r in out.items() if c is not None}
    return out[("raw", None)], out[("head", None)], controls


def _evaluate_sets(
    name: str, stores: dict[str, Path], sets, head_dir: Path, results_dir: Path
) -> dict[str, EvaluationResult]:
    """The captioned-set models against the pre-training gallery, one test case per set size
    ("set-16: held-out"), raw and through the head trained on single-exemplar models, with
    the same CONTROLS (the stricter gallery adds every other set's images); keys "raw",
    "head", "raw, stricter gallery", ..."""
    real = EmbeddingStore.open(stores["set-exemplars"])
    synth = EmbeddingStore.open(stores["set-synth"])
    by_case: dict[str, list[Any]] = {}
    for m in sorted(sets.models, key=lambda m: len(m.exemplars)):
        by_case.setdefault(m.extra["case"], []).append(m)
    cases = {
        case: testcase_from_stores(BenchmarkManifest(sets.name, models), real, synth)[0]
        for case, models in by_case.items()
    }
    out = _case_results(stores, real, cases, head_dir)
    _write_case_results(out, name, results_dir, f"{name}.sets")
    return {w if c is None else f"{w}, {c}": r for (w, c), r in out.items()}


def _case_results(
    stores: dict[str, Path], real: EmbeddingStore, cases: dict[str, Any], head_dir: Path
) -> dict[tuple[str, str | None], EvaluationResult]:
    """Every test case against the pre-training gallery, raw and through the head, plain and
    under each of the CONTROLS; per (raw|head, control or None), prompt types "case: type"."""
    gallery = EmbeddingStore.open(stores["pretrain"]).vectors
    mappers = load_heads(head_dir)[0]
    strict_galleries = {case: stricter_gallery(gallery, real, tc) for case, tc in cases.items()}
    out: dict[tuple[str, str | None], EvaluationResult] = {}
    for which in ("raw", "head"):
        for control in (None, *CONTROLS):
            per_type = {}
            for case, tc in cases.items():
                setting = CONTROLS.get(control, {})
                strict = setting.get("exemplars_as_distractors", False)
                res = evaluate_protocol(
                    strict_galleries[case] if strict else gallery,
                    tc,
                    CURVE_KS,
                    mappers=mappers if which == "head" else None,
                    exemplars_as_distractors=strict,
                    query_independent=setting.get("query_independent", False),
                )
                per_type.update({f"{case}: {p}": r for p, r in res.per_type.items()})
            out[(which, control)] = EvaluationResult(CURVE_KS, per_type)
    return out


def _write_case_results(
    out: dict[tuple[str, str | None], EvaluationResult], name: str, results_dir: Path, stem: str
) -> None:
    """One results JSON per (raw|head, control): `results/{stem}.{which}[.{control}].json`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for (which, control), res in out.items():
        suffix = which if control is None else f"{which}.{control.replace(', ', '.')}"
        suffix = suffix.replace(" ", "-")
        write_results(res, results_dir / f"{stem}.{suffix}.json", backbone=name, split="test")


def _base_model_grid(data, path: Path, rows: int = 2) -> Path:
    """Samples of the shipped base model for captions of its own training images: one random
    image of each curated group in the top row, `rows` rows of samples for the same captions
    (different seeds) below."""
    pipe = load_world_base()
    idx = data.indices("pretrain")
    rng = np.random.default_rng(7)
    groups = sorted({data.records[i]["group"] for i in idx})
    pick = [rng.choice([i for i in idx if data.records[i]["group"] == g]) for g in groups]
    captions = data.captions(pick)
    images = [data.images[pick]]
    images += [sample(pipe, captions, steps=15, seed=r * len(pick)) for r in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(np.concatenate(images), cols=len(pick), scale=3).save(path)
    return path
