"""A first measurement of the gradient attributor in the miniature world: for a few test
models, rebuild the customized model (the world benchmark's own code and settings), take
projected loss gradients of every pre-training image and of the model's exemplars (under
their captions / training prompt) and of its synthesized queries (under their prompts),
and score with plain cosine and with TRAK's kernel correction. Reported beside chance and
three controls: the mean query gradient as the query, the same prompts on unrelated images
(what the prompt and its <new1> token alone score), and the smallest gradient first (a
membership signal that ignores the query: the customized model has fitted its exemplars).

    .venv/bin/python experiments/world_gradient.py --models object-000 style-000 --work DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from genattr.customize.loading import load_custom_diffusion
from genattr.data.official import TestCaseFeatures
from genattr.evaluate import evaluate_scores
from genattr.methods import GradientSpec, gradient_scores, projected_gradients
from genattr.world.base import base_model_dir, load_world_base
from genattr.world.benchmark import build_benchmark, load_benchmark
from genattr.world.clipart import load_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def text_states(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor(ids.input_ids))[0]


def latents_of(pipe, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def grads(pipe, sched, images, prompts, spec, batch=64) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        lat = latents_of(pipe, images[s : s + batch])
        txt = text_states(pipe, prompts[s : s + batch])
        out.append(projected_gradients(pipe.unet, sched, lat, txt, spec))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["object-000"])
    ap.add_argument("--work", type=Path, default=Path("world-gradient"))
    ap.add_argument("--proj-dim", type=int, default=2048)
    args = ap.parse_args()
    torch.manual_seed(0)
    data, bench = load_data(), load_benchmark()
    by_id = {m["id"]: m for m in bench.models}
    pre = data.indices("pretrain")
    spec = GradientSpec(proj_dim=args.proj_dim)
    rows = []
    for mid in args.models:
        m = by_id[mid]
        t0 = time.perf_counter()
        build_benchmark(base_model_dir(), args.work / mid, data, models=[mid])
        pipe = load_world_base()
        load_custom_diffusion(pipe, args.work / mid / "bench" / "models" / mid)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        t_model = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = args.work / mid / "gallery_gradients.npy"
        if cache.is_file():
            gallery = np.load(cache)
        else:
            gallery = grads(pipe, sched, data.images[pre], data.captions(pre), spec)
            np.save(cache, gallery)
        ex = np.asarray(m["exemplars"])
        exemplars = grads(pipe, sched, data.images[ex], [m["train_prompt"]] * len(ex), spec)
        t_gallery = time.perf_counter() - t0
        queries, prompt_only, ptypes = [], [], {}
        rng = np.random.default_rng(0)
        for ptype, (start, count) in m["synth"].items():
            prompts = m["prompts"][ptype]
            per = count // len(prompts)
            texts = [prompts[j // per] for j in range(count)]
            queries.append(grads(pipe, sched, bench.images[start : start + count], texts, spec))
            # the same prompts on unrelated images (pre-training images at random): what the
            # prompt alone, with its <new1> token, scores
            others = data.images[rng.choice(pre, count, replace=False)]
            prompt_only.append(grads(pipe, sched, others, texts, spec))
            ptypes[ptype] = count
        q, q_prompt = np.concatenate(queries), np.concatenate(prompt_only)
        tc = TestCaseFeatures(
            [], [(0, len(ex))], torch.zeros(len(ex), 1), {},
            {p: [0] * n for p, n in ptypes.items()},
            {p: torch.zeros(n, 1) for p, n in ptypes.items()},
        )  # fmt: skip
        chance = len(ex) / (len(ex) + len(pre))
        for kernel in ("cosine", "trak"):
            train = np.concatenate([gallery, exemplars])
            s = gradient_scores(train, q, kernel)
            res = evaluate_scores(s[:, : len(pre)], s[:, len(pre) :], tc).summary()
            mean_q = np.repeat(q.mean(0, keepdims=True), len(q), 0)
            s0 = gradient_scores(train, mean_q, kernel)
            ctl = evaluate_scores(s0[:, : len(pre)], s0[:, len(pre) :], tc).summary()
            s1 = gradient_scores(train, q_prompt, kernel)
            ctl_prompt = evaluate_scores(s1[:, : len(pre)], s1[:, len(pre) :], tc).summary()
            rows.append(
                {
                    "model": mid,
                    "kernel": kernel,
                    "chance": chance,
                    "mAP": {p: r["mAP"] for p, r in res.items()},
                    "R@10": {p: r["recall"]["10"] for p, r in res.items()},
                    "control_mean_query_mAP": {p: r["mAP"] for p, r in ctl.items()},
                    "control_prompt_only_mAP": {p: r["mAP"] for p, r in ctl_prompt.items()},
                }
            )
        # membership: the customized model has fitted its exemplars, so their loss gradients
        # are small; ranking by the smallest gradient ignores the query altogether
        norms = np.linalg.norm(np.concatenate([gallery, exemplars]), axis=1)
        s_norm = np.repeat(-norms[None], len(q), 0)
        nres = evaluate_scores(s_norm[:, : len(pre)], s_norm[:, len(pre) :], tc).summary()
        rows.append(
            {
                "model": mid,
                "kernel": "smallest gradient first (control)",
                "chance": chance,
                "mAP": {p: r["mAP"] for p, r in nres.items()},
                "seconds": {"rebuild model": t_model, "gallery gradients": t_gallery},
            }
        )
        print(json.dumps(rows[-3:], indent=1), flush=True)
        emit_row("world_gradient", model=mid, rows=rows[-3:])
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
