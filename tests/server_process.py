"""Helpers shared by the service's memory tests and `benchmarks/serve_memory.py`: worst-case
uploads and a look at a server process from outside."""

from __future__ import annotations

import socket
import struct
import zlib

# PNG colour types: grey, RGB, grey + alpha, RGBA; channels of each
PNG_KINDS = {"gray16": (0, 1), "rgb16": (2, 3), "la16": (4, 2), "rgba16": (6, 4)}


def constant_png(width: int, height: int, kind: str = "gray16", value: int = 0x5A) -> bytes:
    """A 16-bit PNG of one colour, written row by row: a few hundred KB however many pixels
    it has (the decoder still has to inflate and hold every one of them)."""
    color_type, channels = PNG_KINDS[kind]

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" + bytes([value]) * (width * channels * 2)
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_mb(pid: int, field: str) -> float:
    """VmRSS, VmHWM, ... of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)
