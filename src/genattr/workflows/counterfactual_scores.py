"""Scoring attribution methods against a counterfactual study: every method's scores on each
case's queries (one `ScoringMethod` interface, the full-set model retrained in memory), LDS
with the retraining-seed ceiling, and leave-K-out retraining. Files: see
`genattr.workflows.counterfactual`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genattr.atomic import write_text_atomic
from genattr.counterfactual import (
    lds,
    leave_k_out_masks,
    paired_difference,
    seed_ceiling,
    summarize,
)
from genattr.errors import GenattrError
from genattr.progress import progress_bar
from genattr.workflows.counterfactual import (
    Retrainer,
    SetCase,
    StudySpec,
    Unit,
    run_units,
    save_array,
    unit_path,
)
from genattr.workflows.model_methods import FeatureMethod, ScoringMethod, make_method

logger = logging.getLogger(__name__)

RANDOM = "random"
RESULTS = "results.json"


def default_methods(names: Sequence[str] | None = None) -> dict[str, ScoringMethod]:
    """The methods a study compares (all, or those whose `slug` is in `names`), each with
    its settings as shipped (none of them tuned on the study's margins)."""
    every: dict[str, ScoringMethod] = {
        "pixel": FeatureMethod(backbone="pixel"),
        "world-cnn": FeatureMethod(backbone="world-cnn"),
        "gradient (loss)": make_method("gradient"),
        "gradient (square norm)": make_method("gradient", output="square_norm"),
        "trak (loss)": make_method("gradient", kernel="trak"),
        "unlearning": make_method("unlearning"),
    }
    if names is None:
        return every
    unknown = sorted(set(names) - {slug(k) for k in every})
    if unknown:
        known = ", ".join(slug(k) for k in every)
        raise GenattrError(f"unknown method(s) {', '.join(unknown)}; known: {known}")
    return {k: m for k, m in every.items() if slug(k) in names}


def slug(label: str) -> str:
    """A method's label as a file name."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _scores_path(work: Path, case: SetCase, label: str) -> Path:
    return work / case.id / "scores" / f"{slug(label)}.npy"


def score_cases(
    cases: Sequence[SetCase],
    *,
    base: str | Path,
    work: str | Path,
    methods: dict[str, ScoringMethod],
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Score every case's queries against its training set with each method, its query-blind
    controls (named `control: ...`) and seeded random scores, under the case's own model
    (the full set, seed 0, retrained here); saved as (Q, N) arrays, skipped where saved.
    Returns the labels, methods first."""
    work = Path(work)
    retrainer: Retrainer | None = None
    labels: dict[str, None] = {}
    with progress_bar("score", len(cases), enabled=progress) as advance:
        for k, case in enumerate(cases):
            listed = work / case.id / "scores" / "labels.json"
            if listed.is_file():
                labels.update(dict.fromkeys(json.loads(listed.read_text())))
                advance(1)
                continue
            if retrainer is None:
                retrainer = Retrainer(base)
            retrainer.train(case, Unit((True,) * len(case.train_paths), 0))
            shape = (len(case.queries), len(case.train))
            found: dict[str, np.ndarray] = {}
            for label, method in methods.items():
                method.prepare(retrainer.pipe, [case.train], None, False)
                found[label] = method.scores(retrainer.pipe, case.queries, False)
                for name, control in method.controls().items():
                    found.setdefault(f"control: {name}", np.broadcast_to(control, shape))
            found[RANDOM] = np.random.default_rng([seed, k]).normal(size=shape)
            for label, scores in found.items():
                if scores.shape != shape:
                    raise GenattrError(f"{label} gave scores {scores.shape}, expected {shape}")
                save_array(_scores_path(work, case, label), np.asarray(scores, dtype=np.float64))
            write_text_atomic(listed, json.dumps(list(found)))
            labels.update(dict.fromkeys(found))
            advance(1)
    return list(labels)


def load_scores(work: Path, case: SetCase, labels: Sequence[str]) -> dict[str, np.ndarray]:
    return {label: np.load(_scores_path(work, case, label)) for label in labels}


def lds_results(
    cases: Sequence[SetCase], *, work: str | Path, labels: Sequence[str]
) -> dict[str, Any]:
    """LDS per method (against the seed-mean margins, queries of every case pooled) with
    mean, standard error and bootstrap interval, its paired difference to random and to the
    best method, and the retraining-seed ceiling."""
    work = Path(work)
    per_query: dict[str, list[np.ndarray]] = {label: [] for label in labels}
    ceiling: list[np.ndarray] = []
    for case in cases:
        got = np.load(work / case.id / "margins.npz")
        target = got["margins"].mean(axis=0)
        for label, scores in load_scores(work, case, labels).items():
            per_query[label].append(lds(scores, got["masks"], target))
        if got["margins"].shape[0] >= 2:
            ceiling.append(seed_ceiling(got["margins"]))
    values = {label: np.concatenate(v) for label, v in per_query.items()}
    best = max(values, key=lambda k: np.nanmean(values[k]))
    out: dict[str, Any] = {
        "sign": "margin = -loss; prediction = sum of scores over the kept images",
        "ceiling": summarize(np.concatenate(ceiling)).as_dict() if ceiling else None,
        "best": best,
        "methods": {},
    }
    for label, v in values.items():
        out["methods"][label] = {
            "lds": summarize(v).as_dict(),
            "minus_random": paired_difference(v, values[RANDOM]).as_dict(),
            "minus_best": paired_difference(v, values[best]).as_dict(),
        }
    return out


def leave_k_out_units(
    case: SetCase, scores: dict[str, np.ndarray], *, ks: Sequence[int], queries: Sequence[int]
) -> dict[tuple[str, int, int], Unit]:
    """(label, k, query) -> the model trained without that method's top-k images for that
    query (seed 0); methods that agree share a unit."""
    return {
        (label, k, q): Unit(tuple(bool(b) for b in leave_k_out_masks(s[q : q + 1], k)[0]), 0)
        for label, s in scores.items()
        for k in ks
        for q in queries
    }


def leave_k_out(
    cases: Sequence[SetCase],
    *,
    base: str | Path,
    work: str | Path,
    spec: StudySpec,
    labels: Sequence[str],
    fractions: Sequence[float] = (0.125, 0.25, 0.5),
    queries_per_case: int = 2,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[str, Any] | None:
    """Retrain each case without each method's top-K images for a few queries (spread over
    the case's queries), K = fraction x N, and measure how much the query's loss rises
    over the full model's (seed 0). Returns the summaries once every unit is done."""
    work = Path(work)
    plans = {}
    for case in cases:
        n, q = len(case.train_paths), len(case.queries)
        ks = sorted({max(1, round(f * n)) for f in fractions})
        rows = np.linspace(0, q - 1, min(queries_per_case, q)).round().astype(int).tolist()
        plans[case.id] = (
            ks,
            leave_k_out_units(case, load_scores(work, case, labels), ks=ks, queries=rows),
        )
    units = {cid: sorted(set(p[1].values()), key=lambda u: u.key) for cid, p in plans.items()}
    run_units(
        cases,
        units,
        work=work,
        spec=spec,
        base=base,
        shard=shard,
        progress=progress,
    )
    if not all(unit_path(work, c, u).is_file() for c in cases for u in units[c.id]):
        return None
    rises: dict[str, dict[float, list[float]]] = {}
    for case in cases:
        full = np.load(work / case.id / "margins.npz")["full"][0]
        fraction_of = {k: k / len(case.train_paths) for k in plans[case.id][0]}
        for (label, k, q), unit in plans[case.id][1].items():
            rise = float(full[q] - np.load(unit_path(work, case, unit))[q])  # loss up
            rises.setdefault(label, {}).setdefault(round(fraction_of[k], 4), []).append(rise)
    return {
        "measure": "loss rise of the query (full model's margin minus the retrained one's)",
        "methods": {
            label: {
                str(f): {
                    "rise": summarize(np.array(v)).as_dict(),
                    "minus_random": paired_difference(
                        np.array(v), np.array(rises[RANDOM][f])
                    ).as_dict(),
                }
                for f, v in by_k.items()
            }
            for label, by_k in rises.items()
        },
    }


def write_study_results(work: str | Path, results: dict[str, Any]) -> Path:
    path = Path(work) / RESULTS
    write_text_atomic(path, json.dumps(results, indent=1) + "\n")
    return path


def run_study(
    cases: Sequence[SetCase],
    *,
    base: str | Path,
    work: str | Path,
    spec: StudySpec,
    methods: dict[str, ScoringMethod] | None = None,
    leave_k_out_queries: int = 0,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[str, Any] | None:
    """A whole study, resumable at any point: retrain and measure the subsets, score the
    methods, LDS, and (with `leave_k_out_queries` > 0) leave-K-out on that many queries per
    case (the methods, random and the last query-blind control: the lowest loss where the
    unlearning method runs); writes and returns WORK/results.json, or None while another
    shard's units or cases are missing (run the shards side by side, then any one again).
    Shards split the retraining unit by unit and the scoring case by case."""
    from genattr.workflows.counterfactual import build_margins

    done = build_margins(cases, base=base, work=work, spec=spec, shard=shard, progress=progress)
    if len(done) < len(cases):
        logger.info(f"{len(done)} of {len(cases)} case(s) have all their margins")
        return None
    index, count = shard
    score_cases(
        cases[index::count], base=base, work=work, methods=methods or default_methods(),
        progress=progress,
    )  # fmt: skip
    if not all((Path(work) / c.id / "scores" / "labels.json").is_file() for c in cases):
        logger.info("scores of other shards' cases are missing")
        return None
    labels = score_cases(cases, base=base, work=work, methods={}, progress=False)  # all saved
    results: dict[str, Any] = {"spec": spec.model_dump(), "cases": [c.id for c in cases]}
    results["lds"] = lds_results(cases, work=work, labels=labels)
    if leave_k_out_queries > 0:
        controls = [x for x in labels if x.startswith("control: ")]
        loo_labels = [x for x in labels if x not in controls] + controls[-1:]
        loo = leave_k_out(
            cases, base=base, work=work, spec=spec, labels=loo_labels,
            queries_per_case=leave_k_out_queries, shard=shard, progress=progress,
        )  # fmt: skip
        if loo is None:
            return None
        results["leave_k_out"] = loo
    write_study_results(work, results)
    return results
