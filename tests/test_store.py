"""EmbeddingStore: layout, memory-mapped reads, append, atomic commits, .pth conversion."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from genattr.data import official
from genattr.data.official import (
    GalleryFeatures,
    load_gallery_pth,
    load_testcase_pth,
    save_gallery_pth,
    save_testcase_pth,
)
from genattr.errors import GenattrError
from genattr.evaluate import evaluate_protocol
from genattr.store import BackboneInfo, EmbeddingStore, check_same_backbone, convert

CLIP = BackboneInfo("clip-vit-b32", "sha256:abc", {"resize": 224})


def _store_with(tmp_path, chunks, dtype="float32", name="s", backbone=CLIP):
    store = EmbeddingStore.create(tmp_path / name, backbone, chunks[0].shape[1], dtype)
    start = 0
    with store.writing():
        for c in chunks:
            ids = [f"img{start + i}" for i in range(len(c))]
            store.append(
                c, ids, [f"/data/{i}.png" for i in ids], {"n": range(start, start + len(c))}
            )
            start += len(c)
    return store


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_several_shards(tmp_path, dtype):
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 1, 7)]
    _store_with(tmp_path, chunks, dtype)
    store = EmbeddingStore.open(tmp_path / "s")
    expected = np.concatenate(chunks).astype(dtype)

    assert store.count == len(store) == 13 and store.num_shards == 3 and store.dim == 8
    assert store.dtype == np.dtype(dtype) and store.backbone == CLIP
    assert store.backbone.preprocess_config == {"resize": 224}
    v = store.vectors
    assert v.shape == (13, 8) and v.ndim == 2 and len(v) == 13 and v.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(v), expected)
    np.testing.assert_array_equal(v[3:9], expected[3:9])  # crosses two shard boundaries
    np.testing.assert_array_equal(v[-1], expected[-1])
    np.testing.assert_array_equal(v[[12, 0, 5, 5]], expected[[12, 0, 5, 5]])
    np.testing.assert_array_equal(v[1:12:4], expected[1:12:4])
    np.testing.assert_array_equal(v[10:100], expected[10:])
    assert v[7:7].shape == (0, 8)
    assert [s.count for s in store.iter_shards()] == [5, 1, 7]
    assert all(isinstance(s.vectors, np.memmap) for s in store.iter_shards())

    assert store.ids == [f"img{i}" for i in range(13)]
    assert store.paths[4] == "/data/img4.png"
    assert store.metadata(["n"]).column("n").to_pylist() == list(range(13))
    # the clip-retrieval / autofaiss layout on disk
    names = sorted(p.name for p in (tmp_path / "s" / "img_emb").iterdir())
    assert names == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "s" / "img_emb" / "img_emb_2.npy"), expected[6:]
    )
    info = json.loads((tmp_path / "s" / "store.json").read_text())
    assert info["format_version"] == 1 and info["count"] == 13 and info["dtype"] == dtype
    assert info["backbone"] == {"name": "clip-vit-b32", "weights_id": "sha256:abc"}


def test_append_to_reopened_store(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((2, 3))
    _store_with(tmp_path, [a])
    store = EmbeddingStore.open(tmp_path / "s", backbone=CLIP)
    with store.writing():
        store.append(torch.from_numpy(b), ["x", "y"])  # tensors are accepted too
    again = EmbeddingStore.open(tmp_path / "s")
    np.testing.assert_allclose(np.asarray(again.vectors), np.concatenate([a, b]), rtol=1e-6)
    assert again.ids[-2:] == ["x", "y"] and again.paths[-1] is None
    with pytest.raises(GenattrError, match="already in the store"), again.writing():
        again.append(b[:1], ["img0"])


def test_fp16_overflow_and_bad_shapes_are_refused(tmp_path):
    store = EmbeddingStore.create(tmp_path / "h", CLIP, 2, "float16")
    with pytest.raises(GenattrError, match="overflow float16"):
        store.append(np.array([[1e6, 0.0]]), ["a"])
    with pytest.raises(GenattrError, match="2-d store"):
        store.append(np.zeros((1, 3)), ["a"])
    with pytest.raises(GenattrError, match="NaN"):
        store.append(np.array([[np.nan, 0.0]]), ["a"])
    with pytest.raises(GenattrError, match="duplicate"):
        store.append(np.zeros((2, 2)), ["a", "a"])
    assert EmbeddingStore.open(tmp_path / "h").count == 0


def test_refuses_to_mix_backbones(tmp_path):
    x = np.ones((2, 4), np.float32)
    s1 = _store_with(tmp_path, [x], name="a")
    other_weights = BackboneInfo("clip-vit-b32", "sha256:def")
    s2 = _store_with(tmp_path, [x], name="b", backbone=other_weights)
    s3 = _store_with(tmp_path, [x], name="c", backbone=BackboneInfo("dino-vitb16", "sha256:abc"))
    check_same_backbone(s1, EmbeddingStore.open(tmp_path / "a"))  # same: fine
    with pytest.raises(GenattrError, match="different backbones"):
        check_same_backbone(s1, s2)
    with pytest.raises(GenattrError, match="different backbones"):
        s1.check_compatible(s3)
    with pytest.raises(GenattrError, match="holds clip-vit-b32"):
        EmbeddingStore.open(tmp_path / "a", backbone=other_weights)
    with pytest.raises(GenattrError, match="cannot append"):
        s1.append(x, ["p", "q"], backbone=other_weights)
    assert EmbeddingStore.open(tmp_path / "a").count == 2


def test_not_a_store_and_unknown_version(tmp_path):
    with pytest.raises(GenattrError, match="not an embedding store"):
        EmbeddingStore.open(tmp_path / "nothing")
    _store_with(tmp_path, [np.zeros((1, 2))])
    info = json.loads((tmp_path / "s" / "store.json").read_text())
    info["format_version"] = 99
    (tmp_path / "s" / "store.json").write_text(json.dumps(info))
    with pytest.raises(GenattrError, match="format_version 99"):
        EmbeddingStore.open(tmp_path / "s")
    with pytest.raises(GenattrError, match="already exists"):
        EmbeddingStore.create(tmp_path / "s", CLIP, 2)


DAMAGED_HEADERS = {
    "count not the shards' sum": (lambda i: i.update(count=i["count"] + 1), "shards hold 3 rows"),
    "dim a string": (lambda i: i.update(dim="2"), "dim"),
    "dim zero": (lambda i: i.update(dim=0), "dim"),
    "unknown dtype": (lambda i: i.update(dtype="int8"), "dtype"),
    "shards not a list": (lambda i: i.update(shards={"0": 3}), "shards"),
    "shard without count": (lambda i: i["shards"][0].pop("count"), "shards.0.count"),
    "backbone a string": (lambda i: i.update(backbone="clip"), "backbone"),
    "negative count": (lambda i: i.update(count=-1), "count"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_HEADERS))
def test_a_damaged_store_json_is_one_line_naming_the_field(tmp_path, case):
    mutate, field = DAMAGED_HEADERS[case]
    _store_with(tmp_path, [np.ones((3, 2))])
    path = tmp_path / "s" / "store.json"
    info = json.loads(path.read_text())
    mutate(info)
    path.write_text(json.dumps(info))
    with pytest.raises(GenattrError, match=r"damaged store\.json") as e:
        EmbeddingStore.open(tmp_path / "s")
    assert field in str(e.value) and "\n" not in str(e.value)


def test_uncommitted_shard_files_are_invisible_and_cleaned(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    _store_with(tmp_path, [x])
    root = tmp_path / "s"
    # debris of a crash: a complete-looking shard 1 that store.json never listed, temporaries
    np.save(root / "img_emb" / "img_emb_1.npy", np.ones((5, 2), np.float32))
    (root / "metadata" / "metadata_1.parquet").write_bytes(b"partial")
    (root / "img_emb" / ".img_emb_2.npy.abc.tmp").write_bytes(b"x")
    store = EmbeddingStore.open(root)
    assert store.count == 3 and len(store.vectors) == 3 and store.ids == ["img0", "img1", "img2"]
    with store.writing():
        assert not (root / "img_emb" / "img_emb_1.npy").exists()
        assert not (root / "img_emb" / ".img_emb_2.npy.abc.tmp").exists()
        assert store.append(np.zeros((1, 2)), ["z"]) == 1
    np.testing.assert_array_equal(EmbeddingStore.open(root).vectors[3], [0, 0])


def test_a_failed_shard_write_commits_nothing(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    x = np.ones((2, 2), np.float32)
    store = _store_with(tmp_path, [x])
    before = (tmp_path / "s" / "store.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        store.append(x, ["u", "v"])
    assert (tmp_path / "s" / "store.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "s" / "img_emb").iterdir()) == ["img_emb_0.npy"]
    assert EmbeddingStore.open(tmp_path / "s").count == 2


@pytest.mark.slow
def test_one_writer_at_a_time(tmp_path):
    store = _store_with(tmp_path, [np.zeros((1, 2))])
    other = EmbeddingStore.open(tmp_path / "s")
    with (
        store.writing(),
        pytest.raises(GenattrError, match="already being written"),
        other.writing(),
    ):
        pass
    code = "from genattr.store import EmbeddingStore as S; S.open({!r}).writing().__enter__()"
    with store.writing():
        res = subprocess.run(
            [sys.executable, "-c", code.format(str(tmp_path / "s"))], capture_output=True, text=True
        )
    assert res.returncode != 0 and "another process is writing" in res.stderr
    with other.writing():  # released
        pass


def test_gallery_pth_round_trip(tmp_path):
    feats = torch.randn(11, 6)
    paths = [f"laion/{i:05d}.jpg" for i in range(11)]
    save_gallery_pth(GalleryFeatures(feats, paths), tmp_path / "g.pth")
    store = convert.gallery_pth_to_store(tmp_path / "g.pth", tmp_path / "gs", "clip", shard_size=4)
    assert store.num_shards == 3 and store.ids == paths and store.backbone.name == "clip"
    convert.store_to_gallery_pth(store, tmp_path / "back.pth")
    back = load_gallery_pth(tmp_path / "back.pth")
    torch.testing.assert_close(back.feats, feats, rtol=0, atol=0)
    assert back.paths == paths

    half = convert.gallery_pth_to_store(tmp_path / "g.pth", tmp_path / "h", "clip", dtype="float16")
    assert half.dtype == np.float16
    torch.testing.assert_close(
        convert.store_to_gallery(half).feats, feats.half().float(), rtol=0, atol=0
    )


def _testcase(dim=5, seed=0) -> official.TestCaseFeatures:
    g = torch.Generator().manual_seed(seed)
    chunks = [(0, 2), (2, 3), (3, 6)]
    return official.TestCaseFeatures(
        exemplar_paths=[f"ex/{i}.jpg" for i in range(6)],
        exemplar_chunks=chunks,
        exemplar_feats=torch.randn(6, dim, generator=g),
        synth_paths={"object": [f"o/{i}.png" for i in range(4)], "gpt": ["g/0.png", "g/1.png"]},
        synth_ids={"object": [0, 1, 2, 2], "gpt": [2, 0]},
        synth_feats={
            "object": torch.randn(4, dim, generator=g),
            "gpt": torch.randn(2, dim, generator=g),
        },
    )


def test_testcase_pth_round_trip(tmp_path):
    tc = _testcase()
    save_testcase_pth(tc, tmp_path / "tc.pth")
    store = convert.testcase_pth_to_store(tmp_path / "tc.pth", tmp_path / "ts", "clip")
    meta = store.metadata().to_pylist()
    assert [r["role"] for r in meta].count("exemplar") == 6
    assert meta[7] == {
        "id": "synth/object/1",
        "path": "o/1.png",
        "role": "synth",
        "model_index": 1,
        "prompt_type": "object",
    }
    convert.store_to_testcase_pth(store, tmp_path / "back.pth")
    back = load_testcase_pth(tmp_path / "back.pth")
    assert back.exemplar_chunks == tc.exemplar_chunks and back.exemplar_paths == tc.exemplar_paths
    assert back.prompt_types == ["object", "gpt"] and back.synth_ids == tc.synth_ids
    assert back.synth_paths == tc.synth_paths
    torch.testing.assert_close(back.exemplar_feats, tc.exemplar_feats, rtol=0, atol=0)
    for p in tc.prompt_types:
        torch.testing.assert_close(back.synth_feats[p], tc.synth_feats[p], rtol=0, atol=0)
    with pytest.raises(GenattrError, match="not a test-case store"):
        convert.store_to_testcase(_store_with(tmp_path, [np.zeros((1, 5))], name="plain"))


def test_evaluation_streams_a_store_as_it_does_a_tensor(tmp_path):
    torch.manual_seed(0)
    gallery = torch.randn(2500, 5)  # blocks of >= 1024 rows straddle the 700-row shards
    tc = _testcase()
    store = _store_with(tmp_path, list(gallery.split(700)))
    assert store.num_shards == 4
    expected = evaluate_protocol(gallery, tc, ks=(1, 10, 100), block_elements=1)
    got = evaluate_protocol(store.vectors, tc, ks=(1, 10, 100), block_elements=1)
    assert got.summary() == expected.summary()
    for p in tc.prompt_types:
        np.testing.assert_array_equal(got.per_type[p].ap, expected.per_type[p].ap)
        assert 0 < expected.per_type[p].ap.max() < 1  # real ranks, not a degenerate case
