"""The allocator setting for batch commands: freed large blocks are reused instead of being
mapped and faulted in again, and every command but `serve` applies it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import genattr.alloc
from genattr.cli import app

# Page faults of allocating, touching and freeing a 64 MB block 10 times, in a fresh process.
FAULTS = """
import json, resource, sys
import numpy as np
from genattr.alloc import tune_for_batch_work
applied = tune_for_batch_work() if sys.argv[1] == "tuned" else False
np.ones(1 << 20)  # numpy's own start-up allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.ones(8 << 20)  # 64 MB, written: every page touched
    del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_batch_setting_reuses_freed_blocks_instead_of_faulting_them_in():
    plain, tuned = _faults("plain"), _faults("tuned")
    if not tuned["applied"]:
        pytest.skip("not glibc: mallopt is not there")
    # Measured: plain glibc maps each block afresh and faults it in every time (~540 faults
    # per 64 MB here: the kernel maps several pages per fault), the tuned heap only the first.
    assert plain["faults"] > 10 * 100, plain
    assert tuned["faults"] < plain["faults"] / 4, (plain, tuned)


def test_every_command_but_serve_sets_it(monkeypatch, tmp_path):
    calls: list[int] = []
    monkeypatch.setattr(genattr.alloc, "tune_for_batch_work", lambda: calls.append(1) or True)
    runner = CliRunner()
    res = runner.invoke(app, ["extract", "--features", "pixel", "--images", str(tmp_path),
                              "--out", str(tmp_path / "s"), "--batch-size", "0"])  # fmt: skip
    assert res.exit_code == 2 and calls == [1], res.output
    res = runner.invoke(app, ["serve", "--index", str(tmp_path), "--port", "99999"])
    assert res.exit_code == 2 and calls == [1], res.output
