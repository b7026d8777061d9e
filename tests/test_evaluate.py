import numpy as np
import pytest
import torch

from genattr.evaluate import evaluate_protocol, evaluate_reference, metrics_from_counts
from tests.conftest import make_fixture, random_mappers


def assert_same(result, reference):
    assert result.ks == reference.ks
    assert result.per_type.keys() == reference.per_type.keys()
    for ptype, r in result.per_type.items():
        ref = reference.per_type[ptype]
        np.testing.assert_array_equal(r.model_ids, ref.model_ids)
        np.testing.assert_array_equal(r.n_exemplars, ref.n_exemplars)
        np.testing.assert_allclose(r.ap, ref.ap, rtol=0, atol=1e-9)
        np.testing.assert_allclose(r.recall, ref.recall, rtol=0, atol=1e-9)


# Objects (one exemplar), styles (4-12 as in BAM-FG) and one large style set.
SIZES = [1, 1, 1, 4, 7, 12, 1, 30, 2]


@pytest.mark.parametrize("method", ["auto", "dense", "kernel"])
@pytest.mark.parametrize("noise", [0.3, 3.0])  # easy queries (few items above) and hard ones
def test_matches_per_query_argsort(method, noise):
    gallery, tc = make_fixture(sizes=SIZES, noise=noise, seed=1)
    # a small block forces many gallery and query blocks
    result = evaluate_protocol(gallery, tc, (1, 5, 10, 100), method=method, block_elements=3000)
    reference = evaluate_reference(gallery, tc, (1, 5, 10, 100))
    assert_same(result, reference)
    aps = np.concatenate([r.ap for r in result.per_type.values()])
    assert 0 < aps.min() < aps.max() <= 1  # the fixture exercises a spread of ranks


@pytest.mark.parametrize("kind", ["linear", "channel", "mlp"])
def test_matches_reference_with_mappers(kind):
    mappers = random_mappers(kind, 24, seed=3)
    gallery, tc = make_fixture(sizes=SIZES, noise=1.0, mappers=mappers, seed=2)
    result = evaluate_protocol(gallery, tc, mappers=mappers, block_elements=5000)
    assert_same(result, evaluate_reference(gallery, tc, mappers=mappers))


def test_fp16_memmap_gallery(tmp_path):
    gallery, tc = make_fixture(sizes=SIZES, noise=1.0, seed=4, margin=1e-4)
    path = tmp_path / "gallery.npy"
    np.save(path, gallery.numpy().astype(np.float16))
    mm = np.load(path, mmap_mode="r")
    result = evaluate_protocol(mm, tc, block_elements=4000)
    # fp16 storage, fp32 accumulation: equal to the reference run on the stored values
    reference = evaluate_reference(torch.from_numpy(mm.astype(np.float32)), tc)
    assert_same(result, reference)


def test_metrics_by_hand():
    # one query, 3 exemplars with ascending scores; gallery items above each: 9, 1, 0
    # ranked order: exemplar 3 at rank 1, exemplar 2 at rank 1+1+1=3, exemplar 1 at 9+2+1=12
    ap, recall = metrics_from_counts(np.array([[9, 1, 0]]), np.array([3]), (1, 3, 5, 12))
    assert ap[0] == pytest.approx((1 / 1 + 2 / 3 + 3 / 12) / 3)
    np.testing.assert_allclose(recall[0], [1 / 3, 2 / 3, 2 / 3, 1.0])


def test_recall_divides_by_all_exemplars():
    # 12 exemplars, all ahead of the whole gallery: R@5 = 5/12, not 5/min(5, 12)
    ap, recall = metrics_from_counts(np.zeros((1, 12), int), np.array([12]), (5, 10, 100))
    assert ap[0] == 1.0
    np.testing.assert_allclose(recall[0], [5 / 12, 10 / 12, 1.0])


