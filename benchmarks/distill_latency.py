"""Latency and storage of a distilled head beside its teachers, in one run on one world
model of the counterfactual study (FastGDA's table shape: seconds per query, bytes per
training image).

- student: one query answered from scratch: world-cnn features of the image, MiniLM
  features of the prompt, joined (`text_aware`, w = 0.5), through the head (linear; FastGDA's
  MLP; none: the 'world-cnn + text' method), cosine against the stored features of the
  model's training images;
- teacher, square-norm gradient: the model's training images' gradients (once per model,
  per image) and a query's gradient and products (per query), under the trained model;
- teacher, margins: what the margin contrast costs, 12 subsets x 2 seeds retrained and
  measured per model (one such unit timed here, x 24, over the model's queries).

The student's figure is a ratio against the teachers' in the same run, one torch thread.

    .venv/bin/python benchmarks/distill_latency.py [--work /tmp/distill-latency]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from genattr.features.embedder import embed_images
from genattr.features.registry import get_backbone
from genattr.features.text import clean_prompt, load_text_encoder, text_aware
from genattr.heads.networks import create_head
from genattr.vectors import embed
from genattr.workflows.counterfactual import Retrainer, StudySpec, Unit, world_set_cases
from genattr.workflows.model_methods import make_method
from genattr.world.base import base_model_dir
from harness import emit_row, timed

SUBSET_MODELS = 12 * 2  # the study's subsets x training seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill-latency"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    (case,) = world_set_cases(args.work, size=16, models=1)
    n, q = len(case.train), len(case.queries)
    backbone, text = get_backbone("world-cnn"), load_text_encoder("minilm")
    train = text_aware(
        embed_images(backbone, [Image.fromarray(a) for a in case.train.images]),
        text.encode([clean_prompt(c) for c in case.train.prompts], progress=False),
        0.5,
    )
    dim = train.shape[1]
    rows: dict[str, float] = {}
    for kind in ("no head", "linear", "fastgda"):
        head = None if kind == "no head" else create_head(kind, dim).eval()
        with torch.no_grad():
            stored = embed(torch.from_numpy(train), head)

        def answer(i: int = 0, head: torch.nn.Module | None = head, stored: torch.Tensor = stored):
            img = embed_images(backbone, [Image.fromarray(case.queries.images[i])])
            words = text.encode([clean_prompt(case.queries.prompts[i])], progress=False)
            with torch.no_grad():
                return embed(torch.from_numpy(text_aware(img, words, 0.5)), head) @ stored.T

        rows[f"student ({kind})"] = timed(answer, repeat=20, warmup=2)
    retrainer = Retrainer(base_model_dir())
    t0 = time.perf_counter()
    retrainer.train(case, Unit((True,) * n, 0))
    train_s = time.perf_counter() - t0
    spec = StudySpec(subsets=12, timesteps=16, noises_per_timestep=1)  # the world study's
    t0 = time.perf_counter()
    retrainer.margins(case, spec)
    unit_s = train_s + time.perf_counter() - t0
    method = make_method("gradient", output="square_norm")
    t0 = time.perf_counter()
    method.prepare(retrainer.pipe, [case.train], None, False)
    per_image = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    method.scores(retrainer.pipe, case.queries, False)
    rows["teacher: square-norm gradient"] = (time.perf_counter() - t0) / q
    rows["teacher: margins (24 retrained models)"] = SUBSET_MODELS * unit_s / q
    storage = {
        "student (no head)": 4 * dim,
        "student (linear)": 4 * dim,
        "student (fastgda)": 4 * 768,
        "teacher: square-norm gradient": method.storage_bytes_per_image(),
        "teacher: margins (24 retrained models)": 0,
    }
    print(f"one world model: {n} training images, {q} queries, one torch thread")
    print(f"square-norm gradient: {per_image:.3f} s per training image, once per model")
    print(f"one retrained subset model: {unit_s:.1f} s (train {train_s:.1f} s + measure)")
    print("| method | s per query | x the square-norm teacher | bytes per training image |")
    print("|---|---|---|---|")
    ref = rows["teacher: square-norm gradient"]
    for label, s in rows.items():
        print(f"| {label} | {s:.4g} | {s / ref:.2g} | {storage[label]:,} |")
        emit_row(
            "distill_latency", method=label, seconds_per_query=s, ratio_to_gradient=s / ref,
            bytes_per_training_image=storage[label],
        )  # fmt: skip
    emit_row("distill_latency_once", gradient_seconds_per_training_image=per_image, unit_s=unit_s)


if __name__ == "__main__":
    main()
