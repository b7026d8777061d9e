"""Extraction against the bare forward of the same model on the same images, in one run.

    .venv/bin/python benchmarks/extract_floor.py [--models efficientnet-lite0 resnet50 vit-b16]
        [--n 1160] [--n-large 192] [--rounds 3]

Images: the world's pre-training PNGs (32 px clip-art; the backbones resize them), written to
a temporary folder. Models: EfficientNet-Lite0 with its real ImageNet weights (224 px); a
ResNet-50 as SSCD's architecture (transformers' ResNet-50 plus a 512-d projection, random
weights, 288 px, as SSCD's transform); ViT-B/16 (random weights, 224 px). Weights do not
change speed. ResNet-50 and ViT-B/16 run on the first --n-large images (they are slow).

Every configuration runs in a fresh process, since the allocator setting is process-wide:
- `before`: `extract()` as it ran by default before: one decode worker on a 2-core machine,
  the model on the remaining thread, glibc's allocator as it comes;
- `after`: `extract()` as `genattr extract` now runs it: the batch allocator setting
  (`genattr.alloc`) and decode workers chosen from the first batch;
- `bare`: the model alone over the same preprocessed tensors, batch 32, all threads, with
  and without the allocator setting.
Prints images/s, user and system CPU seconds, and the ratios after / before and after / bare
(same allocator setting). With --rounds R, `bare-tuned` and `after` run R times in turn
(`before` and `bare-plain` once, in the first round) and the table reports each ratio's median
over the rounds with its range (this VM's speed moves by tens of percent from one minute to
the next: a single pair of runs can land anywhere in 0.6-1.1x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # extract_speed's helpers


def resnet50_sscd_shape():
    """SSCD's architecture (ResNet-50 trunk, 512-d output) with random weights, 288 px."""
    from transformers import ResNetConfig, ResNetModel

    from genattr.features.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
    from genattr.features.registry import Backbone

    torch.manual_seed(0)
    trunk = ResNetModel(ResNetConfig()).eval()  # the default config is ResNet-50

    class Sscd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.proj = trunk, torch.nn.Linear(2048, 512)

        def forward(self, x):
            return self.proj(self.trunk(pixel_values=x).pooler_output.flatten(1))

    pre = ImagePreprocess(
        resize=288, interpolation="bilinear", crop=288, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    return Backbone("resnet50-sscd-random", 512, Sscd(), pre, pre.to_config())


def make(model: str):
    from extract_speed import make_backbone

    if model == "resnet50":
        return resnet50_sscd_shape()
    return make_backbone("auto" if model == "efficientnet-lite0" else model)


def cpu_times() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + c.ru_utime, r.ru_stime + c.ru_stime


def run_one(model: str, mode: str, folder: Path, n: int) -> dict:
    """One configuration in this (fresh) process."""
    from extract_speed import bare_forward, run_extract
    from genattr.alloc import tune_for_batch_work

    if mode in ("after", "bare-tuned"):
        assert tune_for_batch_work(), "not glibc"
    backbone = make(model)
    paths = sorted(folder.iterdir())[:n]
    u0, s0 = cpu_times()
    t0 = time.perf_counter()
    if mode.startswith("bare"):
        from genattr.data.images import load_rgb

        x = torch.from_numpy(np.stack([backbone.preprocess(load_rgb(p)) for p in paths]))
        u0, s0 = cpu_times()
        t0 = time.perf_counter()
        rate = bare_forward(backbone, x, 32, "fp32", threads=os.cpu_count())
    else:
        sub = Path(tempfile.mkdtemp())
        for p in paths:
            os.symlink(p, sub / p.name)
        kw = {"workers": 1} if mode == "before" else {}
        rate = run_extract(backbone, sub, 32, "fp32", Path(tempfile.mkdtemp()), **kw)
    wall = time.perf_counter() - t0
    u1, s1 = cpu_times()
    return {"rate": rate, "wall": wall, "user": u1 - u0, "sys": s1 - s0}


def median(got: dict[str, list[dict]], mode: str, key: str = "rate") -> float:
    return statistics.median(g[key] for g in got[mode])


def ratio(got: dict[str, list[dict]], a: str, b: str) -> str:
    """The median of the per-round ratios a / b (rounds that ran both), with their range."""
    each = [x["rate"] / y["rate"] for x, y in zip(got[a], got[b], strict=False)]
    return f"**{statistics.median(each):.2f}x** ({min(each):.2f}-{max(each):.2f})"


def main() -> None:
    from harness import emit_row

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0", "resnet50", "vit-b16"])
    ap.add_argument("--n", type=int, default=1160)
    ap.add_argument("--n-large", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # model mode folder n
    args = ap.parse_args()
    if args.one:
        model, mode, folder, n = args.one
        print(json.dumps(run_one(model, mode, Path(folder), int(n))))
        return

    from genattr.world.clipart import load_data

    data = load_data()
    folder = Path(tempfile.mkdtemp()) / "pretrain"
    folder.mkdir()
    for i in data.indices("pretrain")[: args.n]:
        Image.fromarray(data.images[int(i)]).save(folder / f"{int(i):05d}.png")
    rows = []
    for model in args.models:
        n = args.n if model == "efficientnet-lite0" else args.n_large
        got: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            first = ("bare-plain", "before") if r == 0 else ()
            for mode in (*first, "bare-tuned", "after"):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", model, mode, str(folder), str(n)],
                    capture_output=True, text=True, check=True, env={**os.environ},
                )  # fmt: skip
                g = json.loads(out.stdout.strip().splitlines()[-1])
                got.setdefault(mode, []).append(g)
                print(
                    f"{model:18s} round {r} {mode:11s} {g['rate']:7.1f} images/s  "
                    f"user {g['user']:6.1f} s  sys {g['sys']:6.1f} s",
                    flush=True,
                )
        rows.append(
            f"| {model} | {n} x {args.rounds} | {median(got, 'before'):.1f} | "
            f"{median(got, 'after'):.1f} | {ratio(got, 'after', 'before')} | "
            f"{median(got, 'bare-plain'):.1f} | {median(got, 'bare-tuned'):.1f} | "
            f"{ratio(got, 'after', 'bare-tuned')} | "
            f"{median(got, 'before', 'sys'):.0f} / {median(got, 'after', 'sys'):.0f} s |"
        )
        emit_row("extract_floor", model=model, n=n, runs=got)
    print("| model | images | before images/s | after | after / before | bare plain | "
          "bare tuned | after / bare tuned | sys CPU before / after |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
