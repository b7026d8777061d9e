"""One retraining step, one gradient and one unlearning step on a Stable-Diffusion-1.x-sized
model (random weights, built from configs), on this machine: seconds and peak memory of each,
so a GPU user knows what the counterfactual protocol's parts need. An absolute cost per
step: a rehearsal of the real size, not a speed comparison.

    .venv/bin/python benchmarks/sd_rehearsal.py [--size sd1] [--resolution 512]

- retrain step: `Customizer.train` (Custom Diffusion's key/value weights, batch 2, fp32) for
  one step and for two, the second step's time the difference (loading and set-up apart);
- gradient: `projected_gradients` of one image (4 fixed timesteps, proj_dim 2048);
- margin: `image_losses` of one image at 16 fixed (timestep, noise) pairs (a study's unit
  measures every query this way);
- unlearning step: the Fisher diagonal of one image, then one step of `unlearned` with one
  (timestep, noise) pair per step (AbU uses 16: that many times the time).
Peak memory is the process's resident peak (VmHWM) since the step began.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from genattr.customize.config import CustomizeConfig
from genattr.customize.train import Customizer
from genattr.methods import GradientSpec, projected_gradients
from genattr.methods.unlearning import UnlearningSpec, fisher_diagonal, image_losses, unlearned
from harness import emit_row, peak_rss_mb, reset_peak_rss, sd_pipeline, timed


def step(name: str, fn, **fields) -> float:
    reset_peak_rss()
    seconds = timed(fn)
    peak = peak_rss_mb()
    print(f"{name:28s} {seconds:8.1f} s   peak RSS {peak / 1024:6.1f} GB", flush=True)
    emit_row("sd_rehearsal", step=name, seconds=seconds, peak_rss_mb=peak, **fields)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="sd1")
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    pipe = sd_pipeline(args.size)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    print(f"{args.size}: UNet {n_unet / 1e6:.0f} M parameters, {torch.get_num_threads()} threads")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        paths.append(folder / f"{k}.png")
        size = (args.resolution, args.resolution, 3)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(paths[-1])
    customizer = Customizer(pipe)
    config = CustomizeConfig(resolution=args.resolution, augment=False, hflip=False)

    def train(steps: int) -> None:
        cfg = CustomizeConfig(**{**config.record(), "max_train_steps": steps})
        customizer.train(paths, "captioned", config=cfg, captions=["a photo", "a drawing"])

    one = step("retrain: 1 step", lambda: train(1))
    two = step("retrain: 2 steps", lambda: train(2))
    print(f"{'retrain: one more step':28s} {two - one:8.1f} s")
    emit_row("sd_rehearsal", step="retrain: one more step", seconds=two - one)
    customizer.reset()

    side = args.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, side, side), generator=g)
    text = torch.randn((1, 77, pipe.text_encoder.config.hidden_size), generator=g)
    step("gradient: 1 image", lambda: projected_gradients(pipe.unet, sched, latents, text,
                                                           GradientSpec()))  # fmt: skip
    measure = UnlearningSpec(timesteps=list(range(31, 1000, 62)), samples_per_step=1, steps=1)
    step("margin: 1 image, 16 pairs", lambda: image_losses(pipe.unet, sched, latents, text,
                                                            measure))  # fmt: skip
    fisher: list[torch.Tensor] = []
    step("fisher: 1 image", lambda: fisher.extend(
        fisher_diagonal(pipe.unet, sched, latents, text, UnlearningSpec())))  # fmt: skip

    def unlearn() -> None:
        with unlearned(pipe.unet, sched, latents[0], text[0], fisher=fisher, spec=measure) as tr:
            list(tr)

    step("unlearning: 1 step, 1 pair", unlearn)


if __name__ == "__main__":
    main()
