"""`extract --engine ray` on a local Ray writes the store the in-process extraction writes."""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from genattr.errors import GenattrError
from genattr.features import get_backbone
from genattr.features.extract import extract
from genattr.features.registry import Backbone
from genattr.store import EmbeddingStore

pytestmark = pytest.mark.slow  # subprocesses, servers or a shared kit: seconds each


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (start-up costs seconds); extract leaves it running."""
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False)
    yield ray
    ray.shutdown()
    mp.undo()


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(23):
        pixels = rng.integers(0, 256, (30 + k % 7, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"{k:02d}.png")
    (src / "05b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    good = (src / "00.png").read_bytes()
    (src / "11b_truncated.png").write_bytes(good[: len(good) // 2])
    return src


def _tiny_conv() -> Backbone:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Flatten())
    preprocess = get_backbone("pixel").preprocess
    return Backbone("tiny-conv", 4 * 15 * 15, conv, preprocess, weights_id="t")


def _assert_same_store(a, b, atol: float) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.info == sb.info  # shards, counts, extraction state (cursor, failures, settings)
    assert sa.metadata().equals(sb.metadata())
    np.testing.assert_allclose(np.asarray(sa.vectors), np.asarray(sb.vectors), rtol=0, atol=atol)
    assert pq.read_table(a / "failed.parquet").equals(pq.read_table(b / "failed.parquet"))


def test_ray_engine_writes_the_local_store(local_ray, images, tmp_path):
    args = {"batch_size": 4, "shard_size": 6}
    local = extract(_tiny_conv(), images, tmp_path / "local", workers=0, **args)
    ray = extract(_tiny_conv(), images, tmp_path / "ray", engine="ray", concurrency=1, **args)
    assert ray.extracted == local.extracted == 23 and ray.failed_now == local.failed_now == 2
    assert ray.store.num_shards == 4
    failed = pq.read_table(tmp_path / "ray" / "failed.parquet").column("id").to_pylist()
    assert failed == ["05b_corrupt.png", "11b_truncated.png"]
    # different batch compositions: float tolerance, not bits (matmul blocking)
    _assert_same_store(tmp_path / "local", tmp_path / "ray", atol=1e-5)
    assert local_ray.is_initialized()  # a Ray the caller started is left running
    with pytest.raises(GenattrError, match="would hold all 2 CPUs"):  # Ray would stall
        extract("pixel", images, tmp_path / "stall", engine="ray", concurrency=2)
    with pytest.raises(GenattrError, match="has 0 GPU"):  # an actor would wait forever
        extract("pixel", images, tmp_path / "gpu", engine="ray", device="cuda")


def test_ray_engine_reads_odd_names_and_refuses_large_files_like_the_local_one(
    local_ray, images, tmp_path
):
    """Real paths that are not UTF-8 travel to Ray's decode tasks intact; the byte limit and the
    listing (skipped entries) are the local engine's."""
    limit = max(p.stat().st_size for p in images.iterdir())
    good = (images / "00.png").read_bytes()
    fd = os.open(os.fsencode(images) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, good)
    os.close(fd)
    (images / "noext").write_bytes(good)  # a PNG by its first bytes
    huge = np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    Image.fromarray(huge).save(images / "huge.png")
    assert (images / "huge.png").stat().st_size > limit
    (images / "notes.txt").write_text("a caption")
    (images / ".hidden.png").write_bytes(good)
    args = {"batch_size": 4, "shard_size": 6, "max_file_mb": limit / 2**20}
    local = extract("pixel", images, tmp_path / "local", workers=0, **args)
    ray = extract("pixel", images, tmp_path / "ray", engine="ray", concurrency=1, **args)
    assert ray.store.ids == local.store.ids and ray.store.count == 23 + 2
    row = ray.store.ids.index("caf\\xe9.png")  # read through its real path by a Ray task
    np.testing.assert_array_equal(ray.store.vectors[row], ray.store.vectors[0])
    np.testing.assert_array_equal(
        ray.store.vectors[ray.store.ids.index("noext")], ray.store.vectors[0]
    )
    failed = pq.read_table(tmp_path / "ray" / "failed.parquet").to_pylist()
    assert [f["id"] for f in failed] == ["05b_corrupt.png", "11b_truncated.png", "huge.png"]
    assert failed[2]["reason"].startswith("larger than")
    assert ray.skipped == local.skipped == {"hidden": 1, "not an image": 1}
    _assert_same_store(tmp_path / "local", tmp_path / "ray", atol=0)  # pixels: exact
    assert pq.read_table(tmp_path / "local" / "skipped.parquet").equals(
        pq.read_table(tmp_path / "ray" / "skipped.parquet")
    )


def test_ray_engine_resumes_a_crashed_local_run(local_ray, images, tmp_path):
    from typer.testing import CliRunner

    from genattr.cli import app

    class Crash(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Crash.calls += 1
            if Crash.calls > 3:
                raise RuntimeError("power cut")
            return x.flatten(1)

    crashing = get_backbone("pixel")
    crashing.model = Crash()
    args = {"batch_size": 3, "shard_size": 5, "workers": 0}
    with pytest.raises(RuntimeError, match="power cut"):
        extract(crashing, images, tmp_path / "resumed", **args)
    assert EmbeddingStore.open(tmp_path / "resumed").extra["extraction"]["cursor"] == 5
    cmd = ["extract", "--features", "pixel", "--images", str(images), "--no-progress"]
    cmd += ["--out", str(tmp_path / "resumed"), "--batch-size", "3", "--shard-size", "5"]
    res = CliRunner().invoke(app, [*cmd, "--engine", "ray"])
    assert res.exit_code == 0, res.output
    assert "resumed after 5" in res.output and "23 vectors" in res.output
    extract("pixel", images, tmp_path / "whole", **args)
    _assert_same_store(tmp_path / "resumed", tmp_path / "whole", atol=0)  # pixels: exact


def test_ray_engine_without_ray_is_a_clear_error(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(GenattrError, match=r"genattr\[ray\]"):
        extract("pixel", images, tmp_path / "out", engine="ray")
    with pytest.raises(GenattrError, match="--engine"):
        extract("pixel", images, tmp_path / "out", engine="slurm")
    assert not (tmp_path / "out").exists()  # refused before any store is created
