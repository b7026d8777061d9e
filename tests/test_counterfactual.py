"""The counterfactual metrics against direct computations and on a planted datamodel."""

from __future__ import annotations

import numpy as np
import pytest

from genattr.counterfactual import (
    draw_subsets,
    exemplar_ap,
    lds,
    leave_k_out_masks,
    margin_contrast,
    paired_difference,
    rank_agreement,
    seed_ceiling,
    spearman_rows,
    subset_predictions,
    summarize,
    top_k,
)
from genattr.errors import GenattrError

stats = pytest.importorskip("scipy.stats")


def test_spearman_rows_is_scipys_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (20, 30)).astype(float)  # many ties
    b = a + rng.normal(0, 2, a.shape)
    got = spearman_rows(a, b)
    want = [stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), b[:1, :5]))[0]


def test_lds_is_spearman_of_kept_sums_against_margins():
    rng = np.random.default_rng(1)
    scores, masks = rng.normal(size=(7, 12)), draw_subsets(12, 25, seed=3)
    margins = rng.normal(size=(7, 25))
    pred = np.array([[s[m].sum() for m in masks] for s in scores])
    np.testing.assert_allclose(subset_predictions(scores, masks), pred, atol=1e-12)
    want = [stats.spearmanr(p, g).statistic for p, g in zip(pred, margins, strict=True)]
    np.testing.assert_allclose(lds(scores, masks, margins), want, rtol=1e-12, atol=1e-12)


def planted(seeds: int, noise: float, q: int = 64, n: int = 16, m: int = 64):
    """Margins linear in subset membership with known weights, plus seed noise."""
    rng = np.random.default_rng(5)
    weights = rng.normal(size=(q, n))
    masks = draw_subsets(n, m, seed=11)
    margins = (masks @ weights.T).T[None] + rng.normal(0, noise, (seeds, q, m))
    return weights, masks, margins


def test_planted_datamodel_true_weights_reach_the_ceiling_and_shuffled_ones_zero():
    weights, masks, margins = planted(seeds=3, noise=2.0)
    truth = summarize(lds(weights, masks, margins.mean(0)))
    ceiling = summarize(seed_ceiling(margins))
    rng = np.random.default_rng(9)
    shuffled = summarize(lds(rng.permuted(weights, axis=1), masks, margins.mean(0)))
    # measured: truth 0.84, ceiling 0.53 (one seed against the others' mean: noisier than
    # the three seeds' mean the weights are scored on), shuffled -0.05 +- 0.03
    assert truth.mean > 0.75 and truth.mean >= ceiling.mean > 0.4
    assert abs(shuffled.mean) < 4 * shuffled.se
    assert paired_difference(lds(weights, masks, margins.mean(0)), shuffled.mean).low > 0.5
    noiseless = lds(weights, masks, (masks @ weights.T).T)
    np.testing.assert_allclose(noiseless, 1.0, atol=1e-12)


def test_margin_contrast_is_kept_mean_minus_dropped_mean_and_finds_planted_weights():
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    margins = np.array([[1.0, 2.0, 4.0, 8.0]])
    # image 0 kept in subsets 0, 1, 3, dropped in 2; image 2 kept in 1, 2, dropped in 0, 3
    want = [[(1 + 2 + 8) / 3 - 4, (1 + 4) / 2 - (2 + 8) / 2, (2 + 4) / 2 - (1 + 8) / 2]]
    np.testing.assert_allclose(margin_contrast(masks, margins), want)
    assert np.isnan(margin_contrast(np.ones((2, 2), dtype=bool), np.ones((1, 2)))).all()
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(5, 16))
    masks = draw_subsets(16, 64, alpha=0.5, seed=0)
    margins = weights @ masks.T + rng.normal(scale=0.1, size=(5, 64))
    found = margin_contrast(masks, margins)
    mine = [np.corrcoef(found[i], weights[i])[0, 1] for i in range(5)]
    other = [abs(np.corrcoef(found[i], weights[(i + 1) % 5])[0, 1]) for i in range(5)]
    # measured over seeds 0-9: worst own query 0.80-0.92, best other query 0.21-0.56
    assert min(mine) > 0.7 and max(other) < 0.65, (mine, other)
    with pytest.raises(GenattrError, match="do not fit"):
        margin_contrast(masks, margins.T)


def test_seed_ceiling_falls_with_retraining_noise():
    quiet = seed_ceiling(planted(seeds=2, noise=0.5)[2]).mean()
    loud = seed_ceiling(planted(seeds=2, noise=8.0)[2]).mean()
    assert quiet > 0.9 > 0.3 > loud
    with pytest.raises(GenattrError, match="R >= 2"):
        seed_ceiling(planted(seeds=1, noise=1.0)[2])


def test_leave_k_out_removes_the_planted_top_images():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(5, 10))
    top = np.array([[3, 7], [0, 1], [9, 2], [4, 5], [6, 8]])
    for row, idx in zip(scores, top, strict=True):
        row[idx] = [10.0, 9.0]
    np.testing.assert_array_equal(top_k(scores, 2), top)
    keep = leave_k_out_masks(scores, 2)
    assert (keep.sum(axis=1) == 8).all()
    for row, idx in zip(keep, top, strict=True):
        assert not row[idx].any()
    with pytest.raises(GenattrError):
        top_k(scores, 11)


