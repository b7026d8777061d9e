"""Downsampled pixels: the no-learning baseline, and a backbone that needs no weights."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from genattr.features.registry import Backbone, register_backbone

PIXEL_SIZE = 32


def _preprocess(image: Image.Image) -> np.ndarray:
    small = image.convert("RGB").resize((PIXEL_SIZE, PIXEL_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0


@register_backbone("pixel")
def pixel_backbone(weights: str | None = None, **_) -> Backbone:
    return Backbone(
        name="pixel",
        dim=3 * PIXEL_SIZE * PIXEL_SIZE,
        model=torch.nn.Flatten(),
        preprocess=_preprocess,
        preprocess_config={"resize": [PIXEL_SIZE, PIXEL_SIZE], "interpolation": "bicubic"},
    )
