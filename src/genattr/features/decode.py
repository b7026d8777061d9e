"""Extraction's reader side: source item -> preprocessed pixels, or the reason it failed.

Runs in DataLoader workers (the local engine) and in Ray tasks alike, so it holds only
picklable state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from genattr.data.images import ImageDecodeError, load_rgb


class ItemDecoder:
    """Source item i -> (i, float32 array | None, failure reason | None).

    Picklable (a columnar source and frozen dataclasses), so it runs in DataLoader workers and
    in Ray tasks alike.
    """

    def __init__(self, source, preprocess, max_pixels: int | None, shape, augment=None):
        self.source, self.preprocess = source, preprocess
        self.max_pixels, self.shape, self.augment = max_pixels, tuple(shape), augment
        self.views = source.columns.get("view")

    def __call__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        if i in self.source.prefailed:
            return i, None, self.source.prefailed[i]
        try:
            image = load_rgb(self.source.read_bytes(i), self.max_pixels)
        except ImageDecodeError as e:
            return i, None, str(e)
        except OSError as e:
            return i, None, f"cannot read: {e.strerror or e}"
        if self.augment is not None and self.views is not None and self.views[i] > 0:
            image = self.augment(image, i)
        try:
            arr = np.asarray(self.preprocess(image), dtype=np.float32)
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
