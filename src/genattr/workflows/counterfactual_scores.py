"""Scoring attribution methods against a counterfactual study: every method's scores on each
case's queries (one `ScoringMethod` interface, the full-set model retrained in memory), LDS
with the retraining-seed ceiling, and leave-K-out retraining. Files: see
`genattr.workflows.counterfactual`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genattr.atomic import atomic_path, write_text_atomic
from genattr.counterfactual import (
    exemplar_ap,
    lds,
    leave_k_out_masks,
    paired_difference,
    rank_agreement,
    seed_ceiling,
    summarize,
)
from genattr.errors import GenattrError
from genattr.evaluate import expected_random_ap
from genattr.progress import progress_bar
from genattr.workflows.counterfactual import (
    Engine,
    Job,
    Retrainer,
    SetCase,
    StudySpec,
    Unit,
    run_units,
    save_array,
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
        "world-cnn + text": FeatureMethod(backbone="world-cnn", text_weight=0.5),
        "text alone": FeatureMethod(backbone="world-cnn", text_weight=1.0),
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
    device: str = "cpu",
    rows: Sequence[int] | None = None,
    progress: bool = True,
) -> list[str]:
    """Score every case's queries against its training set with each method not scored
    there yet, its query-blind controls (named `control: ...`) and seeded random scores,
    under the case's own model (the full set, seed 0, retrained here for the methods that
    read a model); saved as (Q, N) arrays and listed in `labels.json`, so a method added
    later is scored alone. `rows`: score only these queries of each case (NaN elsewhere;
    for methods too slow for all, compared on the queries they scored). Returns every
    case's labels, in the order first scored."""
    work = Path(work)
    retrainer: Retrainer | None = None
    labels: dict[str, None] = {}
    with progress_bar("score", len(cases), enabled=progress) as advance:
        for k, case in enumerate(cases):
            known = scored_labels(work, case)
            missing = {x: m for x, m in methods.items() if x not in known}
            shape = (len(case.queries), len(case.train))
            found: dict[str, np.ndarray] = {}
            pipe = None  # only methods that read the model get the case's own model
            if any(m.needs_model for m in missing.values()):
                if retrainer is None:
                    retrainer = Retrainer(base, device)
                retrainer.train(case, Unit((True,) * len(case.train_paths), 0))
                pipe = retrainer.pipe
            asked = case.queries if rows is None else case.queries.take(rows)
            for label, method in missing.items():
                method.prepare(pipe, [case.train], None, False)
                found[label] = np.full(shape, np.nan)
                found[label][slice(None) if rows is None else list(rows)] = method.scores(
                    pipe, asked, False
                )
                for name, control in method.controls().items():
                    if f"control: {name}" not in known:
                        found.setdefault(f"control: {name}", np.broadcast_to(control, shape))
            if RANDOM not in known:
                found[RANDOM] = np.random.default_rng([seed, k]).normal(size=shape)
            save_scores(work, case, found)
            labels.update(dict.fromkeys([*known, *found]))
            advance(1)
    return list(labels)


def save_scores(work: str | Path, case: SetCase, found: dict[str, np.ndarray]) -> None:
    """Add (or replace) scores (Q, N) of the case's queries under these labels; scores
    computed elsewhere (a distilled head, a teacher) join the study's tables this way."""
    shape = (len(case.queries), len(case.train))
    for label, scores in found.items():
        if scores.shape != shape:
            raise GenattrError(f"{label} gave scores {scores.shape}, expected {shape}")
        save_array(_scores_path(Path(work), case, label), np.asarray(scores, dtype=np.float64))
    if found:  # re-read: another process may have added labels meanwhile
        now = scored_labels(work, case)
        listed = Path(work) / case.id / "scores" / "labels.json"
        write_text_atomic(listed, json.dumps([*now, *(x for x in found if x not in now)]))


def scored_labels(work: str | Path, case: SetCase) -> list[str]:
    """The labels a case's queries have been scored with so far."""
    listed = Path(work) / case.id / "scores" / "labels.json"
    return json.loads(listed.read_text()) if listed.is_file() else []


def load_scores(work: Path, case: SetCase, labels: Sequence[str]) -> dict[str, np.ndarray]:
    return {label: np.load(_scores_path(work, case, label)) for label in labels}


@dataclass
class CaseOutcome:
    """One case of a study in memory: its subsets, margins and every method's scores, with
    each query's exemplar answers (the training images captioned with its prompt) and
    prompt type; what LDS, the ceiling and the exemplar comparison are computed from."""

    id: str
    masks: np.ndarray  # (M, N) bool
    margins: np.ndarray  # (R, Q, M)
    scores: dict[str, np.ndarray]  # label -> (Q, N)
    answers: np.ndarray  # (Q, N) bool
    prompt_types: list[str]


