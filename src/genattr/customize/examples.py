"""Training examples as Custom Diffusion makes them: exemplar files listed as every command
lists a folder, read with extraction's guards and Pillow's plain RGB conversion, squared,
resized, and augmented (random rescaling with a size word in the prompt, flips)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from genattr.data.images import ImageDecodeError, load_converted, open_image
from genattr.data.sources import folder_images
from genattr.errors import GenattrError

_SMALL_PREFIXES = ("a far away ", "very small ")
_LARGE_PREFIXES = ("zoomed in ", "close up ")


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from paths and folders (a folder gives its images as every command lists
    a folder: `genattr.data.sources.folder_images`)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(map(Path, folder_images(p).files))
        elif p.is_file():
            out.append(p)
        else:
            raise GenattrError(f"{p}: no such file or folder")
    if not out:
        raise GenattrError("no exemplar images given")
    return out


def open_training_image(path: Path) -> Image.Image:
    """An image as training reads it, with extraction's guards (`load_converted`)."""
    try:
        return load_converted(path)
    except ImageDecodeError as e:
        raise GenattrError(f"{path}: not a readable image ({e})") from None


def check_image(path: Path) -> None:
    """Raise a GenattrError naming the file unless it is a readable image (header check)."""
    try:
        open_image(path)
    except ImageDecodeError as e:
        raise GenattrError(f"{path}: not a readable image ({e})") from None


def _square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _to_array(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def augment_example(
    im: Image.Image,
    size: int,
    latent_size: int,
    rng: np.random.Generator,
    *,
    hflip: bool,
    augment: bool,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Custom Diffusion's augmentation: the exemplar rescaled to a random size and either placed
    on a blank canvas (small) or cropped (large). Returns the image (HWC, [-1, 1]), the loss mask
    at latent resolution (only where the image is) and the prompt prefix that names the scale.

    Args:
        im: The exemplar image (center-cropped to a square here).
        size: The training resolution in pixels (the output image is size x size).
        latent_size: The latent resolution (the mask is latent_size x latent_size).
        rng: The random generator for the flip, the scale and the placement.
        hflip: Whether to flip the image horizontally with probability 0.5.
        augment: Whether to rescale to a random size; otherwise the image is kept at `size`.
    """
    im = _square(im)
    if hflip and rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = size
    if augment:
        if rng.random() < 0.66:
            scale = int(rng.integers(size // 3, size + 1))
        else:
            scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
    arr = _to_array(im.resize((scale, scale), Image.Resampling.BILINEAR))
    factor = size // latent_size
    if scale >= size:
        top, left = (int(rng.integers(0, scale - size + 1)) for _ in range(2))
        image = arr[top : top + size, left : left + size]
        mask = np.ones((latent_size, latent_size), np.float32)
    else:
        top, left = (int(rng.integers(0, size - scale + 1)) for _ in range(2))
        image = np.zeros((size, size, 3), np.float32)
        image[top : top + scale, left : left + scale] = arr
        mask = np.zeros((latent_size, latent_size), np.float32)
        # One latent pixel in from the border: the edge of the pasted image is blurred by the VAE.
        mask[
            top // factor + 1 : (top + scale) // factor - 1,
            left // factor + 1 : (left + scale) // factor - 1,
        ] = 1.0
        if not mask.any():
            mask[
                top // factor : (top + scale) // factor + 1,
                left // factor : (left + scale) // factor + 1,
            ] = 1.0
    prefix = ""
    if scale < 0.6 * size:
        prefix = _SMALL_PREFIXES[int(rng.integers(0, 2))]
    elif scale > size:
        prefix = _LARGE_PREFIXES[int(rng.integers(0, 2))]
    return image, mask, prefix


def plain_example(im: Image.Image, size: int) -> np.ndarray:
    return _to_array(_square(im).resize((size, size), Image.Resampling.BILINEAR))


def read_square(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file as training sees it without augmentation, (S, S, 3) uint8: RGB, the
    centre square, resized (bilinear); attribution methods that run the model read it so."""
    return np.asarray(
        _square(open_training_image(Path(path))).resize((size, size), Image.Resampling.BILINEAR)
    )
