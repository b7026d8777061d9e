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
`--abc-head DIR`: also score a head trained on the world's AbC benchmark (`genattr demo
--out D`: D/heads/world-cnn), on image features alone and beneath the text blend.

`--more-teachers DIR`: a folder where the square-norm gradient is scored (`score_cases`,
each model retrained once; 22 min for the 8 sets of 64 images on one core) on more world
models, of `--more-sets` images; a third student learns that teacher from them as well
(does more teacher data help?). `--more-queries N`: another square-norm student also
trained on N new samples of each prompt of each training model (its teacher scored under
the retrained full-set model): more queries from the same models.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from genattr.atomic import write_text_atomic
from genattr.counterfactual import lds, margin_contrast, paired_difference, summarize
from genattr.features.embedder import embed_images
from genattr.features.registry import get_backbone
from genattr.features.text import clean_prompt, load_text_encoder, text_aware
from genattr.heads.distill import DistillConfig, distill_heads, pool_teachers, teacher_map
from genattr.vectors import embed
from genattr.workflows.counterfactual import (
    Engine,
    Retrainer,
    SetCase,
    StudySpec,
    Unit,
    world_set_cases,
)
from genattr.workflows.counterfactual_scores import (
    RANDOM,
    exemplar_results,
    lds_per_query,
    leave_k_out,
    load_scores,
    read_outcomes,
    save_scores,
    score_cases,
    scored_labels,
)
from genattr.workflows.model_cases import ImageSet
from genattr.workflows.model_methods import FeatureMethod, make_method
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


def joint_features(space: tuple[Any, Any], images: np.ndarray, words: list[str]) -> np.ndarray:
    """The students' space: world-cnn image features and MiniLM text features, text-aware."""
    backbone, text = space
    img = embed_images(backbone, [Image.fromarray(a) for a in images])
    txt = text.encode([clean_prompt(w) for w in words], progress=False)
    return text_aware(img, txt, TEXT_WEIGHT)


def case_features(cases: list[SetCase], cache: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """case id -> (query features, training-image features), text-aware, cached."""
    if cache.is_file():
        got = np.load(cache)
        return {c.id: (got[f"{c.id}/q"], got[f"{c.id}/t"]) for c in cases}
    space = get_backbone("world-cnn"), load_text_encoder("minilm")
    out = {
        case.id: (
            joint_features(space, case.queries.images, case.queries.prompts),
            joint_features(space, case.train.images, case.train.prompts),
        )
        for case in cases
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{k}/{s}": v[i] for k, v in out.items() for i, s in enumerate("qt")})
    return out


@dataclass
class Plan:
    """One student: whose ranking it learns (`teacher`, on the study's models), its label,
    the teacher's scores per model id, and models outside the study always trained on."""

    teacher: str
    label: str
    scores: dict[str, np.ndarray]
    extra: list[str] = field(default_factory=list)
    epochs: tuple[int, ...] = EPOCHS
    more: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # id ->
    # (features, teacher rows) of more queries of that model, for training only


def fit(train: list[str], feats: dict, plan: Plan, config: DistillConfig) -> Any:
    """One head over the training models' queries (with the plan's extra queries of those
    models) and images; a query's teacher row is NaN on every other model's images."""
    blocks = []
    for case in train:
        q, t = feats[case][0], plan.scores[case]
        if case in plan.more:
            q, t = np.concatenate([q, plan.more[case][0]]), np.concatenate([t, plan.more[case][1]])
        blocks.append((q, feats[case][1], t))
    queries = np.concatenate([b[0] for b in blocks])
    candidates = np.concatenate([b[1] for b in blocks])
    scores = pool_teachers([b[2] for b in blocks])
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


def tune(plan: Plan, ids: list[str], val: list[str], feats: dict) -> dict[str, Any]:
    """Every setting trained on the non-validation models, scored on the validation ones."""
    train = [c for c in ids if c not in val] + plan.extra
    teacher = plan.scores
    raw = float(
        np.concatenate(
            [teacher_map(feats[c][0] @ feats[c][1].T, teacher[c], K) for c in val]
        ).mean()
    )
    print(f"{plan.label}: raw features: validation mAP@{K} {raw:.3f}")
    scored = {}
    for setting in GRID:
        for epochs in plan.epochs:
            mappers = fit(train, feats, plan, config_of(setting, epochs))
            ap = [teacher_map(head_scores(mappers, feats[c]), teacher[c], K) for c in val]
            key = f"{setting}, {epochs} epochs"
            scored[key] = float(np.concatenate(ap).mean())
            print(f"{plan.label}: {key}: validation mAP@{K} {scored[key]:.3f}")
    best = max(scored, key=lambda s: scored[s])
    return {"raw_validation_map": raw, "validation_map": scored, "chosen": best}


def more_queries(
    cases: list[SetCase], work: Path, per_prompt: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """case id -> (features, square-norm teacher rows) of `per_prompt` new samples of each of
    its model's prompts (seeds from 10,000, the recorded sampler), under the full-set model
    (seed 0) retrained here; cached per case in WORK."""
    out = {}
    retrainer, method = None, make_method("gradient", output="square_norm")
    space = None  # models loaded only for a case not cached yet
    for case in cases:
        path = work / f"{case.id}-{per_prompt}.npz"
        if not path.is_file():
            retrainer = retrainer or Retrainer(base_model_dir())
            retrainer.train(case, Unit((True,) * len(case.train), 0))
            prompts = [p for p in case.queries.prompts for _ in range(per_prompt)]
            seeds = [10_000 + k for k in range(len(prompts))]
            images = retrainer.sample(case, prompts, seeds)
            queries = ImageSet(images, prompts, [f"{case.id}/more/{k}" for k in seeds])
            method.prepare(retrainer.pipe, [case.train], None, False)
            teacher = method.scores(retrainer.pipe, queries, False)
            space = space or (get_backbone("world-cnn"), load_text_encoder("minilm"))
            feats = joint_features(space, images, prompts)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, images=images, features=feats, teacher=teacher)
        got = np.load(path)
        out[case.id] = (got["features"], got["teacher"])
    return out


def plans_of(args: argparse.Namespace, outcomes: list, feats: dict) -> list[Plan]:
    """The students: one per teacher on the study's models; with --more-teachers, the
    square-norm student also trained on that folder's models (their teacher scored by
    `score_cases`, no margins needed)."""
    gradient = {o.id: o.scores[GRADIENT] for o in outcomes}
    plans = [
        Plan(GRADIENT, student_label(GRADIENT), gradient),
        Plan(
            CONTRAST,
            student_label(CONTRAST),
            {o.id: margin_contrast(o.masks, o.margins.mean(axis=0)) for o in outcomes},
        ),
    ]
    if args.more_teachers:
        more = world_set_cases(args.more_teachers, size=args.more_sets)
        method = {GRADIENT: make_method("gradient", output="square_norm")}  # as shipped
        score_cases(more, base=base_model_dir(), work=args.more_teachers, methods=method)
        feats.update(case_features(more, args.more_teachers / "distill-features.npz"))
        scores = {c.id: load_scores(args.more_teachers, c, [GRADIENT])[GRADIENT] for c in more}
        label = f"distilled (square norm, +{len(more)} models of {args.more_sets})"
        plans.append(Plan(GRADIENT, label, {**gradient, **scores}, list(scores), (3, 10, 30)))
    if args.more_queries:
        cases = world_set_cases(args.study, size=args.world_sets, models=args.models)
        more = more_queries(cases, args.study / "distill" / "more-queries", args.more_queries)
        n = len(cases[0].queries) * args.more_queries
        label = f"distilled (square norm, +{n} queries per model)"
        plans.append(Plan(GRADIENT, label, gradient, epochs=(3, 10, 30), more=more))
    return plans


def abc_heads(args: argparse.Namespace) -> dict[str, FeatureMethod]:
    """The AbC-trained head (image features) alone and beneath the text-aware blend."""
    head = str(args.abc_head)
    return {
        "world-cnn, AbC head": FeatureMethod(backbone="world-cnn", head=head),
        "world-cnn + text, AbC head": FeatureMethod(
            backbone="world-cnn", head=head, text_weight=TEXT_WEIGHT
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--world-sets", type=int, default=16)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--validation", nargs="+", required=True, help="case ids to tune on")
    ap.add_argument("--more-teachers", type=Path, help="a folder of more scored world models")
    ap.add_argument("--more-sets", type=int, default=64, help="their set size")
    ap.add_argument(
        "--abc", action="store_true", help="AbC mAP of students trained on every study model"
    )
    ap.add_argument("--abc-head", type=Path, help="a head folder trained on the AbC world")
    ap.add_argument(
        "--more-queries", type=int, default=0, help="new samples per prompt, square norm"
    )
    ap.add_argument("--leave-k-out", type=int, default=0, help="queries per model")
    ap.add_argument(
        "--fractions", type=float, nargs="+", default=[0.25], help="leave-K-out's K / N"
    )
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
    plans = plans_of(args, outcomes, feats)
    if args.abc_head:  # heads trained on the world's AbC benchmark (`genattr demo`'s)
        score_cases(cases, base="no model is loaded", work=args.study, methods=abc_heads(args))
    tuning_path = work / "tuning.json"
    tuning = (
        json.loads(tuning_path.read_text())
        if tuning_path.is_file()
        else {"validation": args.validation, "k": K, "students": {}}
    )
    for plan in plans:
        if plan.label not in tuning["students"]:
            tuning["students"][plan.label] = tune(plan, ids, args.validation, feats)
            write_text_atomic(tuning_path, json.dumps(tuning, indent=1))
    folds = [ids[i : i + 2] for i in range(0, len(ids), 2)]
    for plan in plans:
        if all(plan.label in scored_labels(args.study, c) for c in cases):
            continue
        setting, epochs = tuning["students"][plan.label]["chosen"].split(", ")
        found: dict[str, np.ndarray] = {}
        for held in folds:
            train = [c for c in ids if c not in held] + plan.extra
            config = config_of(setting, int(epochs.split()[0]))
            mappers = fit(train, feats, plan, config)
            for c in held:
                found[c] = head_scores(mappers, feats[c])
        for case in cases:
            save_scores(args.study, case, {plan.label: found[case.id]})
    contrast = plans[1].scores
    for case in cases:
        if CONTRAST not in scored_labels(args.study, case):
            save_scores(args.study, case, {CONTRAST: contrast[case.id]})
    teachers = {GRADIENT: plans[0].scores, CONTRAST: contrast}
    report(args, cases, teachers, tuning)
    if args.abc:
        abc(args, plans, ids, feats, tuning)
    if args.leave_k_out:
        run_leave_k_out(args, cases, [p.label for p in plans])


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
    for label in (x for x in rows if x.endswith(", AbC head")):
        d = paired_difference(values[label], values[label.removesuffix(", AbC head")])
        print(f"{label}: LDS minus without the head {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
    for label in (x for x in rows if x.startswith("distilled")):
        teacher = GRADIENT if "square norm" in label else CONTRAST
        kept = rows[label]["lds"]["mean"] / rows[teacher]["lds"]["mean"]
        d = paired_difference(values[label], values[teacher])
        start = paired_difference(values[label], values["world-cnn + text"])
        print(
            f"{label}: keeps {kept:.0%} of {teacher}'s LDS "
            f"(difference {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]); minus its start, "
            f"world-cnn + text: {start.mean:+.3f} [{start.low:+.3f}, {start.high:+.3f}]"
        )


def abc(args: argparse.Namespace, plans: list[Plan], ids: list[str], feats: dict, tuning: dict):
    """The world benchmark's AbC test cases (gallery: the pre-training images and the query's
    exemplars; `world_text.py`'s protocol at w = 0.5) through each student trained on every
    study model, beside the raw features, with the shuffled-prompt control and chance."""
    from world_text import chance, evaluate_case, image_space, shuffled, text_space, world_cases

    heads: dict[str, Any] = {"world-cnn + text": None}
    for plan in plans:
        setting, epochs = tuning["students"][plan.label]["chosen"].split(", ")
        config = config_of(setting, int(epochs.split()[0]))
        heads[plan.label] = fit(ids + plan.extra, feats, plan, config)
        if setting == "channel":  # how much the rescaling leans on the text dimensions
            w = heads[plan.label].real.weights.detach().numpy().ravel() ** 2
            text = w[-load_text_encoder("minilm").dim :].sum() / w.sum()
            print(f"{plan.label}: text dimensions' share of the squared weights {text:.3f}")
    embed_image, embed_text = image_space("world-cnn"), text_space(load_text_encoder("minilm"))
    out: dict[str, Any] = {}
    print("\nAbC protocol, world test models, w = 0.5: mAP / Recall@10 (shuffled prompt)")
    print("| case | chance | " + " | ".join(heads) + " |\n|---|---|" + "---|" * len(heads))
    for name, (case, _) in world_cases(["object", "unobserved", "style"], ["test"]).items():
        rng = np.random.default_rng(0)
        draws = [shuffled(case.query_prompts, case.query_model_ids, rng) for _ in range(3)]
        n_own = np.diff(np.asarray(case.exemplar_chunks), axis=1)[case.query_model_ids, 0]
        out[name] = {"chance": chance(len(case.gallery_images), n_own)}
        for label, mappers in heads.items():
            got = evaluate_case(
                case, embed_image, embed_text, (0.5,), {"shuffled prompt": draws}, heads=mappers
            )
            out[name][label] = {v: r["0.5"] for v, r in got.items()}
        cells = [
            f"{r['prompt']['mAP']:.3f} / {r['prompt']['R@10']:.2f} "
            f"({r['shuffled prompt']['mAP']:.3f})"
            for label, r in out[name].items()
            if label != "chance"
        ]
        print(f"| {name} | {out[name]['chance']['mAP']:.4f} | " + " | ".join(cells) + " |")
    write_text_atomic(args.study / "distill" / "abc.json", json.dumps(out, indent=1))


def run_leave_k_out(args: argparse.Namespace, cases: list[SetCase], students: list[str]) -> None:
    """Leave-K-out for the students beside the teachers, the best feature method, random and
    the strongest query-blind control, on the queries the study's table used (units that
    exist are read, not retrained)."""
    doc = json.loads((args.study / "study.json").read_text())
    study = json.loads((args.study / "results.json").read_text())
    control = study.get("leave_k_out", {}).get("control")
    labels = [
        *students, GRADIENT, CONTRAST, "world-cnn + text",
        *(abc_heads(args) if args.abc_head else []), RANDOM,
        *([control] if control else []),
    ]  # fmt: skip
    index, count = (int(x) for x in args.shard.split("/"))
    loo = leave_k_out(
        cases, base=base_model_dir(), work=args.study, spec=StudySpec(**doc["spec"]),
        labels=labels, control=control, queries_per_case=args.leave_k_out,
        fractions=args.fractions,
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
