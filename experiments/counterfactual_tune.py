"""Choose each method's hyperparameters on validation models, never on the reported ones.

For every tunable family (TRAK's damping, the gradients' number of timesteps, the text
weight of text-aware features) each setting on a small grid is scored on the validation
cases of a study (`genattr counterfactual --out STUDY`, its margins built), the setting with
the highest mean LDS there is kept, and only that setting is then scored on the other cases,
which the reported table (`counterfactual_table.py STUDY --exclude ...`) reads. Writes
STUDY/tuning.json (every setting's validation LDS and the choice).

    .venv/bin/python experiments/counterfactual_tune.py STUDY --world-sets 16 --models 8 \
        --validation set016-0 set016-1

Scores are saved in the study under labels such as `trak (loss) [damping=0.1]`, so a rerun
scores nothing twice. One process; each case retrains its full model once per call.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from genattr.atomic import write_text_atomic
from genattr.workflows.counterfactual import world_set_cases
from genattr.workflows.counterfactual_scores import lds_per_query, read_outcomes, score_cases
from genattr.workflows.model_methods import FeatureMethod, ScoringMethod, make_method
from genattr.world.base import base_model_dir

SIXTEEN = [(2 * i + 1) * 1000 // 32 for i in range(16)]  # the world's 1,000-step schedule


def grid() -> dict[str, dict[str, tuple[str, ScoringMethod]]]:
    """family -> setting -> (label, method); the shipped setting keeps the family's label."""

    def gradient(**kw: Any) -> ScoringMethod:
        return make_method("gradient", **kw)

    return {
        "trak (loss)": {
            f"damping={d:g}": (
                "trak (loss)" if d == 1e-3 else f"trak (loss) [damping={d:g}]",
                gradient(kernel="trak", damping=d),
            )
            for d in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
        },
        "gradient (loss)": {
            "timesteps=4": ("gradient (loss)", gradient()),
            "timesteps=16": ("gradient (loss) [timesteps=16]", gradient(timesteps=SIXTEEN)),
        },
        "gradient (square norm)": {
            "timesteps=4": ("gradient (square norm)", gradient(output="square_norm")),
            "timesteps=16": (
                "gradient (square norm) [timesteps=16]",
                gradient(output="square_norm", timesteps=SIXTEEN),
            ),
        },
        "world-cnn + text": {
            f"text_weight={w:g}": (
                "world-cnn + text" if w == 0.5 else f"world-cnn + text [text_weight={w:g}]",
                FeatureMethod(backbone="world-cnn", text_weight=w),
            )
            for w in (0.25, 0.5, 0.75)
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--world-sets", type=int, default=16)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--validation", nargs="+", required=True, help="case ids to tune on")
    args = ap.parse_args()
    cases = world_set_cases(args.study, size=args.world_sets, models=args.models)
    val = [c for c in cases if c.id in args.validation]
    test = [c for c in cases if c.id not in args.validation]
    if len(val) != len(args.validation):
        raise SystemExit(f"unknown validation case among {args.validation}")
    base = base_model_dir()
    families = grid()
    every = {label: m for settings in families.values() for label, m in settings.values()}
    score_cases(val, base=base, work=args.study, methods=every)
    values, _ = lds_per_query(read_outcomes(val, work=args.study, labels=list(every)), list(every))
    out: dict[str, Any] = {"validation": args.validation, "families": {}}
    chosen = {}
    for family, settings in families.items():
        lds_of = {s: float(np.nanmean(values[label])) for s, (label, _) in settings.items()}
        best = max(lds_of, key=lambda s: lds_of[s])
        chosen[settings[best][0]] = settings[best][1]
        out["families"][family] = {"validation_lds": lds_of, "chosen": best}
        print(f"{family}: " + ", ".join(f"{s} {v:+.3f}" for s, v in lds_of.items()) + f" -> {best}")
    score_cases(test, base=base, work=args.study, methods=chosen)
    out["chosen_labels"] = list(chosen)
    write_text_atomic(args.study / "tuning.json", json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
