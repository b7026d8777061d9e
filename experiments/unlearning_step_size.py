"""How far must the world model move to unlearn a query? For one query per prompt type of a
world test model: 10 unlearning steps at 1, 10, 100 and 1000 times AbU's step size rescaled
to the world UNet (`resolved_step_size`), the query's loss before and after, and the loss
change and rank of the model's exemplar among 200 random pre-training images.

    PYTHONPATH=. .venv/bin/python experiments/unlearning_step_size.py --work DIR --model object-000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from genattr.methods.gradient import select_parameters
from genattr.methods.unlearning import (
    UnlearningSpec,
    fisher_diagonal,
    image_losses,
    resolved_step_size,
    unlearned,
)
from genattr.workflows.model_cases import encode, world_cases, world_gallery

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="object-000")
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 10, 100, 1000])
    args = ap.parse_args()
    torch.set_num_threads(1)
    (case,) = world_cases(args.work, [args.model], 4)
    pipe = case.load().pipe  # a LoadedModel: (pipe, key)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gallery = world_gallery()
    sub = gallery.take(np.random.default_rng(0).choice(len(gallery), 200, replace=False))
    ex = case.exemplars()
    lat, txt = encode(pipe, np.concatenate([sub.images, ex.images]), sub.prompts + ex.prompts)
    n_params = sum(p.numel() for _, p in select_parameters(pipe.unet, "cross_attn_kv"))
    eta = resolved_step_size(UnlearningSpec(), n_params)
    base_spec = UnlearningSpec(steps=10, step_size=eta * 10)
    fisher = fisher_diagonal(pipe.unet, sched, lat[::4], txt[::4], base_spec)
    base = image_losses(pipe.unet, sched, lat, txt, base_spec)
    rows = []
    for ptype, q in case.concepts[0].queries.items():
        q_lat, q_txt = encode(pipe, q.images[:1], q.prompts[:1])
        for scale in args.scales:
            spec = UnlearningSpec(steps=10, step_size=eta * 10 * scale)
            t0 = time.perf_counter()
            with unlearned(pipe.unet, sched, q_lat, q_txt, fisher=fisher, spec=spec):
                after = image_losses(pipe.unet, sched, lat, txt, spec)
                q_after = float(image_losses(pipe.unet, sched, q_lat, q_txt, spec)[0])
            q_before = float(image_losses(pipe.unet, sched, q_lat, q_txt, spec)[0])
            d = after - base
            n_ex = len(ex)
            rows.append(
                {
                    "prompt_type": ptype,
                    "scale": scale,
                    "query_loss": [q_before, q_after],
                    "exemplar_change": d[-n_ex:].tolist(),
                    "gallery_median_change": float(np.median(d[:-n_ex])),
                    "exemplar_rank": [int((d[:-n_ex] > e).sum()) + 1 for e in d[-n_ex:]],
                    "of": len(d) - n_ex + 1,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            emit_row("unlearning_step_size", model=args.model, **rows[-1])


if __name__ == "__main__":
    main()
