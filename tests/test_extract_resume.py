"""Kill a real extraction process with SIGKILL mid-way; the resumed store must equal a clean one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genattr.store import EmbeddingStore

pytestmark = pytest.mark.slow  # a real extraction killed and resumed: seconds

# A pixel backbone slowed down per batch, so a kill lands mid-run; the same script runs the
# reference extraction, so every run uses the same model code.
SCRIPT = """
import sys, time, torch
from genattr.features import get_backbone
from genattr.features.extract import extract

class Slow(torch.nn.Module):
    def forward(self, x):
        time.sleep(float(sys.argv[3]))
        return x.flatten(1) * 2.0 - 1.0

backbone = get_backbone("pixel")
backbone.model = Slow()
extract(backbone, sys.argv[1], sys.argv[2], batch_size=3, shard_size=5, workers=1)
"""


def _run(src, out, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(src), str(out), str(delay)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _count(out) -> int:
    try:
        return json.loads((out / "store.json").read_text())["count"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_when(proc: subprocess.Popen, out, count: int, extra_wait: float) -> int:
    deadline = time.monotonic() + 60
    while _count(out) < count:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "extraction made no progress"
        time.sleep(0.005)
    time.sleep(extra_wait)  # land somewhere inside the next shard
    workers = _children(proc.pid)
    assert workers, "extraction should decode in a worker process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "decode workers outlived the killed extraction"
    return _count(out)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_store(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(38):
        arr = rng.integers(0, 256, (24 + k % 5, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(src / f"{k:03d}.png")
    (src / "007_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # failures must resume too
    (src / "021_empty.jpg").write_bytes(b"")

    ref = tmp_path / "ref"
    done = _run(src, ref, 0.0)
    assert done.wait(120) == 0, done.stderr.read().decode()

    out = tmp_path / "out"
    first = _kill_when(_run(src, out, 0.05), out, 10, 0.07)
    assert 10 <= first < 38
    second = _kill_when(_run(src, out, 0.05), out, first + 5, 0.02)
    assert first < second < 38, "the second run must continue, not restart"
    store = EmbeddingStore.open(out)
    assert store.extra["extraction"]["complete"] is False

    last = _run(src, out, 0.0)
    assert last.wait(120) == 0, last.stderr.read().decode()

    a, b = EmbeddingStore.open(ref), EmbeddingStore.open(out)
    assert b.count == a.count == 38 and b.num_shards == a.num_shards == 8
    assert b.ids == a.ids
    np.testing.assert_array_equal(np.asarray(b.vectors), np.asarray(a.vectors))
    assert b.metadata().equals(a.metadata())
    failed_a = pq.read_table(ref / "failed.parquet").to_pylist()
    assert pq.read_table(out / "failed.parquet").to_pylist() == failed_a
    assert [f["id"] for f in failed_a] == ["007_broken.png", "021_empty.jpg"]
    assert b.extra["extraction"]["complete"] is True
    assert b.extra["extraction"]["listing"] == a.extra["extraction"]["listing"]
    assert pq.read_table(out / "skipped.parquet").num_rows == 0
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == sorted(
        p.name for p in (ref / "img_emb").iterdir()
    )