def read_outcomes(
    cases: Sequence[SetCase], *, work: str | Path, labels: Sequence[str]
) -> list[CaseOutcome]:
    """The cases' outcomes from a study folder (margins assembled, scores saved)."""
    out = []
    for case in cases:
        got = np.load(Path(work) / case.id / "margins.npz")
        out.append(
            CaseOutcome(
                case.id,
                got["masks"],
                got["margins"],
                load_scores(Path(work), case, labels),
                np.array(
                    [[c == p for c in case.train.prompts] for p in case.queries.prompts],
                    dtype=bool,
                ),
                [i.split("/")[-2] if i.count("/") >= 2 else "" for i in case.queries.ids],
            )
        )
    return out


def lds_per_query(
    outcomes: Sequence[CaseOutcome], labels: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each method's LDS per query (against the seed-mean margins, every case's queries in
    order) and the retraining-seed ceiling per query (empty with one seed)."""
    per_query: dict[str, list[np.ndarray]] = {label: [] for label in labels}
    ceiling: list[np.ndarray] = [np.empty(0)]
    for case in outcomes:
        target = case.margins.mean(axis=0)
        for label in labels:
            per_query[label].append(lds(case.scores[label], case.masks, target))
        if case.margins.shape[0] >= 2:
            ceiling.append(seed_ceiling(case.margins))
    return {k: np.concatenate(v) for k, v in per_query.items()}, np.concatenate(ceiling)


def lds_results(values: dict[str, np.ndarray], ceiling: np.ndarray) -> dict[str, Any]:
    """LDS per method (queries of every case pooled) with mean, standard error and bootstrap
    interval, its paired difference to random and to the best method (of those that scored
    every query; a pair counts the queries both scored), and the ceiling."""
    complete = [k for k, v in values.items() if np.isfinite(v).all()] or list(values)
    best = max(complete, key=lambda k: np.nanmean(values[k]))  # among those scored everywhere
    out: dict[str, Any] = {
        "sign": "margin = -loss; prediction = sum of scores over the kept images",
        "ceiling": summarize(ceiling).as_dict() if len(ceiling) else None,
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


def exemplar_results(
    outcomes: Sequence[CaseOutcome], labels: Sequence[str], lds_values: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The exemplar-as-answer ground truth on the same models, queries and scores: a query
    whose prompt is the caption of training images has those images as its answer (AP
    within the set, chance its expected random AP); each method's mAP beside its LDS on
    the same queries, and how far the two rankings of the methods agree (of the methods
    that scored every query)."""
    aps: dict[str, list[np.ndarray]] = {label: [] for label in labels}
    chance, rows = [], []
    for case in outcomes:
        rows.append(case.answers.any(axis=1))
        n_answers = case.answers.sum(axis=1)
        chance.append(expected_random_ap(n_answers[n_answers > 0], case.answers.shape[1]))
        for label in labels:
            aps[label].append(exemplar_ap(case.scores[label], case.answers))
    asked = np.concatenate(rows)
    if not asked.any():
        return {"queries": 0}
    ap = {label: np.concatenate(v)[asked] for label, v in aps.items()}
    same = {label: lds_values[label][asked] for label in labels}
    complete = [k for k in labels if np.isfinite(same[k]).all()]  # partly scored: left out
    means_ap = {k: float(np.nanmean(ap[k])) for k in complete}
    means_lds = {k: float(np.nanmean(same[k])) for k in complete}
    methods_only = [k for k in complete if not k.startswith("control: ") and k != RANDOM]
    return {
        "ground_truth": "the training images whose caption is the query's prompt, ranked "
        "among the set's images",
        "queries": int(asked.sum()),
        "chance": float(np.concatenate(chance).mean()),
        "methods": {
            k: {"map": summarize(ap[k]).as_dict(), "lds": summarize(same[k]).as_dict()}
            for k in labels
        },
        "agreement": {
            "all": rank_agreement(means_ap, means_lds),
            "methods": rank_agreement(
                {k: means_ap[k] for k in methods_only}, {k: means_lds[k] for k in methods_only}
            ),
        },
    }


def leave_k_out_units(
    scores: dict[str, np.ndarray], *, ks: Sequence[int], queries: Sequence[int]
) -> dict[tuple[str, int, int], Unit]:
    """(label, k, query) -> the model trained without that method's top-k images for that
    query (seed 0); methods that agree share a unit."""
    return {
        (label, k, q): Unit(tuple(bool(b) for b in leave_k_out_masks(s[q : q + 1], k)[0]), 0)
        for label, s in scores.items()
        for k in ks
        for q in queries
        if np.isfinite(s[q]).all()  # a query the method did not score has no top-k
    }


