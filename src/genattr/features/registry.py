"""Backbone registry: a name maps to a constructor that returns a ready `Backbone`.

One module per family registers its entries with `@register_backbone`; `get_backbone(name)`
builds one. Every backbone carries its exact preprocessing (PIL + numpy), its output dim and an
id of its weights, so an embedding store can record how its vectors were made.
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
    weights_id: str = "none"  # content hash of the weights, or "none"

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch).float()


_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str):
    def decorator(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str, weights: str | None = None, **kwargs) -> Backbone:
    """Build backbone `name`; `weights` is an explicit path or id where the family takes one."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; choose from {list_backbones()}")
    return _REGISTRY[name](weights=weights, **kwargs)
