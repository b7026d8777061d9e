"""SSCD loads a TorchScript file as released; here a small scripted ResNet-like stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.errors import GenattrError
from genattr.features import backbone_spec, get_backbone

# Scripting the stand-in model: deprecated in recent torch, still how SSCD is released.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


class _TinySSCD(torch.nn.Module):
    """Conv trunk, GeM pooling, linear to 512, L2 norm: SSCD's output shape and contract."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 7, stride=4, padding=3),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        )
        self.fc = torch.nn.Linear(16, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1.0 / 3)
        return torch.nn.functional.normalize(self.fc(x), dim=-1)


@pytest.fixture
def scripted(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    module = _TinySSCD().eval()
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.script(module).save(str(path))
    return path, module


def test_sscd_torchscript_loads_and_matches(scripted) -> None:
    path, module = scripted
    backbone = get_backbone("sscd-disc-mixup", weights=path)
    assert backbone.dim == 512
    assert backbone.preprocess == backbone_spec("sscd-disc-mixup").preprocess
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))] * 2
    x = torch.from_numpy(np.stack([backbone.preprocess(im) for im in images]))
    assert x.shape == (2, 3, 288, 288)
    got = backbone.embed(x)
    with torch.inference_mode():
        expected = module(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert backbone.weights_id.startswith("sha256:") and len(backbone.weights_id) == 23


def test_sscd_found_in_genattr_weights_dir(scripted, monkeypatch) -> None:
    path, _ = scripted
    monkeypatch.setenv("GENATTR_WEIGHTS", str(path.parent))
    assert Path(get_backbone("sscd-disc-mixup").weights_path) == path


def test_sscd_channels_last(scripted) -> None:
    path, _ = scripted
    a = get_backbone("sscd-disc-mixup", weights=path)
    b = get_backbone("sscd-disc-mixup", weights=path, channels_last=True)
    x = torch.randn(1, 3, 288, 288)
    torch.testing.assert_close(a.embed(x), b.embed(x), rtol=1e-4, atol=1e-5)


def test_not_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "sscd.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(GenattrError, match="TorchScript"):
        get_backbone("sscd-disc-mixup", weights=path)