def test_padded_columns_ignored():
    counts = np.array([[3, 99, 99], [0, 5, 0]])
    ap, _ = metrics_from_counts(counts, np.array([1, 3]), (5,))
    assert ap[0] == pytest.approx(1 / 4)
    assert ap[1] == pytest.approx((1 / 1 + 2 / 7 + 3 / 3) / 3)


def test_tiny_case_by_hand():
    # 2-D features at known angles from the query (angle 0): score = cos(angle)
    def at(*degrees):
        rad = np.radians(degrees)
        return torch.tensor(np.stack([np.cos(rad), np.sin(rad)], 1), dtype=torch.float32)

    from genattr.data.official import TestCaseFeatures

    gallery = at(10, 20, 30, 40, 50)
    tc = TestCaseFeatures(
        exemplar_paths=[],
        exemplar_chunks=[(0, 2), (2, 3)],
        exemplar_feats=at(15, 45, 5),  # model 0: ranks 2 and 6; model 1: rank 1
        synth_paths={},
        synth_ids={"media": [0, 1]},
        synth_feats={"media": at(0, 0)},
    )
    for result in (
        evaluate_protocol(gallery, tc, (1, 2, 5)),
        evaluate_reference(gallery, tc, (1, 2, 5)),
    ):
        r = result.per_type["media"]
        np.testing.assert_allclose(r.ap, [(1 / 2 + 2 / 6) / 2, 1.0])
        np.testing.assert_allclose(r.recall, [[0, 0.5, 0.5], [1, 1, 1]])
        assert result.summary()["media"]["mAP"] == pytest.approx(((1 / 2 + 2 / 6) / 2 + 1) / 2)


def _brute_force(gallery, tc, ks, *, strict: bool, mean_query: bool):
    """Per query: sort distractors (the gallery, plus with `strict` every other model's
    exemplars) and the own exemplars by cosine; AP and recall from the exemplars' places."""
    norm = torch.nn.functional.normalize
    g, ex = norm(gallery.float(), dim=1), norm(tc.exemplar_feats.float(), dim=1)
    queries = {p: norm(tc.synth_feats[p].float(), dim=1) for p in tc.prompt_types}
    if mean_query:
        mean = norm(torch.cat(list(queries.values())).mean(0, keepdim=True), dim=1)
        queries = {p: mean.expand_as(q) for p, q in queries.items()}
    out = {}
    for p, qs in queries.items():
        aps, recalls = [], []
        for model, q in zip(tc.synth_ids[p], qs, strict=True):
            s, e = tc.exemplar_chunks[model]
            others = torch.cat([ex[:s], ex[e:]]) if strict else ex[:0]
            scores = torch.cat([g, others, ex[s:e]]) @ q
            hits = (torch.argsort(-scores) >= len(scores) - (e - s)).numpy()
            pos = np.flatnonzero(hits) + 1
            aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
            recalls.append([hits[:k].sum() / (e - s) for k in ks])
        out[p] = (np.array(aps), np.array(recalls))
    return out


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("mean_query", [False, True])
def test_controls_match_brute_force(strict, mean_query):
    gallery, tc = make_fixture(sizes=SIZES, noise=1.0, seed=5)
    ks = (1, 5, 10)
    result = evaluate_protocol(
        gallery,
        tc,
        ks,
        block_elements=3000,
        exemplars_as_distractors=strict,
        query_independent=mean_query,
    )
    expected = _brute_force(gallery, tc, ks, strict=strict, mean_query=mean_query)
    for p, (ap, recall) in expected.items():
        np.testing.assert_allclose(result.per_type[p].ap, ap, atol=1e-9)
        np.testing.assert_allclose(result.per_type[p].recall, recall, atol=1e-9)
    plain = evaluate_protocol(gallery, tc, ks)
    mean_ap = np.mean([r.ap.mean() for r in result.per_type.values()])
    plain_ap = np.mean([r.ap.mean() for r in plain.per_type.values()])
    if strict or mean_query:  # each control makes the fixture's easy queries harder
        assert mean_ap < plain_ap


