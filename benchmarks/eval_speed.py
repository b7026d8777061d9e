"""Speed and memory of `genattr evaluate` against the authors' per-query argsort.

Builds a clustered 1,000,000 x 512 gallery (fp16, memory-mapped .npy, as an embedding store
holds it) and 2,000 synthesized queries from object models (1 exemplar) and style models
(4-12 exemplars). genattr evaluates all queries in a child process that reports its peak RSS;
the reference (one concatenation, matvec and full argsort per query, as in the authors'
eval.py) runs on a subset in this process, and so does a leaner argsort (matvec and argsort
only, no concatenation), and the bare GEMM of the same shape (the floor). Prints per-query
times, their ratios, peak memory
and the largest metric difference on the shared queries.

    .venv/bin/python benchmarks/eval_speed.py            # the BENCHMARKS.md figures
    .venv/bin/python benchmarks/eval_speed.py --n-gallery 100000 --ref-queries 20   # quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genattr.data.official import TestCaseFeatures
from genattr.evaluate import evaluate_protocol, evaluate_reference
from harness import emit_row


def build(workdir: Path, n_gallery: int, dim: int, n_queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    gallery = np.lib.format.open_memmap(
        workdir / "gallery.npy", mode="w+", dtype=np.float16, shape=(n_gallery, dim)
    )
    step = 100_000
    for s in range(0, n_gallery, step):
        n = min(step, n_gallery - s)
        rows = centers[rng.integers(0, len(centers), n)]
        gallery[s : s + n] = rows + 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
    gallery.flush()
    del gallery

    n_models = n_queries // 10  # 10 queries per model, half objects and half styles
    sizes = [1 if m % 2 == 0 else int(rng.integers(4, 13)) for m in range(n_models)]
    chunks, start = [], 0
    for s in sizes:
        chunks.append((start, start + s))
        start += s
    exemplars = centers[rng.integers(0, len(centers), start)] + 0.7 * rng.standard_normal(
        (start, dim), dtype=np.float32
    )
    ids = np.repeat(np.arange(n_models), 10)
    anchor = exemplars[[chunks[i][0] for i in ids]]
    queries = anchor + 0.9 * rng.standard_normal(anchor.shape, dtype=np.float32)
    half = len(ids) // 2
    return TestCaseFeatures(
        exemplar_paths=[],
        exemplar_chunks=chunks,
        exemplar_feats=torch.from_numpy(exemplars.astype(np.float32)),
        synth_paths={},
        synth_ids={"media": ids[:half].tolist(), "gpt": ids[half:].tolist()},
        synth_feats={
            "media": torch.from_numpy(queries[:half].astype(np.float32)),
            "gpt": torch.from_numpy(queries[half:].astype(np.float32)),
        },
    )


def _genattr_child(gallery_path: str, testcase: TestCaseFeatures, out: mp.Queue) -> None:
    gallery = np.load(gallery_path, mmap_mode="r")
    t0 = time.perf_counter()
    result = evaluate_protocol(gallery, testcase)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.put(
        (
            seconds,
            peak_gb,
            {p: r.ap for p, r in result.per_type.items()},
            {p: r.recall for p, r in result.per_type.items()},
        )
    )


def bare_gemm(gallery_path: str, queries: torch.Tensor, block: int = 16384) -> float:
    """Seconds for the GEMM every evaluation must do: all queries against the fp16 gallery,
    read block by block from its memory map and cast to fp32, products into one buffer (no
    normalising, no counting). The floor `genattr evaluate` is measured against."""
    gallery = np.load(gallery_path, mmap_mode="r")
    out = torch.empty((len(queries), block), dtype=torch.float32)
    t0 = time.perf_counter()
    for g0 in range(0, len(gallery), block):
        rows = torch.from_numpy(np.asarray(gallery[g0 : g0 + block], dtype=np.float32))
        torch.matmul(queries, rows.T, out=out[:, : len(rows)])
    return time.perf_counter() - t0


def subset(testcase: TestCaseFeatures, n: int) -> TestCaseFeatures:
    """The first n queries of each prompt type."""
    return TestCaseFeatures(
        testcase.exemplar_paths,
        testcase.exemplar_chunks,
        testcase.exemplar_feats,
        {},
        {p: v[:n] for p, v in testcase.synth_ids.items()},
        {p: v[:n] for p, v in testcase.synth_feats.items()},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gallery", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--ref-queries", type=int, default=10, help="per prompt type")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="genattr-bench-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        testcase = build(workdir, args.n_gallery, args.dim, args.queries)
        print(
            f"built {args.n_gallery:,} x {args.dim} fp16 gallery, {args.queries} queries "
            f"in {time.perf_counter() - t0:.1f} s"
        )

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(
            target=_genattr_child, args=(str(workdir / "gallery.npy"), testcase, queue)
        )
        child.start()
        seconds, peak_gb, aps, recalls = queue.get()
        child.join()
        n_q = sum(len(v) for v in testcase.synth_ids.values())
        ours = seconds / n_q
        all_queries = torch.nn.functional.normalize(
            torch.cat([testcase.synth_feats[p] for p in testcase.prompt_types]), dim=-1
        )
        # the floor at its own best block size
        gemm = min(bare_gemm(str(workdir / "gallery.npy"), all_queries, b) for b in (4096, 16384))
        gemm /= n_q

        small = subset(testcase, args.ref_queries)
        gallery = torch.from_numpy(np.load(workdir / "gallery.npy").astype(np.float32))
        t0 = time.perf_counter()
        reference = evaluate_reference(gallery, small)
        n_ref = sum(len(v) for v in small.synth_ids.values())
        ref = (time.perf_counter() - t0) / n_ref
        # a leaner reference: no per-query concatenation, just one matvec and one argsort
        normed = torch.nn.functional.normalize(gallery, dim=-1)
        q = torch.nn.functional.normalize(small.synth_feats["media"], dim=-1)
        t0 = time.perf_counter()
        for row in q:
            torch.argsort(-(normed @ row))
        lean = (time.perf_counter() - t0) / len(q)

    diff = max(
        max(
            np.abs(aps[p][: len(r.ap)] - r.ap).max(),
            np.abs(recalls[p][: len(r.ap)] - r.recall).max(),
        )
        for p, r in reference.per_type.items()
    )
    report = {
        "gallery": [args.n_gallery, args.dim],
        "queries": n_q,
        "reference_queries": n_ref,
        "genattr_s_total": round(seconds, 2),
        "genattr_ms_per_query": round(1000 * ours, 2),
        "bare_gemm_ms_per_query": round(1000 * gemm, 2),
        "ratio_to_bare_gemm": round(ours / gemm, 2),
        "reference_ms_per_query": round(1000 * ref, 1),
        "lean_argsort_ms_per_query": round(1000 * lean, 1),
        "speedup_vs_lean_argsort": round(lean / ours, 1),
        "speedup": round(ref / ours, 1),
        "genattr_peak_rss_gb": round(peak_gb, 2),
        "max_metric_diff_on_shared_queries": float(diff),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    emit_row("eval_speed", **report)


if __name__ == "__main__":
    main()
