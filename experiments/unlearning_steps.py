"""Does the unlearning attributor need AbU's 100 small steps on the world, or do fewer, larger
steps (the same first-order movement: steps x step size fixed) rank the gallery the same way?
Scores of a few world queries under both settings: Spearman correlation of the score rows,
overlap of the top 100, the rank of the query model's exemplar, and seconds per query.

    PYTHONPATH=. .venv/bin/python experiments/unlearning_steps.py --work DIR --model object-000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genattr.methods.gradient import select_parameters
from genattr.methods.unlearning import UnlearningSpec, resolved_step_size
from genattr.workflows.model_cases import world_cases, world_gallery
from genattr.workflows.model_methods import UnlearningMethod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="object-000")
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--few", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    (case,) = world_cases(args.work, [args.model], args.queries)
    pipe = case.load().pipe  # a LoadedModel: (pipe, key)
    n_params = sum(p.numel() for _, p in select_parameters(pipe.unet, "cross_attn_kv"))
    eta = resolved_step_size(UnlearningSpec(), n_params)
    (concept,) = case.concepts
    queries = next(iter(concept.queries.values()))
    out = {}
    for steps in (100, args.few):
        spec = UnlearningSpec(steps=steps, step_size=eta * 100 / steps)
        m = UnlearningMethod(spec)
        m.prepare(pipe, [world_gallery(), case.exemplars()], None, False)
        t0 = time.perf_counter()
        s = m.scores(pipe, queries, False)
        out[steps] = (s, (time.perf_counter() - t0) / len(queries))
    a, b = out[100][0], out[args.few][0]
    rows = []
    for i in range(len(a)):
        rho = np.corrcoef(ranks(a[i]), ranks(b[i]))[0, 1]
        top = len(set(np.argsort(-a[i])[:100]) & set(np.argsort(-b[i])[:100]))
        own = [int((row > row[-1]).sum()) + 1 for row in (a[i], b[i])]
        rows.append({"spearman": rho, "top100_overlap": top, "exemplar_rank": own})
    res = {
        "model": args.model,
        "step_size_100": eta,
        "queries": rows,
        "seconds_per_query": {str(k): v[1] for k, v in out.items()},
    }
    print(json.dumps(res, indent=1))
    emit_row("unlearning_steps", **res)


if __name__ == "__main__":
    main()