@pytest.mark.parametrize("strict", [False, True])
def test_scores_in_give_the_protocol_of_features(strict):
    """A method that hands over score matrices (gradient, unlearning) is ranked exactly as
    `evaluate_protocol` ranks the same similarities, stricter gallery included."""
    from genattr.evaluate import evaluate_scores
    from tests.synthetic import make_synthetic_benchmark

    bench = make_synthetic_benchmark(n_gallery=3000, dim=32, seed=3)
    tc = bench.testcase
    norm = torch.nn.functional.normalize
    gallery = norm(bench.gallery.feats.float(), dim=1)
    exemplars = norm(tc.exemplar_feats.float(), dim=1)
    queries = norm(torch.cat([tc.synth_feats[p].float() for p in tc.prompt_types]), dim=1)
    ref = evaluate_protocol(bench.gallery.feats, tc, exemplars_as_distractors=strict)
    got = evaluate_scores(
        queries @ gallery.T, queries @ exemplars.T, tc, exemplars_as_distractors=strict
    )
    for p in tc.prompt_types:
        np.testing.assert_allclose(got.per_type[p].ap, ref.per_type[p].ap, atol=1e-12)
        np.testing.assert_array_equal(got.per_type[p].recall, ref.per_type[p].recall)
    # scores that know the answer give 1.0; scores that ignore it give far less
    oracle = torch.zeros(len(queries), len(exemplars))
    ids = np.concatenate([tc.synth_ids[p] for p in tc.prompt_types])
    for row, m in enumerate(ids):
        s, e = tc.exemplar_chunks[m]
        oracle[row, s:e] = 1.0
    perfect = evaluate_scores(torch.zeros(len(queries), 3000), oracle, tc)
    assert all(v["mAP"] == 1.0 for v in perfect.summary().values())
    blind = evaluate_scores(torch.rand(len(queries), 3000), torch.rand(oracle.shape), tc)
    assert all(v["mAP"] < 0.1 for v in blind.summary().values())


def test_scores_of_the_wrong_shape_or_not_finite_are_refused():
    from genattr.errors import GenattrError
    from genattr.evaluate import evaluate_scores
    from tests.synthetic import make_synthetic_benchmark

    tc = make_synthetic_benchmark(n_gallery=100, dim=8).testcase
    q = sum(len(v) for v in tc.synth_ids.values())
    e = tc.exemplar_chunks[-1][1]
    with pytest.raises(GenattrError, match="scores must be"):
        evaluate_scores(torch.zeros(q, 100), torch.zeros(q, e + 1), tc)
    bad = torch.zeros(q, 100)
    bad[3, 7] = float("nan")
    with pytest.raises(GenattrError, match="NaN"):
        evaluate_scores(bad, torch.zeros(q, e), tc)


@pytest.mark.slow
def test_expected_random_ap_is_the_mean_ap_of_random_rankings() -> None:
    from genattr.evaluate import expected_random_ap

    rng = np.random.default_rng(0)
    for e, n in [(1, 40), (3, 7), (5, 60), (12, 30)]:
        aps = []
        for _ in range(20000):
            ranks = np.sort(rng.choice(n, e, replace=False)) + 1
            aps.append(np.mean(np.arange(1, e + 1) / ranks))
        # 20,000 draws: the simulated mean is within 4 standard errors.
        se = np.std(aps) / np.sqrt(len(aps))
        assert abs(expected_random_ap(e, n) - np.mean(aps)) < 4 * se, (e, n)
    assert expected_random_ap(7, 7) == pytest.approx(1.0)
    assert expected_random_ap(1, 1161) == pytest.approx(np.sum(1 / np.arange(1, 1162)) / 1161)
    assert expected_random_ap(1, 1161) > 7 * (1 / 1161)  # e/n understates it for few relevant
