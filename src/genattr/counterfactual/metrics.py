"""The counterfactual metrics: LDS, the retraining-seed ceiling, leave-K-out, their summaries.

Sign convention, the one used everywhere in genattr: a model's **margin** on a query is minus
the query's denoising loss under that model (higher: the model explains the query better). A
method's **prediction** for a training subset is the sum of its scores over the images the
subset *kept* (higher score = more responsible). LDS is then the Spearman correlation across
subsets between prediction and margin, per query: positive when the method is right. (D-TRAK
and TRAK write the same thing with other signs; summing over removed images flips it.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genattr.errors import GenattrError


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks within each row of a 2-d array, 0-based, ties sharing their mean rank (scipy's
    `rankdata` 'average', minus one)."""
    order = np.argsort(x, axis=1, kind="stable")
    ranks = np.empty(x.shape, dtype=np.float64)
    for i, row_order in enumerate(order):
        row = x[i, row_order]
        pos = np.arange(len(row), dtype=np.float64)
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(row)], strict=True):
            pos[a:b] = (a + b - 1) / 2.0
        ranks[i, row_order] = pos
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation of each row of `a` with the same row of `b` (Q, M); NaN for
    a row that is constant in either (no ranking to compare)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise GenattrError(f"need two (Q, M) arrays of one shape, not {a.shape} and {b.shape}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=1) / denom, np.nan)


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(Q, M): for each query and subset, the sum of the query's scores (Q, N) over the
    images the subset (M, N bool) kept."""
    scores, masks = np.asarray(scores, dtype=np.float64), np.asarray(masks, dtype=bool)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise GenattrError(f"scores {scores.shape} and subsets {masks.shape} do not fit")
    return scores @ masks.T.astype(np.float64)


def lds(scores: np.ndarray, masks: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """(Q,) linear datamodeling score per query: Spearman across the M subsets between the
    method's predictions (`subset_predictions`) and the measured margins (Q, M), usually
    the mean over training seeds; NaN for a query the method did not score (NaN scores)."""
    out = spearman_rows(subset_predictions(scores, masks), margins)
    return np.where(np.isfinite(np.asarray(scores, dtype=np.float64)).all(axis=1), out, np.nan)


def margin_contrast(masks: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """(Q, N) each image's counterfactual effect read off the subsets: the query's mean
    margin (Q, M) over the subsets (M, N bool) that kept the image minus over those that
    dropped it (higher = keeping it fits the query better; NaN where an image was always
    or never kept). The margins themselves as an attribution, e.g. a teacher to distil;
    its LDS on the subsets it was read from is in-sample."""
    masks = np.asarray(masks, dtype=bool)
    margins = np.asarray(margins, dtype=np.float64)
    if masks.ndim != 2 or margins.ndim != 2 or margins.shape[1] != masks.shape[0]:
        raise GenattrError(f"margins {margins.shape} and subsets {masks.shape} do not fit")
    kept, dropped = masks.sum(axis=0), (~masks).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return margins @ masks / kept - margins @ ~masks / dropped


def seed_ceiling(margins: np.ndarray) -> np.ndarray:
    """(Q,) the retraining-seed ceiling from margins (R, Q, M) of R >= 2 training seeds: the
    mean over seeds r of the Spearman correlation between seed r's margins and the mean of
    the other seeds'. A method's LDS against the seed mean cannot be expected above this:
    it is how well one retraining predicts the others."""
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 3 or margins.shape[0] < 2:
        raise GenattrError(f"need margins (R >= 2 seeds, Q, M), not {margins.shape}")
    total = margins.sum(axis=0)
    r = margins.shape[0]
    each = [spearman_rows(margins[k], (total - margins[k]) / (r - 1)) for k in range(r)]
    return np.mean(each, axis=0)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) indices of each query's k highest scores, highest first (ties: lower index)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 1 <= k <= scores.shape[1]:
        raise GenattrError(f"k must be in 1..{scores.shape[1]}, not {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def leave_k_out_masks(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, N) bool: the training set each query's leave-K-out model keeps, without the k
    images the method scored highest for it."""
    keep = np.ones(np.shape(scores), dtype=bool)
    np.put_along_axis(keep, top_k(scores, k), False, axis=1)
    return keep


@dataclass(frozen=True)
class Summary:
    """A mean over queries with its standard error and a percentile bootstrap interval."""

    mean: float
    se: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "se": self.se, "low": self.low, "high": self.high, "n": self.n}


def summarize(
    values: np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Summary:
    """Mean, standard error and bootstrap interval of per-query values (NaNs left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return Summary(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    means = np.random.default_rng(seed).choice(v, (resamples, len(v))).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Summary(float(v.mean()), se, float(low), float(high), len(v))


def paired_difference(a: np.ndarray, b: np.ndarray | float, *, seed: int = 0) -> Summary:
    """The per-query difference a - b summarized: two methods are apart when its interval
    excludes 0 (queries where either is NaN are left out)."""
    return summarize(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), seed=seed)


def exemplar_ap(scores: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """(Q,) average precision of each query's answer images (`answers` (Q, N) bool) in the
    ranking of its scores (Q, N), counted as the AbC evaluation counts it (a non-answer
    outranks an answer only with a strictly higher score); NaN for a query with no answer
    or not scored (NaN scores).
    The exemplar-as-answer ground truth, to set beside LDS on the same scores."""
    from genattr.evaluate import metrics_from_counts

    s, a = np.asarray(scores, dtype=np.float64), np.asarray(answers, dtype=bool)
    if s.shape != a.shape or s.ndim != 2:
        raise GenattrError(f"need (Q, N) scores and answers, not {s.shape} and {a.shape}")
    out = np.full(len(s), np.nan)
    for q in np.flatnonzero(a.any(axis=1) & np.isfinite(s).all(axis=1)):
        thresholds = np.sort(s[q, a[q]])
        others = s[q, ~a[q]]
        counts = (others[None, :] > thresholds[:, None]).sum(axis=1)
        ap, _ = metrics_from_counts(counts[None, :], np.array([len(thresholds)]), (1,))
        out[q] = ap[0]
    return out


def rank_agreement(a: dict[str, float], b: dict[str, float]) -> dict[str, float | int]:
    """How far two rankings of the same methods agree (each a method -> figure mapping):
    Spearman's rho and Kendall's tau-b across the methods both name."""
    names = sorted(set(a) & set(b))
    x = np.array([[a[k] for k in names]], dtype=np.float64)
    y = np.array([[b[k] for k in names]], dtype=np.float64)
    dx = np.sign(x[0][:, None] - x[0][None, :])
    dy = np.sign(y[0][:, None] - y[0][None, :])
    upper = np.triu_indices(len(names), 1)
    concordant = float((dx * dy)[upper].sum())
    ties_x, ties_y = (dx[upper] != 0).sum(), (dy[upper] != 0).sum()
    denom = np.sqrt(float(ties_x) * float(ties_y))
    return {
        "spearman": float(spearman_rows(x, y)[0]) if len(names) > 1 else float("nan"),
        "kendall": concordant / denom if denom > 0 else float("nan"),
        "n": len(names),
    }
