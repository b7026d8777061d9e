"""SSCD (self-supervised copy detection) ResNet-50, disc_mixup variant, as released: TorchScript."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from genattr.errors import GenattrError
from genattr.features.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from genattr.features.registry import Backbone, register_backbone
from genattr.features.weights import resolve_file, weights_id

FILENAME = "sscd_disc_mixup.torchscript.pt"
URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
DIM = 512
# The authors' transform: Resize(288) (torchvision's default, bilinear), CenterCrop(288).
PREPROCESS = ImagePreprocess(
    resize=288, interpolation="bilinear", crop=288, mean=IMAGENET_MEAN, std=IMAGENET_STD
)


@register_backbone("sscd-disc-mixup", dim=DIM, preprocess=PREPROCESS)
def sscd_disc_mixup(
    weights: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """`weights`: path to `sscd_disc_mixup.torchscript.pt`; by default looked up in the genattr
    weights directory. The scripted module carries SSCD's own pooling and output layers."""
    path = Path(
        resolve_file(
            weights,
            backbone="sscd-disc-mixup",
            filename=FILENAME,
            url=URL,
            allow_download=allow_download,
        )
    )
    try:
        with warnings.catch_warnings():
            # Deprecated in recent torch, but TorchScript is the format SSCD is released in.
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise GenattrError(f"cannot load TorchScript model {path}: {e}") from e
    return Backbone(
        name="sscd-disc-mixup",
        dim=DIM,
        model=model,
        preprocess=PREPROCESS,
        preprocess_config=PREPROCESS.to_config(),
        weights_id=weights_id([path]),
        weights_path=str(path),
    )