def test_subsets_are_seeded_and_stratified():
    a = draw_subsets(16, 8, seed=4)
    np.testing.assert_array_equal(a, draw_subsets(16, 8, seed=4))
    assert not np.array_equal(a, draw_subsets(16, 8, seed=5))
    assert (a.sum(axis=1) == 8).all() and len({r.tobytes() for r in a}) == 8
    strata = [0] * 6 + [1] * 4 + [2] * 2
    s = draw_subsets(12, 20, seed=0, strata=strata, alpha=0.5)
    assert (s[:, :6].sum(1) == 3).all() and (s[:, 6:10].sum(1) == 2).all()
    assert (s[:, 10:].sum(1) == 1).all()
    for bad in ({"n": 1, "count": 2}, {"n": 4, "count": 0}, {"n": 4, "count": 2, "alpha": 1.0}):
        with pytest.raises(GenattrError):
            draw_subsets(**bad)


def test_summary_matches_direct_computation():
    v = np.array([0.1, 0.4, np.nan, 0.3, 0.2])
    s = summarize(v, seed=1)
    finite = v[np.isfinite(v)]
    assert s.n == 4 and s.mean == pytest.approx(finite.mean())
    assert s.se == pytest.approx(finite.std(ddof=1) / 2)
    assert s.low <= s.mean <= s.high


def _ap_by_hand(scores: np.ndarray, answers: np.ndarray) -> float:
    """AP walking the ranking (ties: answers first, as AbC's strict count does)."""
    order = np.lexsort((~answers, -scores))
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if answers[i]:
            hits += 1
            total += hits / rank
    return total / answers.sum()


def test_exemplar_ap_is_average_precision_of_the_answers():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 6, (30, 16)).astype(float)  # ties everywhere
    answers = rng.random((30, 16)) < 0.15
    answers[0] = False
    got = exemplar_ap(scores, answers)
    assert np.isnan(got[0])
    want = [_ap_by_hand(s, a) for s, a in zip(scores[1:], answers[1:], strict=True) if a.any()]
    np.testing.assert_allclose(got[1:][answers[1:].any(1)], want, atol=1e-12)
    perfect = exemplar_ap(answers[1:].astype(float), answers[1:])
    assert np.nanmin(perfect) == 1.0
    with pytest.raises(GenattrError):
        exemplar_ap(scores, answers[:, :3])


def test_rank_agreement_is_scipys_spearman_and_kendall():
    rng = np.random.default_rng(5)
    a = {f"m{i}": float(v) for i, v in enumerate(rng.normal(size=9))}
    b = {k: v + float(rng.normal(0, 0.7)) for k, v in a.items()}
    b["m3"] = b["m4"]  # a tie
    b["only in b"] = 1.0
    got = rank_agreement(a, b)
    names = sorted(a)
    x, y = [a[k] for k in names], [b[k] for k in names]
    assert got["n"] == 9
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert got["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert rank_agreement(a, {k: -v for k, v in a.items()})["kendall"] == pytest.approx(-1.0)


def test_packed_study_round_trips_and_feeds_the_demo_summary(tmp_path):
    """A planted study packed as the world's is (margins and scores, no weights): loaded back
    bit for bit, and the demo's summary recomputes LDS from it, truth near the top."""
    from genattr.workflows.counterfactual_scores import (
        CaseOutcome,
        load_packed_outcomes,
        pack_outcomes,
    )
    from genattr.workflows.demo import counterfactual_summary

    weights, masks, margins = planted(seeds=2, noise=2.0, q=8)
    rng = np.random.default_rng(3)
    scores = {"truth": weights, "random": rng.normal(size=weights.shape)}
    answers = np.zeros(weights.shape, dtype=bool)
    answers[np.arange(4), weights[:4].argmax(1)] = True  # the first 4 queries have an answer
    outcomes = [
        CaseOutcome(f"c{k}", masks, margins, scores, answers, ["set"] * 4 + ["held-out"] * 4)
        for k in range(2)
    ]
    path = pack_outcomes(
        outcomes, labels=list(scores), path=tmp_path / "pack.npz", extra={"spec": {"seeds": 2}}
    )
    back, meta = load_packed_outcomes(path)
    assert meta["labels"] == ["truth", "random"] and meta["spec"] == {"seeds": 2}
    for a, b in zip(outcomes, back, strict=True):
        assert a.id == b.id and a.prompt_types == b.prompt_types
        np.testing.assert_array_equal(a.margins, b.margins)
        np.testing.assert_array_equal(a.scores["truth"], b.scores["truth"])
        np.testing.assert_array_equal(a.answers, b.answers)
    got = counterfactual_summary(path)
    assert got is not None and got["queries"] == 16 and got["models"] == ["c0", "c1"]
    rows = got["lds"]["methods"]
    assert rows["truth"]["lds"]["mean"] > 0.7 and abs(rows["random"]["lds"]["mean"]) < 0.3
    assert got["exemplar"]["methods"]["truth"]["map"]["mean"] == 1.0  # argmax is the answer
    assert counterfactual_summary(tmp_path / "absent.npz") is None
    np.savez(tmp_path / "other.npz", meta=np.array("{}"))
    with pytest.raises(GenattrError, match="not a packed"):
        load_packed_outcomes(tmp_path / "other.npz")
