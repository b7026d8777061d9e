"""Atomic file writes: a reader never sees a half-written file, a crash leaves no partial one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from genattr.errors import GenattrError

# mkstemp makes 0600 files; a finished file gets the mode a plain open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


# Errors of the disk, not of genattr: a full disk, a quota, a failing device.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
# Free space under which a failed write is taken for a full disk (the failed file still
# holds what it wrote when this is checked).
_NEARLY_FULL = 16 * 2**20


def _disk_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError (with errno and file name) a failed write of `path` really was, when the
    writer's own error hides it: numpy's short write ("N requested and M written", no errno),
    torch's zip writer ("unexpected pos"), safetensors' SafetensorError, or an errno with no
    file name (pyarrow)."""
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno in DISK_ERRNOS and not e.filename:
            return OSError(e.errno, os.strerror(e.errno), str(path))
        return None
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < _NEARLY_FULL:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.
    A write that fails because the disk is full raises OSError(ENOSPC) naming `path`, whatever
    library wrote it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except Exception as e:
        disk = _disk_error(e, path)
        if disk is None:
            raise
        raise disk from e
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(
    path: str | os.PathLike, kind: Literal["dir", "file"], flag: str = "--out"
) -> Path:
    """Refuse an output path that cannot be written, before any work: a file where a folder is
    wanted or the reverse, or a parent that is not a writable folder. Leaves nothing behind."""
    out = Path(path)
    if kind == "dir" and out.exists() and not out.is_dir():
        raise GenattrError(f"{flag} {out}: exists and is a file, not a folder")
    if kind == "file" and out.is_dir():
        raise GenattrError(f"{flag} {out}: is a folder; give a file name")
    want = out if kind == "dir" else out.parent
    base = _nearest_existing(want)
    if not base.is_dir():
        raise GenattrError(f"{flag} {out}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise GenattrError(f"{flag} {out}: cannot write under {base}")
    _probe_writable(base, folders=base != want, what=f"{flag} {out}")
    return out


def _probe_writable(base: Path, folders: bool, what: str) -> None:
    """Create and remove one entry in `base` (a folder when folders must be made under it):
    os.access cannot see read-only mounts, pseudo file systems (/proc, /sys) or root's
    bypassed permissions, but a real creation fails on all of them."""
    try:
        if folders:
            os.rmdir(tempfile.mkdtemp(prefix=".genattr-probe.", dir=base))
        else:
            fd, name = tempfile.mkstemp(prefix=".genattr-probe.", dir=base)
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise GenattrError(f"{what}: cannot create anything under {base} ({reason})") from None
