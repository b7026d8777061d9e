"""Extraction's reader side: source item -> preprocessed pixels, or the reason it failed.

Runs in DataLoader workers (the local engine) and in Ray tasks alike, so it holds only
picklable state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from genattr.data.files import ItemRefused
from genattr.data.images import ImageDecodeError, load_rgb

DEFAULT_MAX_FILE_MB = 256.0  # a file above this is a failure row, not read


class ItemDecoder:
    """Source item i -> (i, float32 array | None, failure reason | None).

    Picklable (a columnar source and frozen dataclasses), so it runs in DataLoader workers and
    in Ray tasks alike. Reads at most `max_bytes` of a file (None: no limit); whatever goes
    wrong with one item, running out of memory included, is that item's failure reason.
    """

    def __init__(
        self,
        source,
        preprocess,
        max_pixels: int | None,
        shape,
        augment=None,
        max_bytes: int | None = None,
    ):
        self.source, self.preprocess = source, preprocess
        self.max_pixels, self.shape, self.augment = max_pixels, tuple(shape), augment
        self.max_bytes = max_bytes
        self.views = source.columns.get("view")

    def __call__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        if i in self.source.prefailed:
            return i, None, self.source.prefailed[i]
        try:
            data = self.source.read_bytes(i, self.max_bytes)
        except ItemRefused as e:
            return i, None, str(e)
        except OSError as e:
            return i, None, f"cannot read: {e.strerror or e}"
        except ValueError as e:  # a path with a NUL byte (from a list file)
            return i, None, f"cannot read: {e}"
        except MemoryError:
            return i, None, "out of memory while reading the file"
        try:
            return self._decode(i, data)
        except MemoryError:
            return i, None, f"out of memory while decoding ({len(data)} bytes)"

    def _decode(self, i: int, data: bytes) -> tuple[int, np.ndarray | None, str | None]:
        try:
            image = load_rgb(data, self.max_pixels)
        except ImageDecodeError as e:
            return i, None, str(e)
        if self.augment is not None and self.views is not None and self.views[i] > 0:
            image = self.augment(image, i)
        try:
            arr = np.asarray(self.preprocess(image), dtype=np.float32)
        except MemoryError:
            raise
        except Exception as e:  # a backbone's preprocess rejecting one image must not stop the run
            return i, None, f"preprocess failed: {type(e).__name__}: {e}"
        if arr.shape != self.shape:
            return i, None, f"preprocess gave shape {arr.shape}, expected {self.shape}"
        if not np.isfinite(arr).all():
            return i, None, "preprocess gave NaN or Inf values"
        return i, arr, None


def reference_shape(preprocess: Callable[[Image.Image], Any]) -> tuple[int, ...]:
    """The shape `preprocess` gives every image: a decoded item of another shape is refused."""
    return tuple(np.asarray(preprocess(Image.new("RGB", (256, 256), (128, 128, 128)))).shape)
