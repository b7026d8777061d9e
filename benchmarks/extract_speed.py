"""Images/s of `genattr extract` against the bare model and a plain loop, in one run.

    python benchmarks/extract_speed.py [--images DIR] [--n 192] [--rounds 3] [--arch auto]

(a) bare forward: the same backbone on pre-decoded, pre-processed tensors (the ceiling);
(b) plain loop: open, convert, preprocess, forward, one batch at a time in one process (what
    the authors' extract_feat.py does with num_workers=0), with the same decoding, model
    layout (channels_last for convnets) and inference_mode as extract, so only the
    pipeline differs;
Both baselines run at 1 thread and at all cores; the faster one in each round is the reference.
(c) extract(): decode workers overlapped with the model, writing a real store.
Backbone (--arch auto): `efficientnet-lite0` when registered, else a ViT-B/16 built from a
transformers config with random weights (weights do not change speed); --arch vit-s16 is a
lighter model, where decoding is a larger share of the work; --arch pixel (no model) measures
the decoding pipeline alone. --large 1024 re-encodes the images as photo-sized JPEGs.
Images: real PNGs from Debian's openclipart-png (public domain), fetched with
`apt-get download` into benchmarks/.cache when --images is not given.
Prints rates and ratios; record them in BENCHMARKS.md.
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

from harness import emit_row
from harness import threads as torch_threads

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


def pick_images(folder: Path, n: int, dest: Path, large: int = 0) -> list[Path]:
    """n PNG files spread over the sorted list, put in dest so extract sees exactly them.

    With `large`, each is re-encoded as a photo-sized JPEG (long side `large` px, on white),
    closer to a LAION-like gallery, where decoding costs more than for small clip-art PNGs.
    """
    files = sorted(p for p in folder.rglob("*.png") if p.is_file() and not p.is_symlink())
    if len(files) < n:
        sys.exit(f"only {len(files)} images under {folder}")
    step = len(files) // n  # spread over categories
    chosen = files[::step][:n]
    dest.mkdir(parents=True)
    for k, p in enumerate(chosen):
        if not large:
            os.symlink(p.resolve(), dest / f"{k:05d}.png")
            continue
        from genattr.data.images import load_rgb

        image = load_rgb(p)
        scale = large / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image.resize(size, Image.Resampling.BICUBIC).save(dest / f"{k:05d}.jpg", quality=90)
    return sorted(dest.iterdir())


VIT_SIZES = {
    "vit-b16": {},
    "vit-s16": {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536},
}


def make_backbone(arch: str = "vit-b16"):
    from genattr.features import get_backbone, list_backbones
    from genattr.features.registry import Backbone

    if arch == "pixel":
        return get_backbone("pixel")
    if arch == "auto" and "efficientnet-lite0" in list_backbones():
        return get_backbone("efficientnet-lite0")
    arch = "vit-b16" if arch == "auto" else arch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, **VIT_SIZES[arch])
    vit = ViTModel(config, add_pooling_layer=False).eval()

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
        name=f"{arch}-random",
        dim=config.hidden_size,
        model=Cls(vit),
        preprocess=preprocess,
        preprocess_config={"resize": 224, "mean": 0.5, "std": 0.5},
    )


def autocast(dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


@contextlib.contextmanager
def fast_layout(model):
    """The same layout extract() uses: channels_last for models with convolutions."""
    from genattr.features.embedder import has_conv as _has_conv
    from genattr.features.embedder import memory_format as _memory_format

    with _memory_format(model, _has_conv(model)):
        yield _has_conv(model)


def _layout(x: torch.Tensor, cl: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def bare_forward(backbone, tensors: torch.Tensor, batch_size: int, dtype: str, threads=None):
    with fast_layout(backbone.model) as cl:
        batches = [
            _layout(tensors[a : a + batch_size], cl) for a in range(0, len(tensors), batch_size)
        ]
        t0 = time.perf_counter()
        with torch_threads(threads), torch.inference_mode(), autocast(dtype):
            for x in batches:
                backbone.model(x)
    return len(tensors) / (time.perf_counter() - t0)


def plain_loop(backbone, paths, batch_size: int, dtype: str, threads=None) -> float:
    from genattr.data.images import load_rgb  # same decoding as extract: same vectors

    t0 = time.perf_counter()
    with fast_layout(backbone.model) as cl, torch_threads(threads), torch.inference_mode():
        for a in range(0, len(paths), batch_size):
            arrays = [backbone.preprocess(load_rgb(p)) for p in paths[a : a + batch_size]]
            with autocast(dtype):
                backbone.model(_layout(torch.from_numpy(np.stack(arrays)), cl))
    return len(paths) / (time.perf_counter() - t0)


def folder_of_one(path: Path, tmp: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=tmp))
    os.symlink(path.resolve(), d / path.name)
    return d


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
    ap.add_argument("--n", type=int, default=192, help="images per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all methods, interleaved")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--arch", default="auto", choices=["auto", *VIT_SIZES, "pixel"])
    ap.add_argument("--large", type=int, default=0, help="re-encode as JPEGs of this size")
    ap.add_argument("--variants", action="store_true", help="also try thread/worker splits")
    args = ap.parse_args()

    backbone = make_backbone(args.arch)
    n_params = sum(p.numel() for p in backbone.model.parameters())
    print(
        f"backbone {backbone.name}, {n_params / 1e6:.1f}M params, batch {args.batch_size}, "
        f"{args.dtype}, {args.n} images x {args.rounds} rounds, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        paths = pick_images(args.images or clipart_folder(), args.n, tmp / "images", args.large)
        t0 = time.perf_counter()
        from genattr.data.images import load_rgb

        tensors = torch.from_numpy(np.stack([backbone.preprocess(load_rgb(p)) for p in paths]))
        decode_rate = len(paths) / (time.perf_counter() - t0)
        print(f"decode + preprocess alone, one process: {decode_rate:.1f} img/s")
        t0 = time.perf_counter()
        run_extract(backbone, folder_of_one(paths[0], tmp), args.batch_size, args.dtype, tmp)
        print(f"fixed cost of one extract() call (1 image): {time.perf_counter() - t0:.2f} s")
        bare_forward(backbone, tensors[: args.batch_size], args.batch_size, args.dtype)  # warm-up
        bs, dt, folder = args.batch_size, args.dtype, tmp / "images"
        cores = os.cpu_count() or 1
        methods = {  # each baseline at every thread count; its best is the reference
            f"bare forward threads={cores}": lambda: bare_forward(backbone, tensors, bs, dt, cores),
            "bare forward threads=1": lambda: bare_forward(backbone, tensors, bs, dt, 1),
            f"plain loop threads={cores}": lambda: plain_loop(backbone, paths, bs, dt, cores),
            "plain loop threads=1": lambda: plain_loop(backbone, paths, bs, dt, 1),
            "extract": lambda: run_extract(backbone, folder, bs, dt, tmp),
            f"extract threads={cores}": lambda: run_extract(
                backbone, folder, bs, dt, tmp, threads=cores
            ),
        }
        if args.variants:
            methods["extract workers=0"] = lambda: run_extract(
                backbone, folder, bs, dt, tmp, workers=0
            )
            methods["extract no channels_last"] = lambda: run_extract(
                backbone, folder, bs, dt, tmp, channels_last=False
            )
        rates: dict[str, list[float]] = {m: [] for m in methods}
        cpu: dict[str, list[float]] = {m: [] for m in methods}
        names = list(methods)
        for r in range(args.rounds):  # rotate the order: load from other processes drifts
            for name in names[r % len(names) :] + names[: r % len(names)]:
                c0 = os.times()
                rates[name].append(methods[name]())
                c1 = os.times()
                used = sum(b - a for a, b in zip(c0[:4], c1[:4], strict=True))
                cpu[name].append(used / args.n)
            print(f"round {r + 1}: " + ", ".join(f"{m} {v[-1]:.2f}" for m, v in rates.items()))

    def best(prefix: str) -> np.ndarray:  # per round, the faster thread setting
        return np.max([v for k, v in rates.items() if k.startswith(prefix)], axis=0)

    bare, plain = best("bare forward"), best("plain loop")
    print("x bare: per round, rate / the faster bare forward; median over rounds")
    print(f"{'method':28s} {'median img/s':>12s} {'x bare':>8s} {'CPU s/img':>10s}")
    for name, v in rates.items():
        ratio = np.median(np.array(v) / bare)  # median over rounds of the per-round ratio
        print(f"{name:28s} {np.median(v):12.2f} {ratio:8.3f} {np.median(cpu[name]):10.3f}")
    for name in ("extract", f"extract threads={os.cpu_count() or 1}"):
        ext = np.array(rates[name])
        print(f"{name} / best bare forward = {np.median(ext / bare):.3f}  (target >= 0.85)")
        print(f"{name} / best plain loop   = {np.median(ext / plain):.3f}  (target > 1)")
    emit_row("extract_speed", backbone=backbone.name, n=args.n, images_per_s=rates, cpu_s=cpu)


if __name__ == "__main__":
    main()
