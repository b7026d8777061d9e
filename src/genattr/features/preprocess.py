"""The one preprocessing implementation every backbone uses, configured per backbone.

It reproduces torchvision's `Resize -> CenterCrop -> ToTensor -> Normalize` on PIL images with
PIL and numpy only, because the authors' features were computed with those transforms and
torchvision cannot be installed beside the project's torch. Matching details:

* `Resize(n)` with an int scales the shorter side to `n` and the longer to
  `int(n * long / short)` (truncation, not rounding); PIL does the resampling, as torchvision
  does for PIL inputs (so antialiasing is PIL's).
* `CenterCrop(n)` starts at `int(round((H - n) / 2))`: Python's round, half to even.
* `ToTensor` divides by 255 in float32; `Normalize` subtracts the mean then divides by the std,
  both float32.
* Any input mode is first converted with `Image.convert("RGB")` (what the reference loaders do:
  grayscale is replicated, alpha is dropped, not composited).

Instances are frozen dataclasses, so they pickle into DataLoader workers and compare by value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resized_size(width: int, height: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) after torchvision `Resize(resize)`: an int sets the shorter side."""
    if not isinstance(resize, int):
        h, w = resize
        return int(w), int(h)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize, optional center crop, scale to [0, 1], normalize: RGB PIL -> float32 (3, H, W).

    `resize` is an int (shorter side, aspect kept) or an (height, width) pair (exact size).
    """

    resize: int | tuple[int, int]
    interpolation: str = "bicubic"
    crop: int | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if not isinstance(self.resize, int):
            object.__setattr__(self, "resize", (int(self.resize[0]), int(self.resize[1])))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the input's aspect ratio."""
        if self.crop is not None:
            return (self.crop, self.crop)
        if isinstance(self.resize, int):
            return None
        return self.resize

    def geometry(self, image: Image.Image) -> np.ndarray:
        """The resized and cropped image as uint8 (H, W, 3), before scaling and normalizing."""
        image = image.convert("RGB")
        size = resized_size(image.width, image.height, self.resize)
        if size != image.size:
            image = image.resize(size, _RESAMPLE[self.interpolation])
        array = np.asarray(image)
        if self.crop is not None:
            array = _center_crop(array, self.crop)
        return array

    def normalize(self, array: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (3, H, W), as ToTensor then Normalize compute it: the
        same float32 operations in the same order, done in place on the contiguous (H, W, 3)
        array seen as (H, W * 3) rows, the mean and std tiled along a row (a length-3 innermost
        loop made numpy 7x slower: 1.0 -> 0.14 ms at 224 px). The result is a (3, H, W) view of
        that channels-last memory: a batch for a convolutional model (channels_last) then
        stacks without any transposition (`genattr.features.embedder.stack_batch`)."""
        h, w, c = array.shape
        x = array.astype(np.float32)
        rows = x.reshape(h, w * c)
        rows /= np.float32(255)
        rows -= np.tile(np.asarray(self.mean, dtype=np.float32), w)
        rows /= np.tile(np.asarray(self.std, dtype=np.float32), w)
        return x.transpose(2, 0, 1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalize(self.geometry(image))

    def to_config(self) -> dict[str, Any]:
        """A JSON-able description; `from_config` rebuilds an equal instance."""
        return {
            "resize": self.resize if isinstance(self.resize, int) else list(self.resize),
            "resize_mode": "shorter_side" if isinstance(self.resize, int) else "exact",
            "interpolation": self.interpolation,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImagePreprocess:
        resize = config["resize"]
        return cls(
            resize=resize if isinstance(resize, int) else (resize[0], resize[1]),
            interpolation=config["interpolation"],
            crop=config.get("crop"),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
        )


def _center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """torchvision CenterCrop: zero-pad when too small, then crop at round-half-even offsets."""
    h, w = array.shape[:2]
    if h < size or w < size:
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        array = np.pad(
            array,
            ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)),
        )
        h, w = array.shape[:2]
        if h == size and w == size:
            return array
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return array[top : top + size, left : left + size]
