"""CLIP ViT-B/32 image tower with its projection: OpenAI's `encode_image`, via transformers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from genattr.features._hf import clip_tower_config, hf_backbone, load_pretrained
from genattr.features.preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess
from genattr.features.registry import Backbone, register_backbone

# clip.load("ViT-B/32")'s transform: Resize(224, BICUBIC), CenterCrop(224), CLIP mean/std.
PREPROCESS = ImagePreprocess(
    resize=224, interpolation="bicubic", crop=224, mean=CLIP_MEAN, std=CLIP_STD
)


class ClipImageEncoder(torch.nn.Module):
    """post_layernorm(CLS) @ visual_projection, the embedding CLIP compares with text."""

    def __init__(self, vision: torch.nn.Module) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixel_values).image_embeds


@register_backbone("clip-vit-b32", dim=512, preprocess=PREPROCESS)
def clip_vit_b32(
    weights: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """`weights`: a directory of a (full or vision-only) CLIP checkpoint, or a hub repo id."""

    def build(directory: Path) -> tuple[torch.nn.Module, int]:
        vision = load_pretrained(
            "CLIPVisionModelWithProjection",
            directory,
            backbone="clip-vit-b32",
            model_types=("clip", "clip_vision_model"),
            **clip_tower_config(directory, "vision"),
        )
        return ClipImageEncoder(vision), vision.config.projection_dim

    return hf_backbone(
        name="clip-vit-b32",
        weights=weights,
        default_repo="openai/clip-vit-base-patch32",
        allow_download=allow_download,
        cache_dir=cache_dir,
        build=build,
        preprocess=PREPROCESS,
    )
