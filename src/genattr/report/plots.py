"""Plots as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os

import numpy as np

from genattr.atomic import atomic_path


def reliability_data(p: np.ndarray, is_true: np.ndarray, bins: int = 10):
    """Per bin of assigned influence: mean influence, fraction of true exemplars, count.

    A calibrated model that gives candidates 30 % influence should be right about 30 % of
    the time that those candidates are true exemplars (bins over p > 0 only: zero-mass
    candidates are the truncated tail).
    """
    p, t = p.ravel(), is_true.ravel()
    keep = p > 0
    p, t = p[keep], t[keep]
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        if m.any():
            rows.append((float(p[m].mean()), float(t[m].mean()), int(m.sum())))
    return rows


def reliability_plot(
    p: np.ndarray, is_true: np.ndarray, out: str | os.PathLike, title: str = "Calibration"
) -> list[tuple[float, float, int]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = reliability_data(p, is_true)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    if rows:
        mean_p, frac, n = map(np.array, zip(*rows, strict=True))
        ax.scatter(
            mean_p, frac, s=20 + 80 * n / n.max(), c="C0", zorder=3, label="bins (size = count)"
        )
        ax.plot(mean_p, frac, c="C0", lw=1)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="assigned influence",
        ylabel="fraction that are true exemplars",
    )
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return rows
