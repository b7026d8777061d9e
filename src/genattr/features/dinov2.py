"""DINOv2 ViT-B/14 CLS features via transformers Dinov2Model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from genattr.features._hf import ClsToken, hf_backbone, load_pretrained
from genattr.features.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from genattr.features.registry import Backbone, register_backbone

# facebook/dinov2-base's processor (shortest_edge 256, resample 3 = bicubic, crop 224,
# ImageNet mean/std), the same as DINOv2's own eval transform. Crop offsets follow torchvision
# (round half to even), as DINOv2's release computes them.
PREPROCESS = ImagePreprocess(
    resize=256, interpolation="bicubic", crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD
)


@register_backbone("dinov2-vitb14", dim=768, preprocess=PREPROCESS)
def dinov2_vitb14(
    weights: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """DINOv2 ViT-B/14 final-layernormed CLS token (`x_norm_clstoken` in DINOv2's code)."""

    def build(directory: Path) -> tuple[torch.nn.Module, int]:
        encoder = load_pretrained(
            "Dinov2Model", directory, backbone="dinov2-vitb14", model_types=("dinov2",)
        )
        return ClsToken(encoder), encoder.config.hidden_size

    return hf_backbone(
        name="dinov2-vitb14",
        weights=weights,
        default_repo="facebook/dinov2-base",
        allow_download=allow_download,
        cache_dir=cache_dir,
        build=build,
        preprocess=PREPROCESS,
    )
