"""The counterfactual tables of a study folder (`genattr counterfactual --out STUDY`), as
BENCHMARKS.md shows them: LDS per method with its standard error and bootstrap interval, by
prompt type and pooled, the paired difference to random and to the best method, and the
retraining-seed ceiling; the exemplar-as-answer mAP on the same queries and how far its
ranking of the methods agrees with LDS's; leave-K-out from STUDY/results.json.

    .venv/bin/python experiments/counterfactual_table.py STUDY --world-sets 16 --models 8 \
        --exclude set016-0 set016-1 --pack src/genattr/world/data/world_counterfactual16.npz

`--exclude`: the validation models the settings were tuned on; `--pack`: what `genattr demo`
shows; `--drop`: labels left out (the margin contrast written by `distill_world.py`, a
teacher whose LDS on these margins is in-sample).

Recomputed from each case's margins.npz and scores/ with `genattr.counterfactual` (no model
is loaded). Labels of settings not chosen on the validation models (STUDY/tuning.json) are
left out; `--shipped` leaves out every tuned setting (the table of all models).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from genattr.counterfactual import paired_difference, summarize
from genattr.workflows.counterfactual import world_set_cases
from genattr.workflows.counterfactual_scores import (
    RANDOM,
    exemplar_results,
    lds_per_query,
    pack_outcomes,
    read_outcomes,
    scored_labels,
)


def _labels(study: Path, every: list[str], shipped: bool) -> list[str]:
    """Every label but the grid settings tuning did not choose (with `shipped`, every grid
    setting left out: the methods as shipped, none tuned on any of the study's margins)."""
    tuning = study / "tuning.json"
    chosen = (
        set()
        if shipped or not tuning.is_file()
        else set(json.loads(tuning.read_text())["chosen_labels"])
    )
    return [x for x in every if "[" not in x or x in chosen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--world-sets", type=int, default=16)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--exclude", nargs="*", default=[], help="case ids to leave out")
    ap.add_argument("--pack", type=Path, help="also pack the cases shown into this .npz")
    ap.add_argument("--shipped", action="store_true", help="only the shipped settings")
    ap.add_argument(
        "--drop", nargs="*", default=["margin contrast"],
        help="labels left out (default: the margins teacher, whose LDS is in-sample)",
    )  # fmt: skip
    args = ap.parse_args()
    cases = world_set_cases(args.study, size=args.world_sets, models=args.models)
    cases = [c for c in cases if c.id not in args.exclude]
    common = set.intersection(*(set(scored_labels(args.study, c)) for c in cases))
    labels = _labels(
        args.study,
        [x for x in scored_labels(args.study, cases[0]) if x in common and x not in args.drop],
        args.shipped,
    )
    outcomes = read_outcomes(cases, work=args.study, labels=labels)
    values, ceiling = lds_per_query(outcomes, labels)
    kind = np.array([t for o in outcomes for t in o.prompt_types])
    complete = [k for k, v in values.items() if np.isfinite(v).all()]
    best = max(complete, key=lambda k: np.nanmean(values[k]))  # of those scored everywhere
    c = summarize(ceiling)
    spec = json.loads((args.study / "study.json").read_text())["spec"]
    print(f"{len(cases)} models ({', '.join(c.id for c in cases)}), {len(kind)} queries; {spec}")
    print(f"seed ceiling {c.mean:.3f} +- {c.se:.3f} [{c.low:.3f}, {c.high:.3f}]\n")
    refs = [RANDOM, *(["text alone"] if "text alone" in values else []), best]
    print("| method | LDS, all queries | set prompts | held-out prompts | "
          + " | ".join(f"minus {r}" for r in refs) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(refs))
    for label, v in sorted(values.items(), key=lambda kv: -np.nanmean(kv[1])):
        s = summarize(v)
        by = [summarize(v[kind == t]) for t in ("set", "held-out")]
        diffs = [paired_difference(v, values[r]) for r in refs]
        print(
            f"| {label} | {s.mean:+.3f} +- {s.se:.3f} [{s.low:+.3f}, {s.high:+.3f}] (n={s.n}) | "
            + " | ".join(f"{x.mean:+.3f} +- {x.se:.3f}" for x in by)
            + "".join(f" | {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" for d in diffs)
            + " |"
        )
    for partial in (k for k in values if k not in complete):
        rows = np.isfinite(values[partial])
        print(f"\non the {rows.sum()} queries {partial} scored:")
        print("| method | LDS | minus " + partial + " |\n|---|---|---|")
        for label, v in sorted(values.items(), key=lambda kv: -np.nanmean(kv[1][rows])):
            s, d = summarize(v[rows]), paired_difference(v[rows], values[partial][rows])
            diff = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
            print(f"| {label} | {s.mean:+.3f} +- {s.se:.3f} | {diff} |")
    ex = exemplar_results(outcomes, labels, values)
    print(f"\nexemplar ground truth: {ex['queries']} queries, chance mAP {ex['chance']:.3f}")
    print("| method | exemplar mAP | LDS on the same queries |\n|---|---|---|")
    for label, row in sorted(ex["methods"].items(), key=lambda kv: -kv[1]["map"]["mean"]):
        m, s = row["map"], row["lds"]
        print(f"| {label} | {m['mean']:.3f} +- {m['se']:.3f} | {s['mean']:+.3f} +- {s['se']:.3f} |")
    for which, agree in ex["agreement"].items():
        print(
            f"agreement ({which}, {agree['n']} labels): Spearman {agree['spearman']:+.2f}, "
            f"Kendall {agree['kendall']:+.2f}"
        )
    results = args.study / "results.json"
    loo = json.loads(results.read_text()).get("leave_k_out") if results.is_file() else None
    if args.pack:
        tuning = args.study / "tuning.json"
        extra = {
            "spec": spec,
            "validation": args.exclude,
            "tuning": json.loads(tuning.read_text()) if tuning.is_file() else None,
            "leave_k_out": loo,
        }
        pack_outcomes(outcomes, labels=labels, path=args.pack, extra=extra)
        print(f"packed: {args.pack} ({args.pack.stat().st_size:,} bytes)")
    if not loo:
        return
    print(
        f"\nleave-K-out ({loo['control']}); mean over queries +- se, "
        "[paired vs random] {paired vs the control}"
    )
    fractions = sorted(next(iter(loo["methods"].values())))
    for measure in ("rise", "pixel_change", "cnn_change"):
        print(f"\n{measure}\n| method | " + " | ".join(f"K = {f} N" for f in fractions) + " |")
        print("|---|" + "---|" * len(fractions))
        for label, by_k in loo["methods"].items():
            cells = []
            for f in fractions:
                s, d = by_k[f][measure], by_k[f]["minus_random"][measure]
                c = by_k[f]["minus_control"][measure]
                cells.append(
                    f"{s['mean']:.3f} +- {s['se']:.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                    f"{{{c['low']:+.3f}, {c['high']:+.3f}}}"
                )
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
