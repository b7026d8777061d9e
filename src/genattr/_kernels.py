"""Compiled CPU kernels (numba), imported lazily so `genattr --help` stays fast."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def count_above_sorted(
    scores: np.ndarray, thresholds: np.ndarray, n_valid: np.ndarray, counts: np.ndarray
) -> None:
    """counts[i, k] += #{j: scores[i, j] > thresholds[i, k]} for k < n_valid[i].

    One branch-free pass over the row per threshold, which the compiler turns into SIMD
    compares on a row that stays in L1; thresholds ascend, so the passes stop at the first
    threshold nothing exceeds (most rows of a real gallery: after the first). Serial on
    purpose: on a 1,024 x 2,048 tile this is 4-9x faster than a bucketed single pass split
    over threads with `prange`, whose start-up costs more than the work (benchmarks/
    eval_speed.py; the scoring GEMM around it is already threaded).
    """
    rows, cols = scores.shape
    for i in range(rows):
        row = scores[i]
        for k in range(n_valid[i]):
            t = thresholds[i, k]
            above = np.int32(0)
            for j in range(cols):
                above += np.int32(row[j] > t)
            counts[i, k] += above
            if above == 0:
                break
