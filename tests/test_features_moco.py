"""MoCo v3: a checkpoint in the authors' layout (`module.base_encoder.*` beside the momentum
encoder and optimizer state) converts and loads, and computes what a timm-style ViT computes.

The reference forward below is written out longhand from the checkpoint tensors (explicit
softmax attention), independent of genattr's module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genattr.errors import GenattrError
from genattr.features import backbone_spec, get_backbone
from genattr.features.moco import sincos_position_embedding

DIM, DEPTH, HEADS, PATCH, IMAGE = 48, 2, 4, 32, 224


def _timm_vit_state(seed: int, with_pos_embed: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    grid = IMAGE // PATCH
    state = {
        "cls_token": rnd(1, 1, DIM),
        "patch_embed.proj.weight": rnd(DIM, 3, PATCH, PATCH, scale=0.02),
        "patch_embed.proj.bias": rnd(DIM),
        "norm.weight": 1 + rnd(DIM),
        "norm.bias": rnd(DIM),
    }
    if with_pos_embed:
        state["pos_embed"] = sincos_position_embedding(grid, DIM)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": 1 + rnd(DIM),
            p + "norm1.bias": rnd(DIM),
            p + "attn.qkv.weight": rnd(3 * DIM, DIM),
            p + "attn.qkv.bias": rnd(3 * DIM),
            p + "attn.proj.weight": rnd(DIM, DIM),
            p + "attn.proj.bias": rnd(DIM),
            p + "norm2.weight": 1 + rnd(DIM),
            p + "norm2.bias": rnd(DIM),
            p + "mlp.fc1.weight": rnd(4 * DIM, DIM),
            p + "mlp.fc1.bias": rnd(4 * DIM),
            p + "mlp.fc2.weight": rnd(DIM, 4 * DIM),
            p + "mlp.fc2.bias": rnd(DIM),
        }
    return state


def _write_checkpoint(path: Path, base: dict[str, torch.Tensor]) -> None:
    """The MoCo v3 training checkpoint layout: base and momentum encoders (each with a
    projection head), the predictor, optimizer state."""
    momentum = _timm_vit_state(99)
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state |= {f"module.momentum_encoder.{k}": v for k, v in momentum.items()}
    state |= {
        "module.base_encoder.head.0.weight": torch.randn(64, DIM),
        "module.momentum_encoder.head.0.weight": torch.randn(64, DIM),
        "module.predictor.0.weight": torch.randn(64, 64),
    }
    torch.save(
        {"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}}},
        path,
    )


def _reference_forward(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(b, -1, -1), t], 1) + s["pos_embed"]
    hd = DIM // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (DIM,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
        qkv = h @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, -1, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, -1, DIM)
        t = t + o @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        h = F.layer_norm(t, (DIM,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        t = t + h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    t = F.layer_norm(t, (DIM,), s["norm.weight"], s["norm.bias"], eps=1e-6)
    return t[:, 0]


def _images(backbone, n: int = 2) -> torch.Tensor:
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.from_numpy(np.stack([backbone.preprocess(im) for im in ims]))


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    base = _timm_vit_state(0)
    path = tmp_path / "moco-vit-b-300ep.pth.tar"
    _write_checkpoint(path, base)
    return path, base


def test_moco_matches_reference_vit(checkpoint) -> None:
    path, base = checkpoint
    backbone = get_backbone("moco-v3-vitb", weights=path, heads=HEADS)
    assert backbone.dim == DIM
    assert backbone.preprocess == backbone_spec("moco-v3-vitb").preprocess
    assert backbone.weights_id.startswith("sha256:")
    x = _images(backbone)
    assert x.shape == (2, 3, IMAGE, IMAGE)
    got = backbone.embed(x)
    torch.testing.assert_close(got, _reference_forward(base, x), rtol=1e-4, atol=1e-4)


def test_moco_found_in_genattr_weights_dir(checkpoint, monkeypatch) -> None:
    path, _ = checkpoint
    monkeypatch.setenv("GENATTR_WEIGHTS", str(path.parent))
    backbone = get_backbone("moco-v3-vitb", heads=HEADS)
    assert Path(backbone.weights_path) == path


def test_checkpoint_without_pos_embed_gets_mocos_table(tmp_path: Path) -> None:
    base = _timm_vit_state(1, with_pos_embed=False)
    path = tmp_path / "old.pth.tar"
    _write_checkpoint(path, base)
    backbone = get_backbone("moco-v3-vitb", weights=path, heads=HEADS)
    x = _images(backbone, 1)
    expected = _reference_forward(base | {"pos_embed": sincos_position_embedding(7, DIM)}, x)
    torch.testing.assert_close(backbone.embed(x), expected, rtol=1e-4, atol=1e-4)


def test_sincos_table_by_hand() -> None:
    table = sincos_position_embedding(grid=2, dim=8)  # omega = [1, 1e-2]
    assert table.shape == (1, 5, 8)
    assert torch.all(table[0, 0] == 0)  # the CLS slot
    # token n has w = n // 2, h = n % 2; layout [sin w, cos w, sin h, cos h] x 2 frequencies
    w, h = 1.0, 0.0  # token 3 (index 3 after CLS) is n = 2
    om = torch.tensor([1.0, 0.01])
    expected = torch.cat([(w * om).sin(), (w * om).cos(), (h * om).sin(), (h * om).cos()])
    torch.testing.assert_close(table[0, 3], expected)
    w, h = 0.0, 1.0  # n = 1
    expected = torch.cat([(w * om).sin(), (w * om).cos(), (h * om).sin(), (h * om).cos()])
    torch.testing.assert_close(table[0, 2], expected)


def test_not_a_moco_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(GenattrError, match="base_encoder"):
        get_backbone("moco-v3-vitb", weights=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(GenattrError, match="cannot read"):
        get_backbone("moco-v3-vitb", weights=path)


def test_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    base = _timm_vit_state(2)
    del base["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "broken.pth.tar"
    _write_checkpoint(path, base)
    with pytest.raises(GenattrError, match="missing"):
        get_backbone("moco-v3-vitb", weights=path, heads=HEADS)


def test_dtype_and_channels_last_options(checkpoint) -> None:
    """A bf16 model takes the float32 batches preprocess makes and returns float32."""
    path, _ = checkpoint
    ref = get_backbone("moco-v3-vitb", weights=path, heads=HEADS)
    half = get_backbone("moco-v3-vitb", weights=path, heads=HEADS, dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    x = _images(ref)
    a, b = ref.embed(x), half.embed(x)
    assert b.dtype == torch.float32
    assert F.cosine_similarity(a, b).min() > 0.99
    cl = get_backbone("moco-v3-vitb", weights=path, heads=HEADS, channels_last=True)
    assert cl.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl.embed(x), a, rtol=1e-4, atol=1e-4)
