"""Downsampled pixels: the no-learning baseline, and a backbone that needs no weights."""

from __future__ import annotations

import torch

from genattr.errors import GenattrError
from genattr.features.preprocess import ImagePreprocess
from genattr.features.registry import Backbone, register_backbone

PIXEL_SIZE = 32
PREPROCESS = ImagePreprocess(resize=(PIXEL_SIZE, PIXEL_SIZE), interpolation="bicubic")


@register_backbone("pixel", dim=3 * PIXEL_SIZE * PIXEL_SIZE, preprocess=PREPROCESS)
def pixel_backbone(weights: str | None = None, **_: object) -> Backbone:
    """Flattened 32x32 RGB in [0, 1]; download and cache options do not apply."""
    if weights is not None:
        raise GenattrError("backbone 'pixel' has no weights; do not pass weights")
    return Backbone(
        name="pixel",
        dim=3 * PIXEL_SIZE * PIXEL_SIZE,
        model=torch.nn.Flatten(),
        preprocess=PREPROCESS,
        preprocess_config=PREPROCESS.to_config(),
    )
