"""`world-cnn`: a small convolutional encoder learned on the miniature world's own images.

DINO and CLIP were learned self-supervised on their own domain and never on generated
images; this is the world's counterpart: trained contrastively (SimCLR) on the world's 1,160
pre-training images only (`genattr world train-encoder`), never on exemplars or samples.
Its feature is the last feature map average-pooled to a `grid` x `grid` layout and flattened:
the world's customized samples keep their exemplar's colours and layout, which a global pool
would throw away (measured: BENCHMARKS.md, "world-cnn").

The weights ship in the package (`features/data/world-cnn32.safetensors`, fp16, with the
architecture in its metadata); `weights=` takes another file made by `train-encoder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from genattr.atomic import atomic_path
from genattr.errors import GenattrError
from genattr.features.preprocess import HALF, ImagePreprocess
from genattr.features.registry import Backbone, register_backbone
from genattr.features.weights import weights_id

SIZE = 32
DEFAULT_WEIGHTS = Path(__file__).parent / "data" / "world-cnn32.safetensors"
PREPROCESS = ImagePreprocess(resize=(SIZE, SIZE), interpolation="bicubic", mean=HALF, std=HALF)
DEFAULT_ARCH: dict[str, Any] = {"widths": [32, 64, 128], "grid": 4}


class WorldCNN(nn.Module):
    """Two 3x3 conv-BN-ReLU layers per stage, a stride-2 conv between stages; the last map is
    average-pooled to `grid` x `grid` and flattened (dim = widths[-1] * grid**2)."""

    def __init__(self, widths: list[int] | tuple[int, ...] = (32, 64, 128), grid: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for k, w in enumerate(widths):
            stride = 1 if k == 0 else 2
            layers += [nn.Conv2d(cin, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            layers += [nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.arch = {"widths": list(widths), "grid": grid}
        self.dim = widths[-1] * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)


def save_world_cnn(model: WorldCNN, path: str | Path, extra: dict | None = None) -> None:
    """fp16 safetensors with the architecture (and `extra`, e.g. training facts) as metadata."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    meta = {"arch": json.dumps(model.arch), "extra": json.dumps(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_world_cnn(path: str | Path) -> WorldCNN:
    """A WorldCNN from a file written by `save_world_cnn`, in float32."""
    path = Path(path)
    if not path.is_file():
        raise GenattrError(f"{path}: no world-cnn weights; run `genattr world train-encoder`")
    try:
        with safe_open(str(path), framework="pt") as f:
            arch = json.loads((f.metadata() or {}).get("arch", "null")) or DEFAULT_ARCH
            state = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError) as e:
        raise GenattrError(f"{path}: not a world-cnn weights file ({e})") from None
    model = WorldCNN(arch["widths"], arch["grid"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise GenattrError(f"{path}: weights do not fit the architecture {arch}")
    return model


# The shipped weights' feature size (96 channels pooled 4x4); tested against the file.
SHIPPED_DIM = 96 * 4 * 4


@register_backbone("world-cnn", dim=SHIPPED_DIM, preprocess=PREPROCESS)
def world_cnn_backbone(weights: str | None = None, **_: object) -> Backbone:
    """The shipped world encoder, or `weights` (a file from `genattr world train-encoder`)."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    model = load_world_cnn(path)
    return Backbone(
        name="world-cnn",
        dim=model.dim,
        model=model,
        preprocess=PREPROCESS,
        preprocess_config=PREPROCESS.to_config(),
        weights_id=weights_id([path]),
        weights_path=str(path),
    )
