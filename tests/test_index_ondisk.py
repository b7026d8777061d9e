"""On-disk IVF indexes: the same answers as the in-memory ones, and no half-built index loads."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from genattr.errors import GenattrError
from genattr.search.exact import topk_exact
from genattr.search.index import AttributionIndex, build_index, choose_index, parse_size
from genattr.store import BackboneInfo, EmbeddingStore
from tests.support import clustered, normed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12,000 clustered vectors in an embedding store of four shards."""
    path = tmp_path_factory.mktemp("store") / "s"
    s = EmbeddingStore.create(path, BackboneInfo("test", "sha256:test"), 32)
    g = clustered(12_000, 32)
    for k in range(4):
        rows = range(3000 * k, 3000 * (k + 1))
        s.append(
            g[3000 * k : 3000 * (k + 1)], [f"img{i}" for i in rows], [f"{i}.png" for i in rows]
        )
    return EmbeddingStore.open(path)


def test_auto_goes_on_disk_past_the_budget():
    # 2B x 768: even 24-byte PQ codes (48 GB) exceed 4 GB, so the lists go to disk,
    # where the codes need not fit in RAM: the largest PQ (96 bytes) is used
    spec = choose_index(2_000_000_000, 768, parse_size("4GB"))
    assert spec.kind == "ivfpq-ondisk" and spec.on_disk and spec.factory.endswith(",PQ96np")
    assert choose_index(5_000_000, 512, parse_size("4GB")).kind == "ivfpq"  # codes fit
    assert choose_index(1000, 64, 10**9, kind="ivf-ondisk").factory.endswith(",Flat")


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_on_disk_index_answers_like_the_in_memory_one(store, tmp_path, kind, one_torch_thread):
    q = normed(clustered(25, 32, seed=3)).numpy()
    mem = build_index(store.vectors, tmp_path / "mem", kind=kind, train_size=6000)
    disk = build_index(
        store.vectors,
        tmp_path / "disk",
        kind=f"{kind}-ondisk",
        train_size=6000,
        shard_rows=2500,  # five build shards, across the store's four
        ids=store.ids,
    )
    assert (tmp_path / "disk" / "index.ivfdata").is_file()
    assert not (tmp_path / "disk" / ".build").exists()
    # identical training: the same candidates and the same exact similarities
    s_mem, i_mem = mem.search(q, 20)
    s_disk, i_disk = disk.search(q, 20)
    np.testing.assert_array_equal(i_disk, i_mem)
    np.testing.assert_array_equal(s_disk, s_mem)
    # query time memory-maps both the lists and the re-rank vectors, wherever the index moved
    moved = shutil.move(tmp_path / "disk", tmp_path / "moved")
    again = AttributionIndex.load(moved)
    assert isinstance(again.exact_vectors, np.memmap)
    np.testing.assert_array_equal(again.search(q, 20)[1], i_mem)
    assert again.metadata()[0][:2] == ["img0", "img1"]
    if kind == "ivf":  # probing every list of a flat IVF is exact search
        again.set_nprobe(again.spec.nlist)
        ref_s, ref_i = topk_exact(
            torch.from_numpy(np.asarray(store.vectors)), torch.from_numpy(q), 20
        )
        np.testing.assert_array_equal(again.search(q, 20)[1], ref_i)
        np.testing.assert_allclose(again.search(q, 20)[0], ref_s, atol=1e-5)


def test_a_killed_build_is_not_taken_for_a_complete_one(store, tmp_path, monkeypatch):
    from genattr.search import index as index_mod

    out = tmp_path / "idx"
    build_index(store.vectors, out, kind="ivf-ondisk", train_size=6000, shard_rows=4000)
    q = normed(clustered(3, 32, seed=4)).numpy()
    before = AttributionIndex.load(out).search(q, 5)

    def killed(self, ivfdata):
        raise KeyboardInterrupt  # as if the process died before the merge

    monkeypatch.setattr(index_mod._OnDiskAdder, "merge", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(store.vectors, out, kind="ivf-ondisk", train_size=6000, shard_rows=4000)
    assert (out / ".build").is_dir()  # build shards left behind, no index.json
    with pytest.raises(GenattrError, match="unfinished index build"):
        AttributionIndex.load(out)
    monkeypatch.undo()
    build_index(store.vectors, out, kind="ivf-ondisk", train_size=6000, shard_rows=4000)
    np.testing.assert_array_equal(AttributionIndex.load(out).search(q, 5)[1], before[1])
    # lists missing: refused, never half-answered
    (out / "index.ivfdata").rename(out / "elsewhere")
    with pytest.raises(GenattrError, match=r"index\.ivfdata is missing"):
        AttributionIndex.load(out)


@pytest.mark.slow
def test_cli_builds_an_on_disk_index(store, tmp_path):
    from typer.testing import CliRunner

    from genattr.cli import app

    out = tmp_path / "idx"
    args = ["index", "build", "--store", str(store.path), "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(app, [*args, "--kind", "ivfpq-ondisk"])
    assert res.exit_code == 0, res.output
    assert "ivfpq-ondisk index" in res.output and "12,000 images" in res.output
    assert AttributionIndex.load(out).spec.on_disk


_SLOW_BUILD = """
import sys, time
from genattr.search import index as m
from genattr.store import EmbeddingStore

add = m._OnDiskAdder.add
def slow_add(self, start, block):  # a pause after each block, so a kill lands mid-build
    add(self, start, block)
    time.sleep(float(sys.argv[3]))
m._OnDiskAdder.add = slow_add
store = EmbeddingStore.open(sys.argv[1])
m.build_index(store.vectors, sys.argv[2], kind="ivf-ondisk", train_size=20_000, shard_rows=50_000)
"""


@pytest.mark.slow
def test_sigkill_mid_build_then_rebuild_equals_a_clean_build(tmp_path):
    """A real process killed with SIGKILL while its build shards are on disk: the folder is
    refused as unfinished, and building again gives the index a clean build gives."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "s"
    s = EmbeddingStore.create(path, BackboneInfo("test", "sha256:test"), 16)
    g = clustered(200_000, 16)  # four 65,536-row blocks: build shards after each
    s.append(g, [f"img{i}" for i in range(len(g))], [f"{i}.png" for i in range(len(g))])

    def build(out, pause):
        return subprocess.Popen(
            [sys.executable, "-c", _SLOW_BUILD, str(path), str(out), str(pause)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    killed = tmp_path / "killed"
    proc = build(killed, 5.0)
    deadline = time.monotonic() + 120
    while not list((killed / ".build").glob("shard_*.index")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no build shard appeared"
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    with pytest.raises(GenattrError, match="unfinished index build"):
        AttributionIndex.load(killed)

    clean = tmp_path / "clean"
    for out in (killed, clean):
        proc = build(out, 0.0)
        assert proc.wait(300) == 0, proc.stderr.read() if proc.stderr else ""
    assert not (killed / ".build").exists()
    for name in ("vectors.npy", "metadata.parquet", "index.json"):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    q = normed(clustered(20, 16, seed=5)).numpy()
    a, b = AttributionIndex.load(killed), AttributionIndex.load(clean)
    np.testing.assert_array_equal(a.search(q, 10)[1], b.search(q, 10)[1])
    np.testing.assert_array_equal(a.search(q, 10)[0], b.search(q, 10)[0])