def _leave_k_out_path(work: Path, case: SetCase, unit: Unit, query: int) -> Path:
    return work / case.id / "leave-k-out" / f"{unit.key}-q{query}.npz"


def image_changes(references: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray]:
    """How far each regeneration moved from its reference, pair by pair (both (N, S, S, 3)
    uint8): mean absolute pixel difference (0-1) and world-cnn cosine distance."""
    from PIL import Image

    from genattr.features.embedder import embed_images
    from genattr.features.registry import get_backbone

    a, b = references.astype(np.float64), images.astype(np.float64)
    pixel = np.abs(a - b).mean((1, 2, 3)) / 255.0
    both = [Image.fromarray(x) for x in [*references, *images]]
    feats = embed_images(get_backbone("world-cnn"), both).astype(np.float64)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    n = len(references)
    return {"pixel": pixel, "world-cnn": 1.0 - (feats[:n] * feats[n:]).sum(axis=1)}


def leave_k_out(
    cases: Sequence[SetCase],
    *,
    base: str | Path,
    work: str | Path,
    spec: StudySpec,
    labels: Sequence[str],
    control: str | None = None,
    fractions: Sequence[float] = (0.125, 0.25, 0.5),
    queries_per_case: int = 2,
    shard: tuple[int, int] = (0, 1),
    engine: Engine | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Retrain each case without each method's top-K images for a few queries (spread over
    the case's queries), K = fraction x N, and measure how much the query's loss rises over
    the full model's (both seed 0) and how far its regeneration from its own noise moves;
    each against removing K random images and the K the query-blind `control` picks.
    Returns the summaries once every unit is done."""
    work = Path(work)
    plans, jobs = {}, []
    for case in cases:
        n, q = len(case.train_paths), len(case.queries)
        ks = sorted({max(1, round(f * n)) for f in fractions})
        rows = np.linspace(0, q - 1, min(queries_per_case, q)).round().astype(int).tolist()
        plan = leave_k_out_units(load_scores(work, case, labels), ks=ks, queries=rows)
        full = Unit((True,) * n, 0)
        needed = {(full, r) for r in rows} | {(u, r) for (_, _, r), u in plan.items()}
        jobs += [
            Job(case, u, _leave_k_out_path(work, case, u, r), r)
            for u, r in sorted(needed, key=lambda x: (x[1], x[0].key))
        ]
        plans[case.id] = (ks, plan, full)
    run_units(
        jobs, spec=spec, base=base, shard=shard, **(engine or Engine()).options(),
        progress=progress,
    )  # fmt: skip
    if not all(j.path.is_file() for j in jobs):
        return None
    keys, rises, pairs = [], [], []
    read: dict[Path, tuple[float, np.ndarray]] = {}  # each unit once: methods share them
    for job in jobs:
        got = np.load(job.path)
        read[job.path] = float(got["margin"][0]), got["image"]
    for case in cases:
        ks, plan, full = plans[case.id]
        for (label, k, q), unit in plan.items():
            full_margin, full_image = read[_leave_k_out_path(work, case, full, q)]
            margin, image = read[_leave_k_out_path(work, case, unit, q)]
            keys.append((label, round(k / len(case.train_paths), 4)))
            rises.append(full_margin - margin)  # the query's loss went up by this much
            pairs.append((full_image, image))
    changes = image_changes(np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs]))
    per: dict[str, dict[float, dict[str, list[float]]]] = {}
    for i, (label, f) in enumerate(keys):
        got = per.setdefault(label, {}).setdefault(f, {})
        for measure, value in [
            ("rise", rises[i]),
            ("pixel_change", changes["pixel"][i]),
            ("cnn_change", changes["world-cnn"][i]),
        ]:
            got.setdefault(measure, []).append(float(value))
    baselines = [RANDOM] + ([control] if control else [])

    def summary(values: dict[str, list[float]], f: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for measure, v in values.items():
            out[measure] = summarize(np.array(v)).as_dict()
            for b in baselines:
                key = "minus_random" if b == RANDOM else "minus_control"
                ref = np.array(per[b][f][measure])
                out.setdefault(key, {})[measure] = paired_difference(np.array(v), ref).as_dict()
        return out

    return {
        "measures": {
            "rise": "loss rise of the query (full model's margin minus the retrained one's)",
            "pixel_change": "mean absolute pixel change (0-1) of the query regenerated "
            "from its own noise",
            "cnn_change": "world-cnn cosine distance between the two regenerations",
        },
        "control": control,
        "methods": {
            label: {str(f): summary(v, f) for f, v in by_k.items()} for label, by_k in per.items()
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
    engine: Engine | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """A whole study, resumable at any point: retrain and measure the subsets, score the
    methods (those not scored yet), LDS of every method scored, and (with
    `leave_k_out_queries` > 0) leave-K-out on that many queries per case for `methods`,
    random and the query-blind control with the highest LDS; writes and returns
    WORK/results.json, or None while another shard's units or cases are missing (run the
    shards side by side, then any one again).
    Shards split the retraining unit by unit and the scoring case by case."""
    from genattr.workflows.counterfactual import build_margins

    engine = engine or Engine()
    done = build_margins(
        cases, base=base, work=work, spec=spec, shard=shard, **engine.options(), progress=progress
    )
    if len(done) < len(cases):
        logger.info(f"{len(done)} of {len(cases)} case(s) have all their margins")
        return None
    index, count = shard
    methods = methods or default_methods()
    score_cases(
        cases[index::count], base=base, work=work, methods=methods, device=engine.device,
        progress=progress,
    )  # fmt: skip
    if any(set(methods) - set(scored_labels(work, c)) for c in cases):
        logger.info("scores of other shards' cases are missing")
        return None
    every = score_cases(cases, base=base, work=work, methods={}, progress=False)  # all saved
    common = set.intersection(*(set(scored_labels(work, c)) for c in cases))
    labels = [x for x in every if x in common]  # a setting tuned on some cases: left out
    results: dict[str, Any] = {"spec": spec.model_dump(), "cases": [c.id for c in cases]}
    outcomes = read_outcomes(cases, work=work, labels=labels)
    values, ceiling = lds_per_query(outcomes, labels)
    results["lds"] = lds_results(values, ceiling)
    results["exemplar"] = exemplar_results(outcomes, labels, values)
    if leave_k_out_queries > 0:
        controls = [x for x in labels if x.startswith("control: ")]
        lds_of = {x: results["lds"]["methods"][x]["lds"]["mean"] for x in controls}
        control = max(lds_of, key=lambda x: lds_of[x]) if controls else None
        loo_labels = [*methods, RANDOM] + ([control] if control else [])
        loo = leave_k_out(
            cases, base=base, work=work, spec=spec, labels=loo_labels, control=control,
            queries_per_case=leave_k_out_queries, shard=shard, engine=engine, progress=progress,
        )  # fmt: skip
        if loo is None:
            return None
        results["leave_k_out"] = loo
    write_study_results(work, results)
    return results


PACK_KIND = "genattr.counterfactual_pack"
PACK_FORMAT_VERSION = 1


def pack_outcomes(
    outcomes: Sequence[CaseOutcome],
    *,
    labels: Sequence[str],
    path: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A study's outcomes in one small .npz (no weights, no images): `meta` (JSON: labels,
    cases with their prompt types, and `extra`, e.g. the spec and leave-K-out summaries) and
    per case `<id>/masks`, `<id>/margins`, `<id>/answers`, `<id>/scores/<slug>`; what a
    report recomputes LDS and the exemplar comparison from (`load_packed_outcomes`)."""
    meta = {
        "kind": PACK_KIND,
        "format_version": PACK_FORMAT_VERSION,
        "labels": list(labels),
        "cases": [{"id": o.id, "prompt_types": o.prompt_types} for o in outcomes],
        **(extra or {}),
    }
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    for o in outcomes:
        arrays.update({f"{o.id}/masks": o.masks, f"{o.id}/margins": o.margins})
        arrays[f"{o.id}/answers"] = o.answers
        arrays.update({f"{o.id}/scores/{slug(k)}": o.scores[k] for k in labels})
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, allow_pickle=False, **arrays)
    return path


def load_packed_outcomes(path: str | Path) -> tuple[list[CaseOutcome], dict[str, Any]]:
    """The outcomes and meta `pack_outcomes` wrote."""
    with np.load(path, allow_pickle=False) as got:
        meta = json.loads(str(got["meta"]))
        if meta.get("kind") != PACK_KIND or meta.get("format_version") != PACK_FORMAT_VERSION:
            raise GenattrError(f"{path}: not a packed counterfactual study (version 1)")
        outcomes = [
            CaseOutcome(
                c["id"],
                got[f"{c['id']}/masks"],
                got[f"{c['id']}/margins"],
                {k: got[f"{c['id']}/scores/{slug(k)}"] for k in meta["labels"]},
                got[f"{c['id']}/answers"],
                c["prompt_types"],
            )
            for c in meta["cases"]
        ]
    return outcomes, meta
