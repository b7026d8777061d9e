"""Backbone registry: a name maps to a constructor that returns a ready `Backbone`.

One module per family registers its entries with `@register_backbone`; `get_backbone(name)`
builds one. Every backbone carries its exact preprocessing (PIL + numpy), its output dim and an
id of its weights, so an embedding store can record how its vectors were made and refuse to
mix vectors from different weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class Backbone:
    """A frozen feature extractor: `preprocess` an RGB image, `model` maps a batch to (B, dim)."""

    name: str
    dim: int
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], np.ndarray]  # RGB PIL image -> float32 (3, H, W)
    preprocess_config: dict[str, Any] = field(default_factory=dict)  # JSON-able description
    weights_id: str = "none"  # "sha256:<16 hex>" of the weights files, or "none"
    weights_path: str | None = None  # the file or directory the weights were read from

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> float32 (B, dim); the batch follows the model's device and dtype.

        Casting the input lets a model converted with `.to(torch.bfloat16)` (or fp16) take the
        float32 arrays `preprocess` makes; autocast, if the caller enables it, still applies.
        """
        param = next(self.model.parameters(), None)
        if param is not None and batch.is_floating_point():
            batch = batch.to(device=param.device, dtype=param.dtype)
        return self.model(batch).float()


@dataclass(frozen=True)
class BackboneSpec:
    """What is known about a registered backbone without loading it."""

    name: str
    constructor: Callable[..., Backbone]
    dim: int | None = None  # of the default weights; tiny test configs may differ
    preprocess: Callable[[Image.Image], np.ndarray] | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    *,
    dim: int | None = None,
    preprocess: Callable[[Image.Image], np.ndarray] | None = None,
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Register a constructor `fn(weights=None, **kwargs) -> Backbone` under `name`."""

    def decorator(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[name] = BackboneSpec(name, fn, dim, preprocess)
        return fn

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    """The registration of `name` (dim, preprocessing) without loading any weights."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; choose from {list_backbones()}")
    return _REGISTRY[name]


def get_backbone(
    name: str,
    weights: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    **kwargs: Any,
) -> Backbone:
    """Build backbone `name`, in eval mode with gradients off.

    `weights` is an explicit path (file or directory) or a Hugging Face repo id, where the family
    takes one; None means the family's default. Family constructors also take
    `allow_download=False` and `cache_dir=None` (a Hugging Face hub cache directory).
    `device`, `dtype` (e.g. torch.bfloat16) and `channels_last` convert the model after loading.
    """
    backbone = backbone_spec(name).constructor(weights=weights, **kwargs)
    model = backbone.model.eval()
    for param in model.parameters():  # (ScriptModules have no requires_grad_)
        param.requires_grad_(False)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if channels_last:
        # Module.to takes memory_format at runtime; torch's overload stubs leave it out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    backbone.model = model
    return backbone
