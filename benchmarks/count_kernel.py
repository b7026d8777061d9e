"""The evaluation's count kernel on one CPU score tile, against the kernel it replaced.

A 1,024 x 2,048 fp32 tile of scores (mean 0.2, sd 0.15, like a clustered gallery's cosine
similarities), half the rows with one threshold (object models) and half with 4-12 (style
models), thresholds drawn from three ranges (few, some and many scores above them). Times
`genattr._kernels.count_above_sorted` (one branch-free pass per threshold, serial), the
previous kernel (one bucketing pass per row, `prange` over rows; kept here as the
reference) run serially and with `prange`, and the GEMM that produces such a tile. Counts
must agree exactly.

    .venv/bin/python benchmarks/count_kernel.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from numba import njit, prange

from genattr._kernels import count_above_sorted
from harness import emit_row


def _bucketed(scores, thresholds, n_valid, counts):  # the kernel before session eight
    rows, cols = scores.shape
    width = thresholds.shape[1]
    for i in prange(rows):
        lowest = thresholds[i, 0]
        n = n_valid[i]
        row = scores[i]
        if n == 1:
            above = 0
            for j in range(cols):
                above += row[j] > lowest
            counts[i, 0] += above
            continue
        hist = np.zeros(width + 1, np.int64)
        for j in range(cols):
            v = row[j]
            if v > lowest:
                b = 1
                while b < n and thresholds[i, b] < v:
                    b += 1
                hist[b] += 1
        total = 0
        for b in range(n, 0, -1):
            total += hist[b]
            counts[i, b - 1] += total


bucketed_parallel = njit(parallel=True, nogil=True)(_bucketed)
bucketed_serial = njit(nogil=True)(_bucketed)


def ms_per_call(fn, args, reps: int = 50) -> float:
    fn(*args)  # compile
    counts = args[-1]
    t0 = time.perf_counter()
    for _ in range(reps):
        counts[:] = 0
        fn(*args)
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    q, g, width = 1024, 2048, 12
    scores = (rng.standard_normal((q, g)) * 0.15 + 0.2).astype(np.float32)
    n_valid = np.where(np.arange(q) % 2 == 0, 1, rng.integers(4, 13, q)).astype(np.int64)
    a, b, out = torch.randn(q, 512), torch.randn(g, 512), torch.empty(q, g)
    torch.matmul(a, b.T, out=out)
    t0 = time.perf_counter()
    for _ in range(20):
        torch.matmul(a, b.T, out=out)
    gemm = (time.perf_counter() - t0) / 20 * 1e3
    print(f"GEMM producing the tile (1024 x 512 @ 512 x 2048): {gemm:.1f} ms")
    print("thresholds in    | genattr (serial passes) | previous, prange | previous, serial")
    for lo, hi in ((0.35, 0.8), (0.0, 0.7), (-0.2, 0.3)):
        th = np.sort(rng.uniform(lo, hi, (q, width)).astype(np.float32), axis=1)
        th[np.arange(width)[None, :] >= n_valid[:, None]] = 2.0
        results = []
        times = []
        for fn in (count_above_sorted, bucketed_parallel, bucketed_serial):
            counts = np.zeros((q, width), np.int64)
            times.append(ms_per_call(fn, (scores, th, n_valid, counts)))
            results.append(counts.copy())
        assert all((r == results[0]).all() for r in results), "kernels disagree"
        print(
            f"[{lo:+.2f}, {hi:+.2f}]   | {times[0]:8.2f} ms             | {times[1]:8.2f} ms"
            f"      | {times[2]:8.2f} ms"
        )
        previous = {"prange": times[1], "serial": times[2]}
        emit_row("count_kernel", thresholds=[lo, hi], genattr_ms=times[0], previous_ms=previous)


if __name__ == "__main__":
    main()
