"""Seconds per image of `genattr.methods.projected_gradients` on the tiny SD-shaped pipeline
(the tests' one, built by `harness.sd_pipeline`; 16x16x4 latents): 4 fixed timesteps, proj_dim
2048, one torch thread, both parameter sets and both outputs, 32 images after a 2-image warm-up.
An absolute cost: there is no bare reference in the run.

    .venv/bin/python benchmarks/gradient_cost.py
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from genattr.methods import GradientSpec, projected_gradients
from harness import emit_row, sd_pipeline, timed


def main() -> None:
    torch.set_num_threads(1)
    pipe = sd_pipeline("tiny")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    lat, txt = torch.randn((32, 4, 16, 16), generator=g), torch.randn((32, 77, 32), generator=g)
    for params in ("cross_attn_kv", "all"):
        for output in ("loss", "square_norm"):
            spec = GradientSpec(params=params, output=output)
            projected_gradients(pipe.unet, sched, lat[:2], txt[:2], spec)  # warm-up
            s = timed(lambda spec=spec: projected_gradients(pipe.unet, sched, lat, txt, spec)) / 32
            print(f"{params:14s} {output:12s} {s:.3f} s/image")
            emit_row("gradient_cost", params=params, output=output, seconds_per_image=s)


if __name__ == "__main__":
    main()
