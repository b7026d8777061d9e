"""Heads distilled from a slow method and from the counterfactual margins, on the world's
counterfactual study, measured like FastGDA (mAP@k against the teacher) and by the study's
own protocol (LDS, exemplar mAP, leave-K-out) on the same queries as every other method.

    .venv/bin/python experiments/distill_world.py STUDY --world-sets 16 --models 8 \
        --validation set016-0 set016-1 [--leave-k-out 2 --shard I/N]

Features: world-cnn image features joined with MiniLM text features (the query's prompt,
the training image's caption) as `text_aware(w = 0.5)`, the 'world-cnn + text' method's
space (a head still at its identity start scores exactly as that method; checked).
Teachers, per model: the square-norm gradient (the best model-based method scored on every
query) and the margin contrast (`genattr.counterfactual.margin_contrast`: the margins
themselves). Folds: the models in pairs; each pair's queries are scored by a head distilled
from the other models' teachers, pooled into one teacher matrix over all their training
images (another model's images are NaN for a query: never ranked, drawn as outliers). The
head kind and epochs are chosen on the validation pair only, by mAP@4 against the teacher
(STUDY/distill/tuning.json). The heads' scores join STUDY as labels 'distilled (<teacher>)'
and the margins teacher as 'margin contrast', so `counterfactual_table.py` and leave-K-out
read them like any method. Prints the FastGDA-shaped table over the test models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from genattr.atomic import write_text_atomic
from genattr.counterfactual import lds, margin_contrast, summarize
from genattr.features.embedder import embed_images
from genattr.features.registry import get_backbone
from genattr.features.text import clean_prompt, load_text_encoder, text_aware
from genattr.heads.distill import DistillConfig, distill_heads, teacher_map
from genattr.vectors import embed
from genattr.workflows.counterfactual import Engine, SetCase, StudySpec, world_set_cases
from genattr.workflows.counterfactual_scores import (
    RANDOM,
    exemplar_results,
    lds_per_query,
    leave_k_out,
    read_outcomes,
    save_scores,
    scored_labels,
)
from genattr.world.base import base_model_dir

GRADIENT = "gradient (square norm)"
CONTRAST = "margin contrast"
TEACHERS = {GRADIENT: "square norm", CONTRAST: "margins"}
TEXT_WEIGHT = 0.5
K = 4  # mAP@k against the teacher: its top quarter of a model's 16 images
GRID = {  # head settings tried on the validation pair (FastGDA's MLP: lr 1e-3, dropout 0.1)
    "channel": {"head": "channel", "shared": True},
    "linear": {"head": "linear"},
    "linear shared": {"head": "linear", "shared": True},
    "fastgda": {"head": "fastgda", "shared": True, "init_scale": 1.0},
}
EPOCHS = (3, 10, 30, 100)


def student_label(teacher: str) -> str:
    return f"distilled ({TEACHERS[teacher]})"


def case_features(cases: list[SetCase], cache: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """case id -> (query features, training-image features), text-aware, cached."""
    if cache.is_file():
        got = np.load(cache)
        return {c.id: (got[f"{c.id}/q"], got[f"{c.id}/t"]) for c in cases}
    backbone, text = get_backbone("world-cnn"), load_text_encoder("minilm")
    out = {}
    for case in cases:
        pair = []
        for images, words in (
            (case.queries.images, case.queries.prompts),
            (case.train.images, case.train.prompts),
        ):
            img = embed_images(backbone, [Image.fromarray(a) for a in images])
            txt = text.encode([clean_prompt(w) for w in words], progress=False)
            pair.append(text_aware(img, txt, TEXT_WEIGHT))
        out[case.id] = tuple(pair)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{k}/{s}": v[i] for k, v in out.items() for i, s in enumerate("qt")})
    return out


def fit(
    train: list[str],
    feats: dict[str, tuple[np.ndarray, ...]],
    teacher: dict[str, np.ndarray],
    config: DistillConfig,
) -> Any:
    """One head over the training models' queries and images; a query's teacher row is NaN
    on every other model's images."""
    queries = np.concatenate([feats[c][0] for c in train])
    candidates = np.concatenate([feats[c][1] for c in train])
    scores = np.full((len(queries), len(candidates)), np.nan)
    r = c = 0
    for case in train:
        t = teacher[case]
        scores[r : r + t.shape[0], c : c + t.shape[1]] = t
        r, c = r + t.shape[0], c + t.shape[1]
    return distill_heads(
        torch.from_numpy(queries), torch.from_numpy(candidates), scores, config
    ).mappers


