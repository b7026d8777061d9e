"""Compiled CPU kernels (numba), imported lazily so `genattr --help` stays fast."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, nogil=True)
def count_above_sorted(
    scores: np.ndarray, thresholds: np.ndarray, n_valid: np.ndarray, counts: np.ndarray
) -> None:
    """counts[i, k] += #{j: scores[i, j] > thresholds[i, k]} for k < n_valid[i].

    One fused pass per row: thresholds are sorted ascending, so a score below the first one
    (almost all of a gallery) costs one comparison; the rest are bucketed and summed once.
    """
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
