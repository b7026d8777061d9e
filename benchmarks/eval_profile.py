"""Where `genattr evaluate` spends its time, and what the fused counting kernel buys.

Times each stage of the gallery loop (read + cast the fp16 block, normalise, fp32 matrix
product, count) on the `eval_speed.py` data, then the whole evaluation with the numba kernel
and with pure-torch counting (one compare-and-sum pass per exemplar), as a ratio.

    .venv/bin/python benchmarks/eval_profile.py [--n-gallery 200000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eval_speed import build
from genattr.evaluate import evaluate_protocol
from harness import emit_row


def stage_times(gallery: np.ndarray, queries: torch.Tensor, block: int = 16384) -> dict:
    from genattr._kernels import count_above_sorted

    thresholds = (torch.rand(len(queries), 12) * 0.2 + 0.6).sort(1).values
    n_valid = np.full(len(queries), 6)
    counts = torch.zeros(len(queries), 12, dtype=torch.int64)
    buf = torch.empty(1024, block)
    times = dict.fromkeys(("read+cast", "normalise", "matmul", "count kernel"), 0.0)
    for g0 in range(0, len(gallery), block):
        t = time.perf_counter()
        g = torch.from_numpy(np.array(gallery[g0 : g0 + block], dtype=np.float32))
        times["read+cast"] += time.perf_counter() - t
        t = time.perf_counter()
        g = torch.nn.functional.normalize(g, dim=-1)
        times["normalise"] += time.perf_counter() - t
        for q0 in range(0, len(queries), 1024):
            q1 = min(len(queries), q0 + 1024)
            out = buf[: q1 - q0, : len(g)]
            t = time.perf_counter()
            torch.matmul(queries[q0:q1], g.T, out=out)
            times["matmul"] += time.perf_counter() - t
            t = time.perf_counter()
            count_above_sorted(
                out.numpy(), thresholds[q0:q1].numpy(), n_valid[q0:q1], counts[q0:q1].numpy()
            )
            times["count kernel"] += time.perf_counter() - t
    total = sum(times.values())
    return {k: f"{100 * v / total:.0f} %" for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-gallery", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="genattr-prof-") as tmp:
        testcase = build(Path(tmp), args.n_gallery, 512, 2000)
        gallery = np.load(Path(tmp) / "gallery.npy", mmap_mode="r")
        evaluate_protocol(gallery[:20000], testcase)  # compile / load the kernel
        queries = torch.nn.functional.normalize(
            torch.cat(list(testcase.synth_feats.values())), dim=-1
        )
        shares = stage_times(gallery, queries)
        print("share of the gallery loop:", shares)
        seconds = {}
        for method in ("kernel", "dense"):
            t = time.perf_counter()
            evaluate_protocol(gallery, testcase, method=method)
            seconds[method] = time.perf_counter() - t
        print(
            f"whole evaluation: kernel {seconds['kernel']:.1f} s, torch counting "
            f"{seconds['dense']:.1f} s, ratio {seconds['dense'] / seconds['kernel']:.1f}x"
        )
        emit_row("eval_profile", n_gallery=args.n_gallery, stages=shares, seconds=seconds)


if __name__ == "__main__":
    main()
