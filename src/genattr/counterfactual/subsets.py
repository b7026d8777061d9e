"""Seeded random training subsets for the linear datamodeling score."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genattr.errors import GenattrError


def draw_subsets(
    n: int,
    count: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    strata: Sequence[int] | None = None,
) -> np.ndarray:
    """(count, n) bool: which of `n` training images each of `count` subsets keeps.

    Every subset keeps `round(alpha * size)` images of each stratum (at least one, at most
    all but one where the stratum has two or more), drawn without replacement from one
    `numpy` generator seeded with `seed`: the same arguments give the same subsets on any
    machine. `strata` labels each image (a concept of a multi-concept set); None: one stratum.

    Args:
        n: training images.
        count: subsets to draw.
        alpha: the fraction of each stratum a subset keeps (TRAK and D-TRAK use 0.5).
        seed: the generator's seed.
        strata: a label per image; subsets keep the same share of every label.
    """
    if n < 2:
        raise GenattrError(f"a subset study needs at least 2 training images, not {n}")
    if count < 1:
        raise GenattrError(f"count must be positive, not {count}")
    if not 0 < alpha < 1:
        raise GenattrError(f"alpha must be between 0 and 1, not {alpha}")
    labels = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata)
    if labels.shape != (n,):
        raise GenattrError(f"{len(labels)} stratum labels for {n} images")
    groups = [np.flatnonzero(labels == v) for v in np.unique(labels)]
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, n), dtype=bool)
    for row in masks:
        for members in groups:
            size = len(members)
            keep = min(max(round(alpha * size), 1), size - 1) if size > 1 else 1
            row[rng.choice(members, keep, replace=False)] = True
    return masks
