"""Extraction's model side: preprocessed pixels -> vectors, on any device and precision.

`embed_arrays` is the one forward pass every engine (local, Ray actors) runs; the helpers
set the model's memory layout and torch's threads for the length of a run."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from genattr.errors import GenattrError
from genattr.features.decode import ItemDecoder


def autocast(device: str, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def has_conv(model) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@contextlib.contextmanager
def memory_format(model, channels_last: bool) -> Iterator[None]:
    """channels_last while extracting (faster convolutions on CPU); the caller's model is
    given back in its own layout."""
    if not channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def stack_batch(pixels: Sequence[np.ndarray], channels_last: bool) -> torch.Tensor:
    """Preprocessed (C, H, W) arrays -> one (B, C, H, W) tensor, in the layout the model runs.

    With `channels_last` the images are stacked as (B, H, W, C) and viewed as (B, C, H, W):
    one copy, none if `ImagePreprocess` made them (its outputs are views of (H, W, C) memory);
    the other layout is one plain stack."""
    arrays = [np.asarray(a, dtype=np.float32) for a in pixels]
    hwc = channels_last and all(a.ndim == 3 for a in arrays)
    if hwc:
        arrays = [a.transpose(1, 2, 0) for a in arrays]
    batch = np.empty((len(arrays), *arrays[0].shape), np.float32)  # C order, whatever the inputs'
    np.stack(arrays, out=batch)
    x = torch.from_numpy(batch)
    return x.permute(0, 3, 1, 2) if hwc else x


def embed_arrays(
    backbone, pixels: Sequence[np.ndarray], device: str, dtype: str, channels_last: bool
) -> np.ndarray:
    """One forward pass: preprocessed images (a list, or a (B, ...) float32 array) ->
    (B, dim) float32, shape checked."""
    x = stack_batch(pixels, channels_last).to(device, non_blocking=True)
    with torch.inference_mode(), autocast(device.split(":")[0], dtype):
        y = backbone.embed(x)
    y = y.float().cpu().numpy()
    if y.shape != (len(pixels), backbone.dim):
        raise GenattrError(
            f"backbone {backbone.name} returned {y.shape}, expected ({len(pixels)}, {backbone.dim})"
        )
    return y


@dataclass
class EmbedJob:
    """What an engine needs to embed items start..total-1 and hand them to a ShardWriter."""

    backbone: Any  # Backbone
    decoder: ItemDecoder
    start: int
    batch_size: int
    device: str
    dtype: str
    channels_last: bool
    workers: int | None  # decode processes (local) or decode tasks in flight (ray); None: auto
    threads: int | None  # torch threads per model (process or actor)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights live (the CPU for a model without any, such as pixels)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def embed_images(
    backbone: Any,
    images: Sequence[Image.Image],
    *,
    batch_size: int = 32,
    dtype: str = "fp32",
    channels_last: bool = False,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Decoded RGB images -> (N, dim) float32 features on the CPU, whatever the model's device.

    The path from images already in memory (queries, uploads, the world's arrays) to vectors:
    the backbone's own preprocessing, then `embed_arrays` on the device the model is on, as
    extraction runs it. `advance(n)` is called after each batch (a progress bar)."""
    device = str(model_device(backbone.model))
    out = np.empty((len(images), backbone.dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = [backbone.preprocess(im) for im in chunk]
        out[start : start + len(chunk)] = embed_arrays(
            backbone, pixels, device, dtype, channels_last
        )
        if advance is not None:
            advance(len(chunk))
    return out
