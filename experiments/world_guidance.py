"""Which classifier-free guidance the world's benchmark should sample at.

For each guidance scale, two measurements on the same models and seeds:

- customized models: every `--every`-th held-out exemplar set's Custom Diffusion model (from a
  built benchmark) samples its ten benchmark prompts twice (10 DDIM steps, as the benchmark);
  each sample ranks the gallery (pre-training images + all exemplars) by cosine similarity in
  genattr's `pixel` backbone and in EfficientNet-Lite0 space (quality.embed), and the average
  precision of the model's own exemplars is averaged per model, then over object and style
  models: how attributable the samples are;
- the base model (`--quality-n` > 0): `genattr world quality`'s category agreement.

    .venv/bin/python experiments/world_guidance.py --bench runs/world/benchmark-XXXX/bench \
        --guidance 2 3 4 6 [--every 3] [--quality-n 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genattr.customize.loading import load_custom_diffusion
from genattr.customize.pipeline import load_base_pipeline
from genattr.evaluate import metrics_from_counts
from genattr.features import get_backbone
from genattr.world.base import sample
from genattr.world.clipart import load_data
from genattr.world.quality import embed, sample_quality

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def pixel_features(images: np.ndarray) -> np.ndarray:
    """L2-normalised features of uint8 (N, H, W, 3) images from genattr's `pixel` backbone."""
    backbone = get_backbone("pixel")
    x = np.stack([backbone.preprocess(Image.fromarray(im)) for im in images])
    with torch.inference_mode():
        feats = backbone.embed(torch.from_numpy(x)).numpy()
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def average_precision(scores: np.ndarray, gallery_rows: np.ndarray, positives: np.ndarray) -> float:
    """AP of the `positives` when `scores` rank the gallery rows `gallery_rows`: the protocol's
    own (`metrics_from_counts`), from each positive's count of other rows scoring higher."""
    own = np.isin(gallery_rows, positives)
    thresholds = np.sort(scores[own])
    others = np.sort(scores[~own])
    above = len(others) - np.searchsorted(others, thresholds, side="right")
    ap, _ = metrics_from_counts(above[None], np.array([len(thresholds)]), (1,))
    return float(ap[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", type=Path, required=True, help="a built benchmark's bench folder")
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 4.0, 6.0])
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--quality-n", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_data()
    held = data.models()
    rows = np.concatenate([data.indices("pretrain")] + [np.asarray(v) for v in held.values()])
    gallery = {"pixel": pixel_features(data.images[rows]), "efficientnet": embed(data.images[rows])}
    base = json.loads((args.bench / "plan.json").read_text())["base"]
    ap_by = {g: {} for g in args.guidance}  # guidance -> (mode, space) -> [per-model AP]
    for mid in sorted(held)[:: args.every]:
        state = json.loads((args.bench / "state" / f"{mid}.json").read_text())
        prompts = [p for ps in state["prompts"].values() for p in ps] * 2
        pipe = load_base_pipeline(base, "cpu", "float32")
        load_custom_diffusion(pipe, args.bench.parent / state["model_dir"])
        for g in args.guidance:
            images = sample(pipe, prompts, 10, g, 0)
            queries = {"pixel": pixel_features(images), "efficientnet": embed(images)}
            for space, q in queries.items():
                scores = q @ gallery[space].T
                per_query = [average_precision(s, rows, np.asarray(held[mid])) for s in scores]
                ap_by[g].setdefault((state["mode"], space), []).append(float(np.mean(per_query)))
        print(f"{mid}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    print(f"\nbase {base}; models: every {args.every}th held-out set")
    cols = ("object, pixel", "object, EfficientNet", "style, pixel", "style, EfficientNet")
    print("| guidance | " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|")
    for g, table in ap_by.items():
        cells = [
            f"{np.mean(table[(m, s)]):.4f} ({len(table[(m, s)])})"
            for m in ("object", "style")
            for s in ("pixel", "efficientnet")
        ]
        print(f"| {g:g} | " + " | ".join(cells) + " |")
        mean_ap = {f"{m}, {s}": float(np.mean(v)) for (m, s), v in table.items()}
        emit_row("world_guidance", guidance=g, models_every=args.every, mean_ap=mean_ap)
    if args.quality_n:
        pipe = load_base_pipeline(base, "cpu", "float32")
        print("\n| guidance | base: category agreement | chance | real | NN cosine |")
        print("|---|---|---|---|---|")
        for g in args.guidance:
            q = sample_quality(pipe, data, n=args.quality_n, steps=20, guidance=g)
            print(
                f"| {g:g} | {q.sample_agreement:.3f} | {q.chance:.3f} | {q.real_agreement:.3f} "
                f"| {q.sample_nn_cosine:.3f} |",
                flush=True,
            )
    print(f"\n{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
