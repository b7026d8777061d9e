"""Decoding images from the wild into RGB, or a reason why not.

Real collections hold CMYK JPEGs, palette and alpha PNGs, 16-bit scans, truncated downloads,
empty files and files that are not images at all. `load_rgb` converts whatever can be converted
(alpha composited on white, 16-bit scaled to 8 bits, not clipped) and raises `ImageDecodeError`
with a short reason for the rest, so an extraction can record and skip them. EXIF orientation is
not applied, as in the authors' extract_feat.py (`Image.open(path).convert('RGB')`).

Memory: a small upload can be a huge image (a constant 16-bit PNG of 89 M pixels is 180 KB).
Conversion to RGB works in strips of rows, so what it needs besides the decoded pixels and the
result is a few MB whatever the image's size, and without float64 copies (16-bit to 8-bit is
integer arithmetic, float images stay float32). A caller that only needs a working size (the
web service: backbones take at most 518 px) passes `max_work_side`: JPEGs are then decoded at
a reduced scale (`draft`) and anything still larger is box-averaged (`Image.reduce`) strip by
strip as it is converted, so the full-size RGB image never exists. Images within
`max_work_side` are converted exactly as without it. `open_image` + `decode_rgb` split
`load_rgb` in two, so a caller can size the decoding (`decoded_bytes`) before paying for it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (~ 0.25 GB of RGBA)
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_WHITE = (255, 255, 255)
# Pillow's pixel limit and the warning filters are process-wide: threads (the web service's)
# decoding at once must not undo each other's settings.
_PILLOW_GLOBALS = threading.Lock()
# Rows converted at a time are about this many bytes of RGB: the temporaries of a conversion
# (a cropped strip, its 8-bit and RGB versions) stay a few MB whatever the image's size.
STRIP_BYTES = 2 * 2**20
# Formats whose decoding does not look at Pillow's pixel limit again after `open` (their
# plugins do not call its check while loading), so threads decode them at the same time.
_LOAD_WITHOUT_LIMITS = ("PNG", "JPEG", "BMP", "PPM")
# Full-size buffers decoding holds at its peak, in units of the decoded image, where the
# decoder keeps its own besides the image (measured by benchmarks/decode_peaks.py at 89 M
# pixels): libwebp's canvas, its output and Pillow's copy of it (3.8x); libtiff's strip when
# a TIFF is one strip (1.9x). `decoded_bytes` counts them; other formats decode in place.
_DECODER_COPIES = {"WEBP": 4, "TIFF": 2, "MPO": 2, "ICO": 2, "ICNS": 2, "PSD": 2, "SGI": 2}
# What the web service accepts: formats whose `Image.open` reads the header only. Others do
# real work when merely opened (Pillow's ICO reader decodes the embedded image, EPS scans the
# whole file), so a header check of theirs would be a full decode outside the memory budget.
# (JPEG's reader opens MPO files too.)
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "PPM", "TIFF", "WEBP")


class ImageDecodeError(Exception):
    """An image that cannot be turned into RGB; the message is the reason recorded."""


def _storage_bytes(mode: str) -> int:
    """Bytes per pixel of Pillow's storage for `mode` (RGB is stored as 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


