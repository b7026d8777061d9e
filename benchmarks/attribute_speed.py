"""Query latency of the attribution index at 1M x 768, and head-training throughput.

Clustered gallery (a mixture of 2,000 Gaussians: i.i.d. Gaussian vectors are the worst case
for any index and unlike real features). Times one query at a time, as `genattr attribute`
issues them:
  - flat (exact) index vs a plain torch matvec + topk over the same vectors, and vs faiss'
    IndexFlatIP (what a flat FAISS index would give),
  - IVF-PQ with exact re-ranking at nprobe = default / 2, default, 2 x default, and its
    recall@100 against the exact top-100 (speed-up against the plain scan),
then head training pairs/s (linear head, 768-d, batch 128, 1,024 distractors per batch).

    .venv/bin/python benchmarks/attribute_speed.py [--n 1000000] [--dim 768]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genattr.heads.train import PairedFeatures, TrainConfig, train_heads
from genattr.search.index import build_index
from harness import emit_row


def clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s : s + m] = centers[rng.integers(0, len(centers), m)] + 0.5 * rng.standard_normal(
            (m, dim), dtype=np.float32
        )
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def per_query_ms(fn, queries: np.ndarray) -> float:
    fn(queries[:1])  # warm
    t0 = time.perf_counter()
    for q in queries:
        fn(q[None])
    return 1000 * (time.perf_counter() - t0) / len(queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, args.dim)).astype(np.float32)
    gallery = clustered(args.n, args.dim, rng, centers)
    queries = clustered(args.queries, args.dim, rng, centers)
    report: dict = {"gallery": [args.n, args.dim], "queries": args.queries}

    g = torch.from_numpy(gallery)

    def plain(q):
        return torch.topk(g @ torch.from_numpy(q[0]), 100)

    report["plain_matvec_topk_ms"] = round(per_query_ms(plain, queries), 1)
    import faiss

    faiss_flat = faiss.IndexFlatIP(args.dim)
    faiss_flat.add(gallery)
    report["faiss_indexflatip_ms"] = round(
        per_query_ms(lambda q: faiss_flat.search(q, 100), queries), 1
    )
    faiss_flat = None
    exact_ids = np.stack([plain(q[None])[1].numpy() for q in queries])

    with tempfile.TemporaryDirectory(prefix="genattr-index-") as tmp:
        t0 = time.perf_counter()
        flat = build_index(gallery, Path(tmp) / "flat", kind="flat")
        report["flat_build_s"] = round(time.perf_counter() - t0, 1)
        report["flat_ms"] = round(per_query_ms(lambda q: flat.search(q, 100), queries), 1)
        report["flat_speedup_vs_plain"] = round(
            report["plain_matvec_topk_ms"] / report["flat_ms"], 2
        )
        flat = None  # free its 3 GB before the next build

        t0 = time.perf_counter()
        ivfpq = build_index(gallery, Path(tmp) / "ivfpq", kind="ivfpq", train_size=100_000)
        report["ivfpq_build_s"] = round(time.perf_counter() - t0, 1)
        report["ivfpq_factory"] = ivfpq.spec.factory
        default_nprobe, default_rerank = ivfpq.spec.nprobe, ivfpq.spec.rerank
        for nprobe, rerank in [
            (default_nprobe // 2, default_rerank),
            (default_nprobe, default_rerank),
            (2 * default_nprobe, default_rerank),
            (default_nprobe, 4),
            (default_nprobe, 2),
        ]:
            ivfpq.set_nprobe(nprobe)
            ivfpq.spec.rerank = rerank  # candidates re-scored exactly per result
            ms = per_query_ms(lambda q: ivfpq.search(q, 100), queries)
            ids = np.stack([ivfpq.search(q[None], 100)[1][0] for q in queries])
            recall = np.mean(
                [len(set(a) & set(b)) / 100 for a, b in zip(ids, exact_ids, strict=True)]
            )
            report[f"ivfpq_nprobe{nprobe}_rerank{rerank}"] = {
                "ms": round(ms, 2),
                "recall@100": round(float(recall), 4),
                "speedup_vs_plain": round(report["plain_matvec_topk_ms"] / ms, 1),
            }
        ivfpq = None

    # head training throughput on synthetic pairs
    n_models, per_model = 400, 8
    ex = torch.from_numpy(clustered(n_models, args.dim, rng, centers))
    ids = np.repeat(np.arange(n_models), per_model)
    synth = ex[ids] + 0.05 * torch.randn(len(ids), args.dim)
    data = PairedFeatures(ex, [(i, i + 1) for i in range(n_models)], synth, ids, g[:50_000])
    train_heads(
        data, TrainConfig(epochs=1)
    )  # warm-up: the optimizer's first step imports torch._dynamo
    config = TrainConfig(epochs=3, batch_size=128, distractors_per_batch=1024)
    t0 = time.perf_counter()
    train_heads(data, config)
    report["head_training_pairs_per_s"] = round(3 * len(ids) / (time.perf_counter() - t0), 0)
    report["torch_threads"] = torch.get_num_threads()
    print(json.dumps(report, indent=2))
    emit_row("attribute_speed", **report)


if __name__ == "__main__":
    main()
