"""ViT-B/16 CLS features via transformers ViTModel: self-supervised DINO and supervised ViT-384.

Both return the final-layernormed CLS token and no pooler (transformers' ViT pooler is an
extra dense+tanh that neither DINO's nor timm's ViT features include).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from genattr.features._hf import ClsToken, hf_backbone, load_pretrained
from genattr.features.preprocess import HALF, IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from genattr.features.registry import Backbone, register_backbone

# DINO's eval transform: Resize(256, interpolation=3 i.e. bicubic), CenterCrop(224), ImageNet.
DINO_PREPROCESS = ImagePreprocess(
    resize=256, interpolation="bicubic", crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD
)
# The authors' ViT-B/16-384: Resize(384) (torchvision's default, bilinear), CenterCrop(384),
# Normalize(0.5, 0.5).
VIT384_PREPROCESS = ImagePreprocess(
    resize=384, interpolation="bilinear", crop=384, mean=HALF, std=HALF
)


def _vit_cls(name: str, directory: Path) -> tuple[torch.nn.Module, int]:
    encoder = load_pretrained(
        "ViTModel", directory, backbone=name, model_types=("vit",), add_pooling_layer=False
    )
    return ClsToken(encoder), encoder.config.hidden_size


@register_backbone("dino-vitb16", dim=768, preprocess=DINO_PREPROCESS)
def dino_vitb16(
    weights: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """DINO ViT-B/16 (self-supervised); `weights`: a local ViT directory or a hub repo id."""
    return hf_backbone(
        name="dino-vitb16",
        weights=weights,
        default_repo="facebook/dino-vitb16",
        allow_download=allow_download,
        cache_dir=cache_dir,
        build=lambda d: _vit_cls("dino-vitb16", d),
        preprocess=DINO_PREPROCESS,
    )


@register_backbone("vit-b16-384", dim=768, preprocess=VIT384_PREPROCESS)
def vit_b16_384(
    weights: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Supervised ImageNet ViT-B/16 at 384 px, classifier removed (its input is the feature)."""
    return hf_backbone(
        name="vit-b16-384",
        weights=weights,
        default_repo="google/vit-base-patch16-384",
        allow_download=allow_download,
        cache_dir=cache_dir,
        build=lambda d: _vit_cls("vit-b16-384", d),
        preprocess=VIT384_PREPROCESS,
    )
