"""MoCo v3 ViT-B/16: the base encoder of the authors' `moco-vit-b-300ep.pth.tar`, head removed.

The checkpoint stores a timm-style VisionTransformer under `module.base_encoder.*` (beside the
momentum encoder, the predictor and optimizer state). A small module here uses timm's parameter
names, so the converted state dict loads strictly, with no timm (and so no torchvision) needed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genattr.errors import GenattrError
from genattr.features.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from genattr.features.registry import Backbone, register_backbone
from genattr.features.weights import resolve_file, weights_id

FILENAME = "moco-vit-b-300ep.pth.tar"
URL = "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"
PREFIX = "module.base_encoder."
# The authors' transform: Resize(256) (torchvision's default, bilinear), CenterCrop(224).
PREPROCESS = ImagePreprocess(
    resize=256, interpolation="bilinear", crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD
)


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2D sin-cos table, (1, 1 + grid*grid, dim), a zero row for CLS first.

    Token n gets w = n // grid and h = n % grid: MoCo builds the grid with an "ij" meshgrid of
    (w, h), so its width coordinate varies slowest. Kept as is, since the model was trained so.
    """
    if dim % 4:
        raise ValueError("sin-cos position embedding needs dim divisible by 4")
    coords = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None, :]
    out_h = grid_h.flatten()[:, None] * omega[None, :]
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MocoViT(nn.Module):
    """Pre-norm ViT (LayerNorm eps 1e-6, exact GELU), CLS token after the final norm."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_hidden: int = 3072,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_position_embedding(image_size // patch, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_hidden, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"MoCo ViT takes {self.image_size}px inputs, got {tuple(x.shape)}")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def base_encoder_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """`module.base_encoder.*` of a MoCo v3 checkpoint, prefix stripped and projection head
    (`head.*`) dropped, as the authors load it."""
    state = checkpoint.get("state_dict", checkpoint)
    out = {
        k[len(PREFIX) :]: v
        for k, v in state.items()
        if k.startswith(PREFIX) and not k[len(PREFIX) :].startswith("head.")
    }
    if not out:
        raise GenattrError(f"no {PREFIX}* weights in this checkpoint: not a MoCo v3 checkpoint")
    return out


def moco_vit_from_state_dict(state: dict[str, torch.Tensor], heads: int = 12) -> MocoViT:
    """Build a MocoViT shaped like `state` and load it strictly. The head count cannot be read
    from shapes; MoCo v3's ViT-S and ViT-B both use 12."""
    try:
        proj = state["patch_embed.proj.weight"]
        dim, patch = proj.shape[0], proj.shape[-1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        qkv_bias = "blocks.0.attn.qkv.bias" in state
        # MoCo v3 trained at 224 px; the table length gives the size when it is stored.
        tokens = state["pos_embed"].shape[1] - 1 if "pos_embed" in state else (224 // patch) ** 2
    except (KeyError, ValueError) as e:
        raise GenattrError(f"MoCo checkpoint lacks the ViT weights it needs: {e}") from e
    grid = round(tokens**0.5)
    model = MocoViT(
        image_size=grid * patch,
        patch=patch,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_hidden=mlp_hidden,
        qkv_bias=qkv_bias,
    )
    # pos_embed is a fixed buffer-like parameter; an old checkpoint without it gets the table.
    state = {"pos_embed": model.pos_embed.detach(), **state}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GenattrError(
            f"MoCo checkpoint does not fit a ViT: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    return model


@register_backbone("moco-v3-vitb", dim=768, preprocess=PREPROCESS)
def moco_v3_vitb(
    weights: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    heads: int = 12,
) -> Backbone:
    """`weights`: path to MoCo v3's `vit-b-300ep.pth.tar` (the authors call it
    `moco-vit-b-300ep.pth.tar`); by default looked up in the genattr weights directory."""
    path = resolve_file(
        weights,
        backbone="moco-v3-vitb",
        filename=FILENAME,
        url=URL,
        allow_download=allow_download,
    )
    checkpoint = _load_checkpoint(Path(path))
    model = moco_vit_from_state_dict(base_encoder_state_dict(checkpoint), heads=heads)
    return Backbone(
        name="moco-v3-vitb",
        dim=model.norm.normalized_shape[0],
        model=model,
        preprocess=PREPROCESS,
        preprocess_config=PREPROCESS.to_config(),
        weights_id=weights_id([path]),
        weights_path=str(path),
    )


def _load_checkpoint(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GenattrError(f"cannot read MoCo checkpoint {path}: {e}") from e
    if not isinstance(checkpoint, dict):
        raise GenattrError(f"{path} is not a MoCo checkpoint (no state dict inside)")
    return checkpoint
