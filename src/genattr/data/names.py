"""File names as the file system holds them, and as records can hold them.

File names are bytes; parquet and JSON need valid UTF-8. Ids and recorded `path`s are a
printable form (`display_name`: undecodable bytes as \\xNN, the identity for every name that
is valid UTF-8), and where that form had to escape something, the name's own bytes are kept
beside it (`path_bytes`), so a store or an index can open the file again.
"""

from __future__ import annotations

import os


def display_name(name: str) -> str:
    """A printable, valid-UTF-8 form of a file name: undecodable bytes become \\xNN.

    The identity for every name that is valid UTF-8, so ids of ordinary folders do not change.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# The metadata column that keeps a file name's own bytes where the printable `path` had to
# escape them (not UTF-8): what stores and indexes open the file with.
PATH_BYTES = "path_bytes"


def path_bytes_column(files: list[str]) -> list[bytes | None] | None:
    """`os.fsencode` of each file whose name is not printable as it is (`display_name` escapes
    it), None for the others; None altogether for ordinary collections."""
    raw = [None if display_name(f) == f else os.fsencode(f) for f in files]
    return None if all(b is None for b in raw) else raw


def openable_paths(paths: list[str], raw: list[bytes | None] | None) -> list[str]:
    """Paths to open: the file system's own name where it was kept, else the recorded path."""
    if raw is None:
        return list(paths)
    return [p if b is None else os.fsdecode(b) for p, b in zip(paths, raw, strict=True)]
