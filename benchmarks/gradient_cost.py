"""Seconds per image of `genattr.methods.projected_gradients` on the tests' tiny SD-shaped
pipeline (16x16x4 latents): 4 fixed timesteps, proj_dim 2048, one torch thread, both parameter
sets and both outputs, 32 images after a 2-image warm-up.

    PYTHONPATH=. .venv/bin/python benchmarks/gradient_cost.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tests.tiny_sd import build_tiny_pipeline

from genattr.methods import GradientSpec, projected_gradients


def main() -> None:
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_pipeline(Path(tempfile.mkdtemp())))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    lat, txt = torch.randn((32, 4, 16, 16), generator=g), torch.randn((32, 77, 32), generator=g)
    for params in ("cross_attn_kv", "all"):
        for output in ("loss", "square_norm"):
            spec = GradientSpec(params=params, output=output)
            projected_gradients(pipe.unet, sched, lat[:2], txt[:2], spec)  # warm-up
            t0 = time.perf_counter()
            projected_gradients(pipe.unet, sched, lat, txt, spec)
            print(f"{params:14s} {output:12s} {(time.perf_counter() - t0) / 32:.3f} s/image")


if __name__ == "__main__":
    main()
