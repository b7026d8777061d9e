"""Atomic writes leave the finished file, readable as a plain open() would make it, or nothing."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import genattr.atomic
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


def _disk_with_free_bytes(monkeypatch, free: int) -> None:
    real = os.statvfs

    class Full:
        f_frsize, f_bavail = 4096, free // 4096

    monkeypatch.setattr(
        genattr.atomic.os, "statvfs", lambda p: Full() if str(p).startswith("/") else real(p)
    )


# How each writer reported a full 600 KB tmpfs here (numpy 2.4, torch 2.13, safetensors,
# pyarrow): the first three carry no errno, the last no file name.
DISGUISED = {
    "numpy": OSError("200000 requested and 65504 written"),
    "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    "safetensors": Exception("Error while serializing: I/O error: No space left on device"),
    "pyarrow": OSError(errno.ENOSPC, "Error writing bytes to file"),
}


@pytest.mark.parametrize("writer", DISGUISED)
def test_a_full_disk_is_named_whatever_library_wrote(tmp_path, monkeypatch, writer) -> None:
    target = tmp_path / "shard.npy"
    _disk_with_free_bytes(monkeypatch, 4096)
    with pytest.raises(OSError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise DISGUISED[writer]
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_other_errors_pass_unchanged_when_the_disk_has_room(tmp_path, monkeypatch) -> None:
    """Only a disk that is really full turns an error without errno into ENOSPC; an errno
    that already says so just gets the file's name."""
    _disk_with_free_bytes(monkeypatch, 10 * 2**30)
    for writer, error in DISGUISED.items():
        with pytest.raises(type(error)) as info, atomic_path(tmp_path / "x") as _:
            raise error
        if writer == "pyarrow":
            assert info.value.filename == str(tmp_path / "x")
        else:
            assert info.value is error
