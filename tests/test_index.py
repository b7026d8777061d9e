import json
import shutil

import numpy as np
import pytest
import torch

from genattr.errors import GenattrError
from genattr.search.exact import topk_exact
from genattr.search.index import AttributionIndex, build_index, choose_index, parse_size
from tests.conftest import random_mappers
from tests.support import clustered, normed


def test_choose_index_follows_size_and_budget():
    assert choose_index(100_000, 512, parse_size("4GB")).kind == "flat"
    assert choose_index(5_000_000, 512, parse_size("4GB")).kind == "ivfpq"
    # 1M x 768 fp32 is 3 GiB: flat within 4 GiB, IVF-PQ within 1 GiB
    assert choose_index(1_000_000, 768, parse_size("4GiB")).kind == "flat"
    spec = choose_index(1_000_000, 768, parse_size("1GB"))
    assert spec.kind == "ivfpq" and spec.factory.startswith("IVF1024,PQ")
    # the PQ code must fit the budget: 1M x m bytes
    m = int(spec.factory.rsplit("PQ", 1)[1].removesuffix("np"))
    assert 1_000_000 * m <= parse_size("1GB") and 768 % m == 0
    assert choose_index(1000, 64, 10**9, kind="ivf").factory.startswith("IVF")
    with pytest.raises(GenattrError):
        parse_size("lots")
    with pytest.raises(GenattrError):
        choose_index(10, 4, 10**9, kind="hnsw")


def test_flat_index_is_exact(tmp_path):
    g = clustered(3000, 32)
    q = normed(clustered(5, 32, seed=1))
    index = build_index(g, tmp_path / "idx", kind="flat", provenance={"backbone": "test"})
    sims, ids = index.search(q.numpy(), 10)
    ref_s, ref_i = topk_exact(g, q, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format_version"] == 1 and meta["backbone"] == "test" and meta["count"] == 3000


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_kinds_rerank_exactly(tmp_path, kind):
    g = clustered(10000, 32)
    q = normed(clustered(20, 32, seed=2))
    index = build_index(g, tmp_path / kind, kind=kind, train_size=10000)
    assert index.exact_vectors is not None
    sims, ids = index.search(q.numpy(), 20)
    _, ref_i = topk_exact(g, q, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, ref_i, strict=True)])
    assert recall >= 0.9
    # whatever is returned carries its exact similarity, best first
    exact = (normed(g)[ids.clip(0)] * q[:, None, :]).sum(-1).numpy()
    np.testing.assert_allclose(sims, exact, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-7).all()
    # reloaded memory-mapped, same answers
    again = AttributionIndex.load(tmp_path / kind)
    np.testing.assert_array_equal(again.search(q.numpy(), 20)[1], ids)


def test_index_with_head(tmp_path):
    from genattr.heads.train import TrainConfig, TrainResult, save_heads

    pair = random_mappers("linear", 16, seed=0)
    save_heads(TrainResult(pair, TrainConfig()), tmp_path / "head")
    g = clustered(2000, 16)
    index = build_index(g, tmp_path / "idx", head=pair, head_dir=tmp_path / "head")
    head = index.head()
    x = torch.from_numpy(clustered(3, 16, seed=5))
    with torch.no_grad():
        q = normed(head.synth(x))
        sims, ids = index.search(q.numpy(), 5)
        ref_s, ref_i = topk_exact(g, q, 5, gallery_transform=pair.real)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_not_an_index(tmp_path):
    with pytest.raises(GenattrError, match="not a genattr index"):
        AttributionIndex.load(tmp_path)


def test_a_damaged_index_is_refused_in_one_line(tmp_path):
    """index.json of the wrong shape, or an index without its vectors: a GenattrError that
    says what is wrong, not a traceback."""
    build_index(clustered(50, 8), tmp_path / "ok")
    good = json.loads((tmp_path / "ok" / "index.json").read_text())
    cases = {
        "list": ([good], "Input should be a valid dictionary"),
        "count": ({**good, "count": "many"}, "count: Input should be a valid integer"),
        "spec": ({**good, "index": "flat"}, "index: Input should be a valid dictionary"),
    }
    for name, (doc, says) in cases.items():
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        (tmp_path / name / "index.json").write_text(json.dumps(doc))
        with pytest.raises(GenattrError, match=says):
            AttributionIndex.load(tmp_path / name)
    (tmp_path / "ok" / "vectors.npy").unlink()
    with pytest.raises(GenattrError, match=r"vectors\.npy is missing"):
        AttributionIndex.load(tmp_path / "ok")
