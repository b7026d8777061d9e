"""Augmented views for feature-level augmentation when training heads.

Heads train on frozen features, so augmentation happens once, at extraction: each image is
embedded K times, view 0 as it is and views 1..K-1 augmented. `mild` is a random resized
crop (80-100 % of the area) and a horizontal flip; `strong` adds colour jitter, grayscale
and blur. The randomness is seeded by (seed, item), so a resumed extraction redraws exactly
the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

AUGMENTATIONS = ("mild", "strong")


@dataclass(frozen=True)
class Augmenter:
    mode: str
    seed: int = 0

    def __post_init__(self):
        if self.mode not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {self.mode!r}")

    def __call__(self, image: Image.Image, item: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, item])
        image = _random_resized_crop(image, rng, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        if self.mode == "strong":
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(rng.uniform(0.6, 1.4))
            if rng.random() < 0.2:
                image = ImageOps.grayscale(image).convert("RGB")
            if rng.random() < 0.5:
                image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        return image


def _random_resized_crop(image: Image.Image, rng, scale, ratio) -> Image.Image:
    """A crop of random area and aspect ratio, resized back to the image's size."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.resize((w, h), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
    return image
