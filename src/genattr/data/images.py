"""Decoding images from the wild into RGB, or a reason why not.

Real collections hold CMYK JPEGs, palette and alpha PNGs, 16-bit scans, truncated downloads,
empty files and files that are not images at all. `load_rgb` converts whatever can be converted
(alpha composited on white, 16-bit scaled to 8 bits, not clipped) and raises `ImageDecodeError`
with a short reason for the rest, so an extraction can record and skip them. EXIF orientation is
not applied, as in the authors' extract_feat.py (`Image.open(path).convert('RGB')`).
"""

from __future__ import annotations

import io
import os
import threading
import warnings

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


class ImageDecodeError(Exception):
    """An image that cannot be turned into RGB; the message is the reason recorded."""


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8 bits by scaling the full range, not clipping."""
    arr = np.asarray(image)
    if image.mode == "F":
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        arr = arr * 255.0 if hi <= 1.0 else arr
    elif image.mode.startswith("I;16") or (image.mode == "I" and arr.size and arr.max() > 255):
        arr = arr.astype(np.float64) * (255.0 / 65535.0)  # 16-bit range (PNG/TIFF 16-bit gray)
    arr = np.clip(np.rint(np.nan_to_num(arr.astype(np.float64))), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha over white, palette transparency honoured, 16-bit scaled."""
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
        return _scale_to_uint8(image).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(
    source: str | os.PathLike | bytes,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    min_side: int = 1,
    max_side: int | None = None,
) -> Image.Image:
    """Open a path or encoded bytes and return a fully decoded RGB PIL image.

    Raises ImageDecodeError("empty file" | "not an image: ..." | "decompression bomb: ..." |
    "too small: ..." | "too large: ..." | "truncated or corrupt: ..." | ...) for anything that
    cannot be decoded. Size limits are checked on the header, before any pixel is decoded.
    """
    try:
        if isinstance(source, bytes):
            data = source
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"cannot read: {e.strerror or e}") from None
    if not data:
        raise ImageDecodeError("empty file")
    with _PILLOW_GLOBALS, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if min(w, h) < min_side:
                raise ImageDecodeError(f"too small: {w}x{h} pixels (at least {min_side} a side)")
            if max_side is not None and max(w, h) > max_side:
                raise ImageDecodeError(f"too large: {w}x{h} pixels (at most {max_side} a side)")
            if max_pixels is not None and w * h > max_pixels:
                raise ImageDecodeError(
                    f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}"
                )
            image.seek(0)  # first frame of animations and multi-page files
            image.load()
            return to_rgb(image)
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
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
