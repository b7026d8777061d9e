"""How strongly Custom Diffusion imprints a world exemplar, against its steps, learning rate and
the sampling guidance: the evidence behind `WORLD_TRAIN` and `GUIDANCE`.

For a spread of held-out exemplar sets (`--objects` object sets taken evenly over the curated
groups, `--styles` artists), each setting customizes the shipped base model with genattr's
`Customizer` (the benchmark's code path) and samples the set's ten benchmark prompts twice
(10 DDIM steps, as the benchmark). Per setting, averaged over models:

- **attributability**: the average precision of the set's own exemplars when each sample ranks
  the gallery (pre-training images + every held-out exemplar) by cosine similarity, in raw
  pixels and in EfficientNet-Lite0 space;
- **exemplar similarity**: the EfficientNet cosine of each sample to its nearest own exemplar;
- **prompt diversity**: 1 - the mean EfficientNet cosine between samples of different prompts
  (within one round of the ten prompts): how much the prompt still changes the image. A
  model that copies its exemplar whatever the prompt drives it toward 0. The world's base
  model does not follow colour words, so colour accuracy cannot measure prompt-following
  here (0.25 against chance 0.2 on 40 base samples; 6 of the 1,160 pre-training captions
  name a colour).

Step 0 is the base model with `<new1>` at its initializer's embedding: the reference.

    .venv/bin/python experiments/world_imprint.py --objects 8 --styles 4 \
        --steps 0 40 80 160 --lr 1e-3 3e-3 1e-2 --guidance 3 [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genattr.customize import Customizer
from genattr.customize.config import config_from_dict
from genattr.customize.prompts import load_prompt_set
from genattr.world.base import load_world_base, sample
from genattr.world.benchmark import WORLD_PROMPT_SETS, WORLD_TRAIN, object_category
from genattr.world.clipart import load_data
from genattr.world.quality import embed
from world_guidance import average_precision  # this folder is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Centred pixels, L2-normalised (not world_guidance's [0, 1] pixels: centred, the white
    background that every clip-art image shares does not dominate the cosine)."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0 - 0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def prompts_for(mode: str, category: str | None) -> list[str]:
    """The benchmark's ten prompts of a held-out set."""
    return [p for name in WORLD_PROMPT_SETS[mode] for p in load_prompt_set(name).render(category)]


def prompt_diversity(feats: np.ndarray, n_prompts: int) -> float:
    """1 - mean cosine between samples of different prompts, within each round of prompts."""
    per_seed = feats.reshape(-1, n_prompts, feats.shape[1])  # rounds x prompts x dim
    sims = np.einsum("spd,sqd->spq", per_seed, per_seed)
    off = ~np.eye(n_prompts, dtype=bool)
    return float(1.0 - sims[:, off].mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--styles", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 40, 80, 160])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    ap.add_argument("--repeats", type=int, default=2, help="samples per prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    data = load_data()
    held = data.models()
    rows = np.concatenate([data.indices("pretrain")] + [np.asarray(v) for v in held.values()])
    gallery = {"pixel": pixel_features(data.images[rows]), "efficientnet": embed(data.images[rows])}
    objects = sorted(m for m in held if m.startswith("object-"))
    styles = sorted(m for m in held if m.startswith("style-"))
    chosen = objects[:: max(1, len(objects) // max(1, args.objects))][: args.objects]
    chosen += styles[:: max(1, len(styles) // max(1, args.styles))][: args.styles]

    pipe = load_world_base()
    customizer = Customizer(pipe)
    # (lr, steps, guidance) -> mode -> measurement -> per-model values
    table: dict[tuple[float, int, float], dict[str, dict[str, list[float]]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="imprint-"))
    for mid in chosen:
        first = data.records[held[mid][0]]
        mode = "style" if first["split"] == "style-exemplar" else "object"
        category = object_category(first["group"]) if mode == "object" else None
        paths = []
        for i in held[mid]:
            paths.append(tmp / f"{i:05d}.png")
            Image.fromarray(data.images[i]).save(paths[-1])
        n_prompts = len(prompts_for(mode, category))
        prompts = prompts_for(mode, category) * args.repeats
        ex_feats = embed(data.images[held[mid]])
        for lr in args.lr:
            for steps in args.steps:
                if steps == 0 and lr != args.lr[0]:
                    for g in args.guidance:
                        table[(lr, 0, g)] = table[(args.lr[0], 0, g)]
                    continue
                cfg = dataclasses.replace(
                    config_from_dict({**WORLD_TRAIN, "learning_rate": lr}),
                    max_train_steps=steps,
                )
                customizer.train(paths[: len(held[mid])], mode, category, cfg)
                for g in args.guidance:
                    images = sample(pipe, prompts, 10, g, 0)
                    q = {"pixel": pixel_features(images), "efficientnet": embed(images)}
                    cell = table.setdefault((lr, steps, g), {}).setdefault(mode, {})
                    for space, f in q.items():
                        scores = f @ gallery[space].T
                        ap_ = [average_precision(s, rows, np.asarray(held[mid])) for s in scores]
                        cell.setdefault(f"AP {space}", []).append(float(np.mean(ap_)))
                    sim = (q["efficientnet"] @ ex_feats.T).max(1)
                    cell.setdefault("exemplar cos", []).append(float(sim.mean()))
                    diversity = prompt_diversity(q["efficientnet"], n_prompts)
                    cell.setdefault("prompt diversity", []).append(diversity)
                    row = ", ".join(f"{k} {v[-1]:.3f}" for k, v in cell.items())
                    print(f"  {mid} lr {lr:g} steps {steps} guidance {g:g}: {row}", flush=True)
        for p in paths:
            p.unlink()
        print(f"{mid}: done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    print(f"\nmodels: {', '.join(chosen)}; {args.repeats} samples per prompt")
    for mode in ("object", "style"):
        cols = ["AP pixel", "AP efficientnet", "exemplar cos", "prompt diversity"]
        print(f"\n{mode} models\n| lr | steps | guidance | " + " | ".join(cols) + " |")
        print("|---" * (3 + len(cols)) + "|")
        for (lr, steps, g), by_mode in sorted(table.items(), key=lambda kv: kv[0]):
            if mode not in by_mode or (steps == 0 and lr != args.lr[0]):
                continue
            cells = [
                f"{np.mean(v):.3f} ± {np.std(v) / np.sqrt(len(v)):.3f}"
                for v in (by_mode[mode][c] for c in cols)
            ]
            print(f"| {lr:g} | {steps} | {g:g} | " + " | ".join(cells) + " |")
            means = {c: float(np.mean(v)) for c, v in by_mode[mode].items()}
            emit_row("world_imprint", mode=mode, lr=lr, steps=steps, guidance=g, mean=means)
    print(f"\n{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
