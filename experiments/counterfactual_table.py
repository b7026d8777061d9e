"""The counterfactual table of a study folder (`genattr counterfactual --out STUDY`): LDS per
method with its standard error and bootstrap interval, by prompt type and pooled, the
paired difference to random and to the best method, and the retraining-seed ceiling.

    .venv/bin/python experiments/counterfactual_table.py STUDY

Reads STUDY/study.json, each case's margins.npz and scores/, recomputing everything from
them with `genattr.counterfactual` (no model is loaded). A query's prompt type is the middle
part of its id (`set016-0/held-out/3`): the world's cases have `set` and `held-out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from genattr.counterfactual import lds, paired_difference, seed_ceiling, summarize
from genattr.workflows.counterfactual_scores import slug


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    args = ap.parse_args()
    header = json.loads((args.study / "study.json").read_text())
    per: dict[str, list[np.ndarray]] = {}
    ceiling, types = [], []
    for case in header["cases"]:
        folder = args.study / case["id"]
        got = np.load(folder / "margins.npz")
        labels = json.loads((folder / "scores" / "labels.json").read_text())
        target = got["margins"].mean(axis=0)
        for label in labels:
            scores = np.load(folder / "scores" / f"{slug(label)}.npy")
            per.setdefault(label, []).append(lds(scores, got["masks"], target))
        ceiling.append(seed_ceiling(got["margins"]))
        n_types = case["queries"] // 2  # the world's cases: set prompts, then held-out
        types += ["set"] * n_types + ["held-out"] * (case["queries"] - n_types)
    values = {k: np.concatenate(v) for k, v in per.items()}
    kind = np.array(types)
    best = max(values, key=lambda k: np.nanmean(values[k]))
    c = summarize(np.concatenate(ceiling))
    spec = header["spec"]
    print(f"{len(header['cases'])} models, {len(kind)} queries; {spec}")
    print(f"seed ceiling {c.mean:.3f} +- {c.se:.3f} [{c.low:.3f}, {c.high:.3f}]")
    print("| method | LDS, all queries | set prompts | held-out prompts | minus random | "
          f"minus best ({best}) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label, v in sorted(values.items(), key=lambda kv: -np.nanmean(kv[1])):
        s = summarize(v)
        by = [summarize(v[kind == t]) for t in ("set", "held-out")]
        r, b = paired_difference(v, values["random"]), paired_difference(v, values[best])
        print(
            f"| {label} | {s.mean:+.3f} +- {s.se:.3f} [{s.low:+.3f}, {s.high:+.3f}] | "
            + " | ".join(f"{x.mean:+.3f} +- {x.se:.3f}" for x in by)
            + f" | {r.mean:+.3f} [{r.low:+.3f}, {r.high:+.3f}] | "
            f"{b.mean:+.3f} [{b.low:+.3f}, {b.high:+.3f}] |"
        )


if __name__ == "__main__":
    main()
