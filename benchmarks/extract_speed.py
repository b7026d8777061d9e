"""Images/s of `genattr extract` against the bare model and a plain loop, in one run.

    python benchmarks/extract_speed.py [--images DIR] [--n 96] [--batch-size 32] [--dtype fp32]

(a) bare forward: the same backbone on pre-decoded, pre-processed tensors (the ceiling);
(b) plain loop: open, convert, preprocess, forward, one batch at a time in one process (what
    the authors' extract_feat.py does with num_workers=0);
(c) extract(): decode workers overlapped with the model, writing a real store.
Backbone: `efficientnet-lite0` when registered, else a ViT-B/16 built from a transformers
config with random weights (weights do not change speed). Images: real PNGs from Debian's
openclipart-png (public domain), fetched with `apt-get download` into benchmarks/.cache when
--images is not given. Prints rates and ratios; record them in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CACHE = Path(__file__).parent / ".cache"


def clipart_folder() -> Path:
    """openclipart PNGs, downloaded once (a .deb unpacked without installing it)."""
    root = CACHE / "openclipart"
    png_root = root / "usr" / "share" / "openclipart" / "png"
    if not png_root.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "openclipart-png"], cwd=CACHE, check=True)
        deb = next(CACHE.glob("openclipart-png_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        deb.unlink()
    return png_root


def pick_images(folder: Path, n: int, dest: Path) -> list[Path]:
    """The first n regular PNG files (sorted), linked into dest so extract sees exactly them."""
    files = sorted(p for p in folder.rglob("*.png") if p.is_file() and not p.is_symlink())
    if len(files) < n:
        sys.exit(f"only {len(files)} images under {folder}")
    step = len(files) // n  # spread over categories
    chosen = files[::step][:n]
    dest.mkdir(parents=True)
    for k, p in enumerate(chosen):
        os.symlink(p.resolve(), dest / f"{k:05d}.png")
    return sorted(dest.iterdir())


def make_backbone():
    from genattr.features import get_backbone, list_backbones
    from genattr.features.registry import Backbone

    if "efficientnet-lite0" in list_backbones():
        return get_backbone("efficientnet-lite0")
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=224, patch_size=16), add_pooling_layer=False).eval()

    class Cls(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).last_hidden_state[:, 0]

    def preprocess(image: Image.Image) -> np.ndarray:
        small = image.resize((224, 224), Image.Resampling.BICUBIC)
        return (np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5

    return Backbone(
        name="vit-b16-random",
        dim=768,
        model=Cls(vit),
        preprocess=preprocess,
        preprocess_config={"resize": 224, "mean": 0.5, "std": 0.5},
    )


def autocast(dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def bare_forward(backbone, tensors: torch.Tensor, batch_size: int, dtype: str) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(dtype):
        for a in range(0, len(tensors), batch_size):
            backbone.model(tensors[a : a + batch_size])
    return len(tensors) / (time.perf_counter() - t0)


def plain_loop(backbone, paths, batch_size: int, dtype: str) -> float:
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(dtype):
        for a in range(0, len(paths), batch_size):
            arrays = [
                backbone.preprocess(Image.open(p).convert("RGB")) for p in paths[a : a + batch_size]
            ]
            backbone.model(torch.from_numpy(np.stack(arrays)))
    return len(paths) / (time.perf_counter() - t0)


def run_extract(backbone, folder: Path, batch_size: int, dtype: str, tmp: Path, **kw) -> float:
    from genattr.features.extract import extract

    out = Path(tempfile.mkdtemp(dir=tmp))
    t0 = time.perf_counter()
    r = extract(backbone, folder, out / "store", batch_size=batch_size, dtype=dtype, **kw)
    rate = r.store.count / (time.perf_counter() - t0)
    assert r.failed_total == 0, f"{r.failed_total} images failed"
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="folder of PNGs (default: openclipart)")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--variants", action="store_true", help="also try thread/worker splits")
    args = ap.parse_args()

    backbone = make_backbone()
    n_params = sum(p.numel() for p in backbone.model.parameters())
    print(
        f"backbone {backbone.name}, {n_params / 1e6:.1f}M params, "
        f"batch {args.batch_size}, {args.dtype}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        paths = pick_images(args.images or clipart_folder(), args.n, tmp / "images")
        t0 = time.perf_counter()
        tensors = torch.from_numpy(
            np.stack([backbone.preprocess(Image.open(p).convert("RGB")) for p in paths])
        )
        decode_rate = len(paths) / (time.perf_counter() - t0)
        bare_forward(backbone, tensors[: args.batch_size], args.batch_size, args.dtype)  # warm-up

        rates = {"bare forward": bare_forward(backbone, tensors, args.batch_size, args.dtype)}
        rates["plain loop"] = plain_loop(backbone, paths, args.batch_size, args.dtype)
        rates["extract"] = run_extract(backbone, tmp / "images", args.batch_size, args.dtype, tmp)
        if args.variants:
            rates["extract workers=0"] = run_extract(
                backbone, tmp / "images", args.batch_size, args.dtype, tmp, workers=0
            )
            rates["extract threads=1"] = run_extract(
                backbone, tmp / "images", args.batch_size, args.dtype, tmp, threads=1
            )
            rates["extract no channels_last"] = run_extract(
                backbone, tmp / "images", args.batch_size, args.dtype, tmp, channels_last=False
            )
        rates["bare forward (again)"] = bare_forward(backbone, tensors, args.batch_size, args.dtype)

    bare = (rates["bare forward"] + rates["bare forward (again)"]) / 2
    print(f"decode + preprocess alone, one process: {decode_rate:8.1f} img/s")
    for name, rate in rates.items():
        print(f"{name:28s} {rate:8.2f} img/s   {rate / bare:5.3f} x bare")
    ext = rates["extract"]
    print(f"extract / bare forward = {ext / bare:.3f}  (target >= 0.85)")
    print(f"extract / plain loop   = {ext / rates['plain loop']:.3f}  (target > 1)")


if __name__ == "__main__":
    main()
