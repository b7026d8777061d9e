"""Score a method too slow for every query (unlearning: 2-3 min per query on a world model
and one core) on a few queries of each case of a study, NaN elsewhere; LDS and the tables
then compare it with the others on the queries it scored (`paired_difference` leaves the
rest out).

    .venv/bin/python experiments/counterfactual_slow_methods.py STUDY --methods unlearning \
        --rows 0 15 --exclude set016-0 set016-1 --shard 0/2 &    # and --shard 1/2

Rows 0 and 15 of a world case are its first `set` and last `held-out` sample: the queries
leave-K-out uses. Shards split the cases.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genattr.workflows.counterfactual import world_set_cases
from genattr.workflows.counterfactual_scores import default_methods, score_cases
from genattr.world.base import base_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--world-sets", type=int, default=16)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["unlearning"])
    ap.add_argument("--rows", nargs="+", type=int, default=[0, 15])
    ap.add_argument("--exclude", nargs="*", default=[], help="case ids to leave out")
    ap.add_argument("--shard", default="0/1", help="I/N: this process's share of the cases")
    args = ap.parse_args()
    index, count = (int(x) for x in args.shard.split("/"))
    cases = world_set_cases(args.study, size=args.world_sets, models=args.models)
    cases = [c for c in cases if c.id not in args.exclude][index::count]
    score_cases(
        cases, base=base_model_dir(), work=args.study, methods=default_methods(args.methods),
        rows=args.rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
