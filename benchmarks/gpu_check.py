"""Every device path of genattr on full-size models built from configs (random weights),
each timed against the bare forward (or GEMM) it wraps, in one run. For a GPU machine:

    .venv/bin/python benchmarks/gpu_check.py --device cuda            # BENCHMARKS.md figures
    .venv/bin/python benchmarks/gpu_check.py --device cpu --small     # a smoke run, minutes

Paths: extraction (`embed_images` and `extract` from JPEG files, ViT-B/16 through genattr's
DINO loader), attribution (`Attributor` over a 100k-image index), evaluation
(`evaluate_protocol` against the bare GEMM of the same shape), Custom Diffusion training
(`Customizer.train` against a bare UNet forward+backward) and sampling (`generate_images`
against the bare UNet forwards it runs). SD 1.x sizes: UNet (320, 640, 1280, 1280), cross-
attention 768, 64x64 latents; a character-level tokenizer stands in for CLIP's vocabulary.
Prints one line per path: its time, the bare reference's, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genattr.attribution import Attributor
from genattr.data.official import TestCaseFeatures
from genattr.evaluate import evaluate_protocol
from genattr.features import get_backbone
from genattr.features.embedder import embed_images
from genattr.features.extract import extract
from genattr.search.index import build_index
from harness import emit_row, sd_pipeline, timed


def report(rows: list[dict], name: str, genattr_s: float, bare_s: float, unit: str) -> None:
    rows.append({"path": name, "genattr_s": genattr_s, "bare_s": bare_s, "unit": unit})
    emit_row("gpu_check", **rows[-1])
    print(
        f"{name:<34} genattr {genattr_s * 1e3:9.2f} ms  bare {bare_s * 1e3:9.2f} ms  "
        f"ratio {genattr_s / bare_s:5.2f}  ({unit})",
        flush=True,
    )


def vit_dir(root: Path, small: bool) -> Path:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=224, patch_size=16)  # ViT-B/16
    if small:
        cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=96, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=192)  # fmt: skip
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(root / "vit")
    return root / "vit"


def check_features(rows, root: Path, device: str, small: bool, n: int) -> None:
    backbone = get_backbone("dino-vitb16", str(vit_dir(root, small)), device=device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), np.uint8)) for _ in range(n)]
    folder = root / "jpegs"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.jpg", quality=90)
    batch = 64 if device.startswith("cuda") else 16
    x = torch.from_numpy(np.stack([backbone.preprocess(im) for im in images[:batch]]))
    x = x.to(device)
    for dtype in ("fp32", "fp16") if device.startswith("cuda") else ("fp32",):

        def bare(dtype=dtype):
            with (
                torch.inference_mode(),
                torch.autocast(device.split(":")[0], torch.float16, enabled=dtype == "fp16"),
            ):
                for _ in range(n // batch):
                    backbone.model(x)

        t_bare = timed(bare, repeat=3, warmup=1, sync_device=device) / (n // batch * batch)
        t_embed = timed(
            lambda dtype=dtype: embed_images(backbone, images, batch_size=batch, dtype=dtype),
            repeat=3,
            warmup=1,
            sync_device=device,
        ) / len(images)
        report(rows, f"embed_images ViT-B/16 {dtype}", t_embed, t_bare, "per image")
        runs = iter(range(100))

        def run_extract(dtype=dtype, runs=runs):
            extract(backbone, folder, root / f"store-{dtype}-{next(runs)}", batch_size=batch,
                    device=device, dtype=dtype, workers=4)  # fmt: skip

        t_extract = timed(run_extract, warmup=1, sync_device=device) / len(images)
        report(rows, f"extract (JPEG files) {dtype}", t_extract, t_bare, "per image")

    # attribution: 100k-image gallery, one forward per query batch plus search and influence
    gallery = np.random.default_rng(1).standard_normal((100_000, backbone.dim)).astype(np.float32)
    index = build_index(
        gallery,
        root / "index",
        ids=[f"g{i}" for i in range(len(gallery))],
        paths=[f"g{i}.jpg" for i in range(len(gallery))],
        provenance={"backbone": {"name": backbone.name, "weights_id": backbone.weights_id}},
    )
    attributor = Attributor(index, None, backbone, batch_size=batch)
    queries = images[:batch]
    t_attr = timed(
        lambda: attributor.attribute(queries, 20), repeat=3, warmup=1, sync_device=device
    ) / len(queries)

    def bare_one_batch():
        with torch.inference_mode():
            backbone.model(x[: len(queries)])

    t_fwd = timed(bare_one_batch, repeat=3, warmup=1, sync_device=device) / len(queries)
    report(rows, "Attributor.attribute (100k gallery)", t_attr, t_fwd, "per query")


def check_evaluate(rows, device: str, small: bool) -> None:
    n_gallery, dim, n_models = (100_000, 512, 500) if small else (1_000_000, 512, 2000)
    rng = np.random.default_rng(0)
    gallery = torch.from_numpy(rng.standard_normal((n_gallery, dim)).astype(np.float16))
    ex = torch.from_numpy(rng.standard_normal((n_models, dim)).astype(np.float32))
    synth = ex + 0.5 * torch.from_numpy(rng.standard_normal((n_models, dim)).astype(np.float32))
    tc = TestCaseFeatures(
        [f"e{i}" for i in range(n_models)],
        [(i, i + 1) for i in range(n_models)],
        ex,
        {"q": [f"s{i}" for i in range(n_models)]},
        {"q": list(range(n_models))},
        {"q": synth},
    )
    t_eval = timed(
        lambda: evaluate_protocol(gallery, tc, (5, 10, 100), device=device),
        warmup=1,
        sync_device=device,
    )
    g = gallery.to(device)
    q = torch.nn.functional.normalize(synth, dim=-1).to(device)

    def gemm():
        for s in range(0, n_gallery, 262_144):
            q @ g[s : s + 262_144].float().T

    t_gemm = timed(gemm, warmup=1, sync_device=device)
    report(rows, f"evaluate_protocol {n_gallery}x{dim}", t_eval / n_models, t_gemm / n_models,
           "per query")  # fmt: skip


def check_diffusion(rows, root: Path, device: str, small: bool) -> None:
    from genattr.customize.config import CustomizeConfig
    from genattr.customize.sample import SampleConfig, generate_images
    from genattr.customize.train import Customizer

    dtype = torch.float16 if device.startswith("cuda") and not small else torch.float32
    pipe = sd_pipeline("small" if small else "sd1").to(device, dtype)
    res = 128 if small else 512
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (res, res, 3), np.uint8)).save(
        root / "exemplar.png"
    )
    steps = 4 if small else 20
    cfg = CustomizeConfig(max_train_steps=steps, resolution=res, train_batch_size=2)
    cz = Customizer(pipe)
    t_train = timed(
        lambda: cz.train([root / "exemplar.png"], "object", "dog", cfg),
        warmup=1,
        sync_device=device,
    )
    unet = pipe.unet
    latents = torch.randn(2, 4, res // 8, res // 8, device=device, dtype=unet.dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    params = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    for p in params:
        p.requires_grad_(True)

    def bare_step():
        for _ in range(steps):
            out = unet(latents, torch.tensor([500], device=device), ctx).sample
            out.float().pow(2).mean().backward()

    t_bare = timed(bare_step, warmup=1, sync_device=device)
    report(rows, "Customizer.train step (batch 2)", t_train / steps, t_bare / steps, "per step")
    for p in params:
        p.requires_grad_(False)
    sample = SampleConfig(steps=steps, images_per_prompt=2, height=res, width=res)
    t_gen = timed(
        lambda: generate_images(pipe, ["a photo of a dog"], root / "samples", sample),
        warmup=1,
        sync_device=device,
    )
    latents4 = torch.cat([latents, latents])
    ctx4 = torch.cat([ctx, ctx])

    def bare_sampling():
        with torch.inference_mode():
            for _ in range(steps):
                unet(latents4, torch.tensor([500], device=device), ctx4)

    t_unet = timed(bare_sampling, warmup=1, sync_device=device)
    report(rows, "generate_images (2 images, CFG)", t_gen / steps, t_unet / steps, "per step")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="cut-down models: a CPU smoke run")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    n = args.images or (64 if args.small else 2048)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        check_features(rows, root, args.device, args.small, n)
        check_evaluate(rows, args.device, args.small)
        check_diffusion(rows, root, args.device, args.small)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
