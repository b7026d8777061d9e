"""Per-sample gradients in batches against the bare batched forward+backward, in one run.

    .venv/bin/python benchmarks/gradient_batch.py [--images 32] [--batch 8] [--rounds 3]

The world's base UNet (float32, CPU, the threads torch has), the gradient attributor's
default spec (4 fixed timesteps, the cross-attention key/value weights), the world
gallery's first images with their captions. Three ways, alternating in each round:
- `per image`: one forward and backward per image (how the attributor ran before);
- `batched`: `iter_gradients` with `--batch` images per pass (the per-sample trick);
- `bare`: the same batched forward, and a backward of the summed output to the same weights
  (the gradient of the sum, not per image): the floor any per-sample method pays.
Prints images/s of each and the ratios batched/bare and per-image/batched (median over
rounds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDPMScheduler

from genattr.methods.gradient import (
    GradientSpec,
    denoising_outputs,
    fixed_noises,
    grad_only,
    iter_gradients,
    select_parameters,
    spec_timesteps,
)
from genattr.workflows.model_cases import encode, world_gallery
from genattr.world.base import load_world_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    pipe = load_world_base()
    unet, sched = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    gallery = world_gallery()
    latents, text = encode(pipe, gallery.images[: args.images], gallery.prompts[: args.images])
    spec = GradientSpec()
    params = [p for _, p in select_parameters(unet, spec.params)]
    ts = spec_timesteps(spec, sched.config.num_train_timesteps)
    noises = fixed_noises(spec, tuple(latents.shape[1:]), len(ts))
    steps = torch.tensor(ts)

    def summed(lat: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return denoising_outputs(unet, sched, lat, txt, timesteps=steps, noises=noises).sum()

    def per_image() -> None:
        with grad_only(unet, params):
            for i in range(len(latents)):
                torch.autograd.grad(summed(latents[i : i + 1], text[i : i + 1]), params)

    def batched() -> None:
        for _ in iter_gradients(unet, sched, latents, text, spec, batch_size=args.batch):
            pass

    def bare() -> None:
        with grad_only(unet, params):
            for s in range(0, len(latents), args.batch):
                b = slice(s, s + args.batch)
                torch.autograd.grad(summed(latents[b], text[b]), params)

    ways = {"per image": per_image, "batched": batched, "bare": bare}
    rates: dict[str, list[float]] = {k: [] for k in ways}
    batched()  # warm up
    for r in range(args.rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(len(latents) / (time.perf_counter() - t0))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    slow = [b / a for a, b in zip(rates["batched"], rates["bare"], strict=True)]
    gain = [a / b for a, b in zip(rates["batched"], rates["per image"], strict=True)]
    print(
        f"threads {torch.get_num_threads()}, {args.images} images, batch {args.batch}: "
        + ", ".join(f"{k} {statistics.median(v):.1f} images/s" for k, v in rates.items())
        + f"; batched costs {statistics.median(slow):.2f}x the bare pass "
        f"({min(slow):.2f}-{max(slow):.2f}), {statistics.median(gain):.2f}x faster than per image"
    )


if __name__ == "__main__":
    main()
