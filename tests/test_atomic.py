"""Atomic writes leave the finished file, readable as a plain open() would make it, or nothing."""

from __future__ import annotations

import os
import stat

import pytest

from genattr.atomic import atomic_path, write_text_atomic


def test_finished_file_has_the_mode_of_a_plain_write(tmp_path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text_atomic(tmp_path / "atomic.txt", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(plain).st_mode)
    assert (tmp_path / "atomic.txt").read_text() == "x"


def test_failed_block_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "t.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
