"""Helpers shared by the service's memory tests and `benchmarks/serve_memory.py`: worst-case
uploads and a look at a server process from outside."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

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


# The largest legal upload at the service's default limits: 89.5 M pixels (Pillow's limit)
# within 16,383 px a side (WebP's own limit); formats stored raw are held to the 20 MB upload.
WORST_SIZE = (16383, 5461)


def _pillow(mode: str, fmt: str, size: tuple[int, int] = WORST_SIZE, **options) -> bytes:
    import io

    from PIL import Image

    color = (9,) * len(Image.new(mode, (1, 1)).getbands())
    buf = io.BytesIO()
    Image.new(mode, size, color if len(color) > 1 else 9).save(buf, fmt, **options)
    return buf.getvalue()


def ico_wrapping(png: bytes) -> bytes:
    """An ICO file whose one entry is `png`: Pillow decodes it whole when the ICO is opened."""
    w, h = struct.unpack(">II", png[16:24])  # the IHDR's size; 0 in ICO says 256 or more
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", w % 256, h % 256, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


# Each accepted format's worst legal upload by decoding memory, as a recipe (name -> bytes).
WORST_UPLOADS = {
    "png-rgba16": lambda: constant_png(*WORST_SIZE, "rgba16"),
    "png-gray16": lambda: constant_png(*WORST_SIZE, "gray16"),
    "webp-lossless-rgba": lambda: _pillow("RGBA", "WEBP", lossless=True),
    "webp-lossy-rgb": lambda: _pillow("RGB", "WEBP", quality=10),
    "tiff-one-strip-rgba": lambda: _pillow(
        "RGBA", "TIFF", compression="tiff_adobe_deflate", strip_size=2**31 - 1
    ),
    "tiff-float": lambda: _pillow("F", "TIFF", compression="tiff_adobe_deflate"),
    "gif": lambda: _pillow("P", "GIF"),
    "jpeg-cmyk": lambda: _pillow("CMYK", "JPEG"),
    "bmp-rgb-20mb": lambda: _pillow("RGB", "BMP", (4096, 1700)),
    "pgm-16bit-20mb": lambda: _pillow("I;16", "PPM", (4096, 2500)),
}


_MEASURE = """
import json, sys
from genattr.data.images import decode_rgb, decoded_bytes, open_image
from genattr.serve.budget import trim_heap
def status(field):
    return [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field)][0]
data, work_side = open(sys.argv[1], "rb").read(), int(sys.argv[2])
image = open_image(data)
info = {"format": image.format, "mode": image.mode, "size": list(image.size),
        "reserved_mb": decoded_bytes(image, work_side) / 2**20}
del image
trim_heap()
start = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
decode_rgb(open_image(data), max_work_side=work_side)
info["peak_mb"] = (status("VmHWM") - start) / 1024
print(json.dumps(info))
"""


def decode_peak(data: bytes, work_side: int = 2048) -> dict:
    """Decoding `data` to `work_side` in a fresh process: its format, mode and size, the peak
    RSS above the start of decoding (VmHWM, reset first) and what `decoded_bytes` reserves,
    in MB."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, f.name, str(work_side)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
            cwd=Path(__file__).parents[1],
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


# Uploads the service refuses from their header although Pillow could read them, with the
# worst accepted ones: what `benchmarks/serve_memory.py` sends.
HOSTILE_UPLOADS = {
    **WORST_UPLOADS,
    "ico-png-gray16": lambda: ico_wrapping(constant_png(*WORST_SIZE, "gray16")),
}