# round(v * 255 / 65535) for every 16-bit v, as (v + 128) // 257: no integer is a tie
_STRETCH_16 = ((np.arange(65536, dtype=np.int32) + 128) // 257).astype(np.uint8)


def _to_uint8(arr: np.ndarray, mode: str, stretch: bool) -> np.ndarray:
    """One strip of a 16/32-bit integer or float grayscale image to 8 bits (2-D uint8).

    Integer modes: `stretch` maps the 16-bit range 0..65535 onto 0..255, rounded to nearest
    (a table lookup), else values are clipped. Float: times 255 when `stretch` (values in
    [0, 1]), rounded, NaN as 0, clipped; in float32, which rounds exactly as float64 would
    (the values are float32 already)."""
    if mode == "F":
        x = arr * np.float32(255.0) if stretch else arr
        return np.clip(np.rint(np.nan_to_num(x)), 0, 255).astype(np.uint8)
    if not stretch:
        return np.clip(arr, 0, 255).astype(np.uint8)
    if arr.dtype.itemsize == 2 and arr.dtype.kind == "u":
        return _STRETCH_16[arr]
    # 32-bit (or signed 16-bit): anything below 0 gives 0, from 65535 up 255
    return _STRETCH_16[np.clip(arr, 0, 65535)]


def _strip_rows(width: int, factor: int = 1) -> int:
    """Rows per strip: about STRIP_BYTES of RGB, a multiple of `factor` (reduce's boxes)."""
    rows = max(1, STRIP_BYTES // (4 * max(1, width)))
    return max(factor, rows // factor * factor)


def _strips(image: Image.Image, rows: int) -> Iterator[tuple[int, Image.Image]]:
    """(top row, strip) of `rows` rows each (the last may be shorter); strips keep the
    palette and the info (transparency) of the image."""
    w, h = image.size
    for top in range(0, h, rows):
        # The core's crop: Image.crop checks Pillow's pixel limit, which another thread
        # decoding under a smaller limit may have set for a moment (see _pillow_limits).
        yield top, image._new(image.im.crop((0, top, w, min(h, top + rows))))


def _stretch(image: Image.Image) -> bool:
    """Whether a 16/32-bit or float image is scaled (True) or clipped to 8 bits, decided on
    the whole image: 16-bit modes always; 32-bit integers when a value exceeds 255; floats
    when none exceeds 1.0 (NaN ignored)."""
    mode = image.mode
    if mode.startswith("I;16"):
        return True
    if mode == "I":
        return bool(image.getextrema()[1] > 255)  # type: ignore[operator]
    if image.width * image.height == 0:
        return True
    hi = np.float32(np.nan)
    for _, strip in _strips(image, _strip_rows(image.width)):
        hi = np.fmax(hi, np.fmax.reduce(np.asarray(strip), axis=None))
    return bool(hi <= 1.0)  # all NaN: False, as nanmax's NaN compared to 1.0


def _scale_to_uint8(image: Image.Image, stretch: bool | None = None) -> Image.Image:
    """16/32-bit integer and float grayscale to 8 bits by scaling the full range, not clipping.

    In strips of rows: no full-size float copy (the old float64 path held five)."""
    if stretch is None:
        stretch = _stretch(image)
    w, h = image.size
    out = np.empty((h, w), dtype=np.uint8)
    for top, strip in _strips(image, _strip_rows(w)):
        part = np.asarray(strip)
        out[top : top + part.shape[0]] = _to_uint8(part, image.mode, stretch)
    return Image.fromarray(out)


def _convert(image: Image.Image, stretch: bool | None = None) -> Image.Image:
    """Any Pillow mode to RGB, the whole image at once (small images and strips)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "L" and "transparency" in image.info:
        image, mode = image.convert("LA"), "LA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scale_to_uint8(image, stretch).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _needs_stretch_decision(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def _to_rgb(image: Image.Image, factor: int = 1) -> Image.Image:
    """`to_rgb`, then `reduce(factor)` when factor > 1, computed strip by strip when the image
    is large: the result is the same (conversion is per pixel once the 16-bit scaling is
    decided on the whole image, and strips are whole rows of reduce's boxes), but the
    temporaries are a strip's and the full-size RGB image never exists when factor > 1."""
    w, h = image.size
    if image.mode == "RGB":
        return image.reduce(factor) if factor > 1 else image
    rows = _strip_rows(w, factor)
    if factor == 1 and rows >= h:
        return _convert(image)
    stretch = _stretch(image) if _needs_stretch_decision(image.mode) else None
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    for top, strip in _strips(image, rows):
        rgb = _convert(strip, stretch)
        out.paste(rgb.reduce(factor) if factor > 1 else rgb, (0, top // factor))
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha over white, palette transparency honoured, 16-bit scaled."""
    return _to_rgb(image)


def work_factor(size: tuple[int, int], max_work_side: int | None) -> int:
    """The integer factor `decode_rgb` shrinks an image of `size` by: 1 within the bound,
    else the smallest that brings its longer side to at most `max_work_side`."""
    if max_work_side is None:
        return 1
    return max(1, math.ceil(max(size) / max_work_side))


def decoded_bytes(image: Image.Image, max_work_side: int | None = None) -> int:
    """A bound on the memory `decode_rgb(image, max_work_side=...)` holds at its peak, from
    the header alone: the decoded pixels (times the decoder's own full-size buffers,
    `_DECODER_COPIES`; a JPEG at its reduced DCT scale), the RGB result, a strip's
    temporaries, and the metadata already read (PNG text chunks can hold 64 MB)."""
    w, h = image.size
    if image.format == "JPEG":
        scale = _jpeg_scale((w, h), max_work_side)
        w, h = -(-w // scale), -(-h // scale)
    pixels = w * h * _storage_bytes(image.mode)
    decoded = pixels * _DECODER_COPIES.get(str(image.format), 1)
    f = work_factor((w, h), max_work_side)
    result = -(-w // f) * -(-h // f) * 4
    # A strip's copies: cropped, RGBA, white, composited, RGB (the whole image when small).
    temporaries = 5 * min(h, _strip_rows(w, f)) * w * 4
    slack = pixels // 16 + 4 * 2**20  # the decoder's row buffers, allocator rounding (measured)
    return decoded + slack + result + temporaries + _info_bytes(image)


def _info_bytes(image: Image.Image) -> int:
    return sum(len(v) for v in image.info.values() if isinstance(v, (str, bytes)))


def _jpeg_request(size: tuple[int, int], max_work_side: int | None) -> tuple[int, int] | None:
    """The size asked of a JPEG's `draft`: the shrunk size, or None within the bound."""
    f = work_factor(size, max_work_side)
    return None if f == 1 else (max(1, size[0] // f), max(1, size[1] // f))


def _jpeg_scale(size: tuple[int, int], max_work_side: int | None) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's JPEG `draft` picks for `_jpeg_request`."""
    want = _jpeg_request(size, max_work_side)
    if want is None:
        return 1
    scale = min(size[0] // want[0], size[1] // want[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


@contextlib.contextmanager
def _pillow_limits(max_pixels: int | None) -> Iterator[None]:
    """Pillow's pixel limit set to `max_pixels`, its warning an error, for one thread at a
    time (both are process-wide)."""
    with _PILLOW_GLOBALS, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Whatever Pillow raises, as an ImageDecodeError with a short reason."""
    try:
        yield
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageDecodeError(f"truncated or corrupt: {e}") from None
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding") from None
    except Exception as e:  # plugins raise struct.error, KeyError, ...: never stop a run
        raise ImageDecodeError(f"cannot decode: {type(e).__name__}: {e}") from None


def open_image(
    source: str | os.PathLike | bytes | BinaryIO,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    min_side: int = 1,
    max_side: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Open a path, encoded bytes or a binary file and check its header; no pixel is decoded
    yet (`decode_rgb` does that) when its format is one of `UPLOAD_FORMATS`. `formats` limits
    what is recognised (None: all of Pillow's). Raises ImageDecodeError as `load_rgb` does."""
    fp: BinaryIO
    if isinstance(source, bytes):
        fp = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                fp = io.BytesIO(f.read())
        except OSError as e:
            raise ImageDecodeError(f"cannot read: {e.strerror or e}") from None
    else:
        fp = source
    with _decode_errors():
        fp.seek(0, os.SEEK_END)
        empty = fp.tell() == 0
        fp.seek(0)
    if empty:
        raise ImageDecodeError("empty file")
    with _decode_errors(), _pillow_limits(max_pixels):
        try:
            image = Image.open(fp, formats=formats)
        except UnidentifiedImageError:
            if formats is None:
                raise
            accepted = ", ".join(formats)
            raise ImageDecodeError(f"not an image in an accepted format ({accepted})") from None
        w, h = image.size
        if min(w, h) < min_side:
            raise ImageDecodeError(f"too small: {w}x{h} pixels (at least {min_side} a side)")
        if max_side is not None and max(w, h) > max_side:
            raise ImageDecodeError(f"too large: {w}x{h} pixels (at most {max_side} a side)")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(
                f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}"
            )
        return image


def decode_rgb(
    image: Image.Image,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    max_work_side: int | None = None,
) -> Image.Image:
    """Decode an image from `open_image` into RGB (first frame of animations and multi-page
    files), shrunk by an integer factor to at most `max_work_side` a side when larger (JPEGs
    at a reduced DCT scale, then a box average); the result carries no metadata."""
    with _decode_errors():
        with _pillow_limits(max_pixels):
            image.seek(0)
            want = _jpeg_request(image.size, max_work_side)
            if image.format == "JPEG" and want is not None:
                image.draft(None, want)  # decoded at 1/2, 1/4 or 1/8 scale, still >= want
            if image.format not in _LOAD_WITHOUT_LIMITS:
                image.load()
        image.load()  # the formats that do not check the pixel limit again: not serialised
        rgb = _to_rgb(image, work_factor(image.size, max_work_side))
        rgb.info = {}
        return rgb


def load_rgb(
    source: str | os.PathLike | bytes | BinaryIO,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    min_side: int = 1,
    max_side: int | None = None,
    max_work_side: int | None = None,
) -> Image.Image:
    """Open a path or encoded bytes and return a fully decoded RGB PIL image.

    Raises ImageDecodeError("empty file" | "not an image: ..." | "decompression bomb: ..." |
    "too small: ..." | "too large: ..." | "truncated or corrupt: ..." | ...) for anything that
    cannot be decoded. Size limits are checked on the header, before any pixel is decoded.
    With `max_work_side`, an image with a longer side is shrunk while it is decoded (see
    `decode_rgb`); smaller images are unaffected.
    """
    image = open_image(source, max_pixels, min_side=min_side, max_side=max_side)
    return decode_rgb(image, max_pixels, max_work_side=max_work_side)


def load_converted(
    source: str | os.PathLike | bytes | BinaryIO, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open with `open_image`'s guards (empty, unreadable, decompression bombs), then
    Pillow's plain `convert("RGB")`: alpha dropped, not composited, as the reference training
    scripts (Custom Diffusion's) read their images. Raises ImageDecodeError."""
    image = open_image(source, max_pixels)
    with _decode_errors():
        with _pillow_limits(max_pixels):
            image.load()
        return image.convert("RGB")
