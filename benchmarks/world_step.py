"""Seconds per training step of the world's base model, attention at the lowest resolution only
(the default) against attention at the two lowest (16x16 too), in one run on the same batches;
with `--bf16`, also the default under bf16 autocast, and with `--compile`, the default with the
UNet under `torch.compile` (neither is used: bf16 was slower and torch.compile no faster on the
CPUs tried here).

    .venv/bin/python benchmarks/world_step.py [--steps 4] [--threads 1] [--bf16] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

from genattr.world.base import BaseConfig
from genattr.world.clipart import load_data
from genattr.world.training import BaseTrainer
from harness import emit_row


def seconds_per_step(
    levels: int, steps: int, images, captions, bf16: bool = False, compiled: bool = False
) -> tuple[float, float]:
    cfg = BaseConfig(attention_levels=levels)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as d, ctx:
        tr = BaseTrainer(d, images, captions, cfg)
        params = sum(p.numel() for p in tr.unet.parameters()) / 1e6
        if compiled:
            tr.unet.forward = torch.compile(tr.unet.forward)
        t0 = time.perf_counter()
        tr.train_step()  # warm-up (and compilation)
        tr.train_step()
        if compiled:
            print(f"compilation and two warm-up steps: {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        return (time.perf_counter() - t0) / steps, params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data()
    idx = data.indices("pretrain")
    images, captions = data.images[idx], data.captions(idx)
    base, p1 = seconds_per_step(1, args.steps, images, captions)
    more, p2 = seconds_per_step(2, args.steps, images, captions)
    print(
        f"attention at 8x8 only:        {base:.2f} s/step ({1 / base:.3f} steps/s), UNet {p1:.1f}M"
    )
    print(
        f"attention at 8x8 and 16x16:   {more:.2f} s/step ({1 / more:.3f} steps/s), UNet {p2:.1f}M"
    )
    print(f"ratio: {more / base:.2f}x  (batch {BaseConfig().batch_size}, {args.threads} thread(s))")
    steps = {"attention 8x8": base, "attention 8x8 and 16x16": more}
    emit_row("world_step", threads=args.threads, seconds_per_step=steps, ratio=more / base)
    if args.bf16:
        half, _ = seconds_per_step(1, args.steps, images, captions, bf16=True)
        print(f"8x8 only, bf16 autocast:      {half:.2f} s/step, {half / base:.2f}x fp32's time")
    if args.compile:
        comp, _ = seconds_per_step(1, args.steps, images, captions, compiled=True)
        print(f"8x8 only, torch.compile:      {comp:.2f} s/step, {comp / base:.2f}x eager's time")


if __name__ == "__main__":
    main()