def head_scores(mappers: Any, pair: tuple[np.ndarray, ...]) -> np.ndarray:
    with torch.no_grad():
        q = embed(torch.from_numpy(pair[0]), mappers.synth)
        t = embed(torch.from_numpy(pair[1]), mappers.real)
        return (q @ t.T).numpy().astype(np.float64)


def config_of(setting: str, epochs: int) -> DistillConfig:
    return DistillConfig(cutoff=16, epochs=epochs, batch_size=256, **GRID[setting])


def tune(
    ids: list[str], val: list[str], feats: dict, teachers: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Every setting trained on the non-validation models, scored on the validation ones."""
    train = [c for c in ids if c not in val]
    out: dict[str, Any] = {"validation": val, "k": K, "teachers": {}}
    for name, teacher in teachers.items():
        raw = [teacher_map(feats[c][0] @ feats[c][1].T, teacher[c], K) for c in val]
        print(f"{name}: raw features: validation mAP@{K} {np.concatenate(raw).mean():.3f}")
        scored = {}
        for setting in GRID:
            for epochs in EPOCHS:
                mappers = fit(train, feats, teacher, config_of(setting, epochs))
                ap = [teacher_map(head_scores(mappers, feats[c]), teacher[c], K) for c in val]
                key = f"{setting}, {epochs} epochs"
                scored[key] = float(np.concatenate(ap).mean())
                print(f"{name}: {key}: validation mAP@{K} {scored[key]:.3f}")
        best = max(scored, key=lambda s: scored[s])
        out["teachers"][name] = {
            "raw_validation_map": float(np.concatenate(raw).mean()),
            "validation_map": scored,
            "chosen": best,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--world-sets", type=int, default=16)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--validation", nargs="+", required=True, help="case ids to tune on")
    ap.add_argument("--leave-k-out", type=int, default=0, help="queries per model")
    ap.add_argument("--shard", default="0/1", help="I/N: this process's share of retraining")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = world_set_cases(args.study, size=args.world_sets, models=args.models)
    ids = [c.id for c in cases]
    work = args.study / "distill"
    feats = case_features(cases, work / "features.npz")
    outcomes = read_outcomes(cases, work=args.study, labels=[GRADIENT, "world-cnn + text"])
    for case, o in zip(cases, outcomes, strict=True):  # the features are the method's
        np.testing.assert_allclose(
            feats[case.id][0] @ feats[case.id][1].T, o.scores["world-cnn + text"], atol=1e-4
        )
    teachers = {
        GRADIENT: {o.id: o.scores[GRADIENT] for o in outcomes},
        CONTRAST: {o.id: margin_contrast(o.masks, o.margins.mean(axis=0)) for o in outcomes},
    }
    tuning_path = work / "tuning.json"
    if not tuning_path.is_file():
        write_text_atomic(
            tuning_path, json.dumps(tune(ids, args.validation, feats, teachers), indent=1)
        )
    tuning = json.loads(tuning_path.read_text())
    missing = [c for c in cases if student_label(CONTRAST) not in scored_labels(args.study, c)]
    if missing:
        folds = [ids[i : i + 2] for i in range(0, len(ids), 2)]
        found: dict[str, dict[str, np.ndarray]] = {c: {} for c in ids}
        for name, teacher in teachers.items():
            setting, epochs = tuning["teachers"][name]["chosen"].split(", ")
            for held in folds:
                train = [c for c in ids if c not in held]
                mappers = fit(train, feats, teacher, config_of(setting, int(epochs.split()[0])))
                for c in held:
                    found[c][student_label(name)] = head_scores(mappers, feats[c])
        for case in cases:
            save_scores(args.study, case, {CONTRAST: teachers[CONTRAST][case.id], **found[case.id]})
    report(args, cases, teachers, tuning)
    if args.leave_k_out:
        run_leave_k_out(args, cases)


def report(args: argparse.Namespace, cases: list[SetCase], teachers: dict, tuning: dict) -> None:
    test = [c for c in cases if c.id not in args.validation]
    common = set.intersection(*(set(scored_labels(args.study, c)) for c in test))
    labels = [x for x in scored_labels(args.study, test[0]) if x in common and "[" not in x]
    outcomes = read_outcomes(test, work=args.study, labels=labels)
    values, ceiling = lds_per_query(outcomes, labels)
    complete = [k for k in labels if np.isfinite(values[k]).all()]
    ex = exemplar_results(outcomes, complete, values)
    cross = []  # the margins teacher read from one seed, its LDS against the other seed
    for o in outcomes:
        for r in range(o.margins.shape[0]):
            other = np.delete(o.margins, r, axis=0).mean(axis=0)
            cross.append(lds(margin_contrast(o.masks, o.margins[r]), o.masks, other))
    rows: dict[str, Any] = {}
    for label in complete:
        row: dict[str, Any] = {"lds": summarize(values[label]).as_dict()}
        for name, teacher in teachers.items():
            ap = [teacher_map(o.scores[label], teacher[o.id], K) for o in outcomes]
            row[f"map@{K} vs {TEACHERS[name]}"] = summarize(np.concatenate(ap)).as_dict()
        row["exemplar_map"] = ex["methods"][label]["map"]
        rows[label] = row
    cross_lds = summarize(np.mean(np.reshape(cross, (len(outcomes), -1, 16)), axis=1).ravel())
    out = {
        "models": [c.id for c in test],
        "queries": len(ceiling),
        "ceiling": summarize(ceiling).as_dict(),
        "margin_contrast_cross_seed_lds": cross_lds.as_dict(),
        "exemplar_chance": ex["chance"],
        "tuning": tuning,
        "methods": rows,
    }
    write_text_atomic(args.study / "distill" / "results.json", json.dumps(out, indent=1))
    cols = [f"map@{K} vs square norm", f"map@{K} vs margins", "lds", "exemplar_map"]
    print(
        f"\n{len(test)} test models, {len(ceiling)} queries; ceiling {out['ceiling']['mean']:.3f}"
    )
    print(
        "margin contrast read from one seed, LDS against the other: "
        f"{cross_lds.mean:+.3f} +- {cross_lds.se:.3f}"
    )
    print("| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for label, row in sorted(rows.items(), key=lambda kv: -kv[1]["lds"]["mean"]):
        print(
            f"| {label} | "
            + " | ".join(f"{row[c]['mean']:.3f} +- {row[c]['se']:.3f}" for c in cols)
            + " |"
        )


def run_leave_k_out(args: argparse.Namespace, cases: list[SetCase]) -> None:
    """Leave-K-out for the students beside the teachers, the best feature method, random and
    the strongest query-blind control, on the queries the study's table used (units that
    exist are read, not retrained)."""
    doc = json.loads((args.study / "study.json").read_text())
    study = json.loads((args.study / "results.json").read_text())
    control = study.get("leave_k_out", {}).get("control")
    labels = [
        *(student_label(t) for t in TEACHERS), GRADIENT, CONTRAST, "world-cnn + text", RANDOM,
        *([control] if control else []),
    ]  # fmt: skip
    index, count = (int(x) for x in args.shard.split("/"))
    loo = leave_k_out(
        cases, base=base_model_dir(), work=args.study, spec=StudySpec(**doc["spec"]),
        labels=labels, control=control, queries_per_case=args.leave_k_out,
        shard=(index, count), engine=Engine(),
    )  # fmt: skip
    if loo is None:
        print("leave-K-out: other shards' units are missing; run again when they finish")
        return
    write_text_atomic(args.study / "distill" / "leave_k_out.json", json.dumps(loo, indent=1))
    for label, by_k in loo["methods"].items():
        cells = [
            f"K={f}: rise {v['rise']['mean']:.3f} +- {v['rise']['se']:.3f}, "
            f"pixel {v['pixel_change']['mean']:.3f}" for f, v in by_k.items()
        ]  # fmt: skip
        print(f"{label}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
