"""Reading files from the wild: regular files only, at most so many bytes, and telling an
image by its first bytes. Sources (`genattr.data.sources`) list; this reads."""

from __future__ import annotations

import os
import stat

_SNIFF_BYTES = 32
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)  # BITMAPCOREHEADER .. BITMAPV5HEADER


class ItemRefused(Exception):
    """An item that is not read at all (not a regular file, too large); str(e) is the reason."""


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "folder"),
    ):
        if test(mode):
            return kind
    return f"mode {stat.S_IFMT(mode):o}"


def not_regular_reason(mode: int) -> str:
    return f"not a regular file ({_file_kind(mode)})"


def too_large_reason(size: int, max_bytes: int) -> str:
    return (
        f"larger than {max_bytes / 2**20:.4g} MB ({size} bytes); "
        "raise the limit (--max-file-mb) to read it"
    )


def _open_regular(path: str) -> int:
    """A file descriptor for a regular file, or ItemRefused; never blocks on a FIFO.

    The path is checked with os.stat before it is opened (opening a device can have effects),
    and the open file again with fstat (it may have been replaced in between); O_NONBLOCK makes
    the open of a FIFO return at once instead of waiting for a writer.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ItemRefused(not_regular_reason(mode))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ItemRefused(not_regular_reason(mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of regular file `path`: ItemRefused for anything else or for more than
    `max_bytes` (checked on the size before reading, and by reading at most one byte more)."""
    fd = _open_regular(path)
    with open(fd, "rb", closefd=True) as f:
        if max_bytes is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ItemRefused(too_large_reason(size, max_bytes))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the stat
        raise ItemRefused(too_large_reason(len(data), max_bytes))
    return data


def sniff_image(head: bytes) -> str | None:
    """The image format whose signature `head` (a file's first bytes) starts with, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return "TIFF"
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return "BMP"
    # ICONDIR: reserved 0, type 1, count > 0; first entry's reserved byte 0, planes 0 or 1
    ico = head[:4] == b"\0\0\1\0" and len(head) >= 12 and head[4:6] != b"\0\0"
    if ico and head[9] == 0 and head[10:12] in (b"\0\0", b"\1\0"):
        return "ICO"
    return None


def sniff_file(path: str) -> str | None:
    fd = _open_regular(path)
    with open(fd, "rb", closefd=True) as f:
        return sniff_image(f.read(_SNIFF_BYTES))
