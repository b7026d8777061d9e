"""Registry behaviour, weight resolution and ids, and the one clear error for offline misses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import genattr.features.weights as weights_mod
from genattr.errors import GenattrError
from genattr.features import backbone_spec, get_backbone, list_backbones
from genattr.features.weights import resolve_hf_dir, weights_id

HF_BACKBONES = {
    "clip-vit-b32": "openai/clip-vit-base-patch32",
    "dino-vitb16": "facebook/dino-vitb16",
    "vit-b16-384": "google/vit-base-patch16-384",
    "dinov2-vitb14": "facebook/dinov2-base",
}
FILE_BACKBONES = {
    "sscd-disc-mixup": "sscd_disc_mixup.torchscript.pt",
    "moco-v3-vitb": "moco-vit-b-300ep.pth.tar",
}


def test_registry_lists_every_family() -> None:
    assert list_backbones() == sorted(
        [
            *HF_BACKBONES,
            *FILE_BACKBONES,
            "efficientnet-lite0",
            "efficientnet-lite0-96",
            "efficientnet-lite0-gram",
            "pixel",
            "world-cnn",
        ]
    )
    dims = {name: backbone_spec(name).dim for name in list_backbones()}
    assert dims == {
        "clip-vit-b32": 512,
        "dino-vitb16": 768,
        "vit-b16-384": 768,
        "moco-v3-vitb": 768,
        "sscd-disc-mixup": 512,
        "dinov2-vitb14": 768,
        "efficientnet-lite0": 1280,
        "efficientnet-lite0-96": 1280,
        "efficientnet-lite0-gram": 24 * 25 // 2 + 40 * 41 // 2,
        "pixel": 3072,
        "world-cnn": 96 * 4 * 4,
    }


def test_unknown_backbone() -> None:
    with pytest.raises(KeyError, match="choose from"):
        get_backbone("resnet-9000")


@pytest.mark.slow
def test_importing_features_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, genattr.features; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def offline_empty_cache(tmp_path: Path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1, empty hub cache and genattr weights dir, and any download attempt
    fails the test."""
    import huggingface_hub
    import torch.hub

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("GENATTR_WEIGHTS", str(tmp_path / "genattr-weights"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return cache


@pytest.mark.parametrize("allow_download", [False, True])
@pytest.mark.parametrize("name", sorted(HF_BACKBONES))
def test_offline_hub_miss_is_one_clear_error(
    name: str, allow_download: bool, offline_empty_cache: Path
) -> None:
    with pytest.raises(GenattrError) as info:
        get_backbone(name, allow_download=allow_download)
    message = str(info.value)
    assert name in message
    assert HF_BACKBONES[name] in message  # which files
    assert "config.json" in message and "model.safetensors" in message
    assert str(offline_empty_cache) in message  # where to put them
    assert "weights=" in message
    assert ("HF_HUB_OFFLINE" in message) == allow_download


@pytest.mark.parametrize("allow_download", [False, True])
@pytest.mark.parametrize("name", sorted(FILE_BACKBONES))
def test_offline_file_miss_is_one_clear_error(
    name: str, allow_download: bool, offline_empty_cache: Path, tmp_path: Path
) -> None:
    with pytest.raises(GenattrError) as info:
        get_backbone(name, allow_download=allow_download)
    message = str(info.value)
    assert name in message
    assert str(tmp_path / "genattr-weights" / FILE_BACKBONES[name]) in message
    assert "weights=PATH" in message


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(GenattrError, match="not found"):
        get_backbone("sscd-disc-mixup", weights=tmp_path / "absent.pt")


def test_explicit_cache_dir_argument(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GenattrError) as info:
        get_backbone("dino-vitb16", cache_dir=tmp_path / "elsewhere")
    assert str(tmp_path / "elsewhere") in str(info.value)


def test_download_is_attempted_only_when_allowed(tmp_path: Path, monkeypatch) -> None:
    """With allow_download=True and HF_HUB_OFFLINE unset, the hub client is called (stubbed
    here: it writes the files a real download would), and the result loads."""
    import huggingface_hub

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    source = tmp_path / "source"
    transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=224,
            patch_size=32,
        )
    ).save_pretrained(source)
    calls = []

    def fake_download(repo_id: str, filename: str, cache_dir: Path) -> str:
        calls.append((repo_id, filename))
        target = Path(cache_dir) / "snapshot" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((source / filename).read_bytes())
        return str(target)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(GenattrError):
        get_backbone("dino-vitb16")
    assert calls == []
    backbone = get_backbone("dino-vitb16", allow_download=True)
    assert calls == [
        ("facebook/dino-vitb16", "config.json"),
        ("facebook/dino-vitb16", "model.safetensors"),
    ]
    assert backbone.dim == 32


def test_weights_id_is_a_content_hash(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(b"weights" * 1000)
    b.write_bytes(b"weights" * 1000)
    c.write_bytes(b"weights" * 999 + b"weightz")
    expected = "sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()[:16]
    assert weights_id([a]) == weights_id([b]) == expected
    assert weights_id([c]) != expected
    assert weights_id([a, c]) == weights_id([c, a]) != weights_id([a])


def test_weights_id_notices_rewritten_files(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"one")
    first = weights_id([path])
    path.write_bytes(b"two, longer")
    assert weights_id([path]) != first


def test_hub_cache_location_follows_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert weights_mod.hf_hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert weights_mod.hf_hub_cache() == tmp_path / "c"
    assert weights_mod.hf_hub_cache(tmp_path / "x") == tmp_path / "x"


def test_bad_repo_id_is_a_missing_directory() -> None:
    with pytest.raises(GenattrError, match="no such directory"):
        resolve_hf_dir("not a repo id", backbone="dino-vitb16")


def test_pixel_backbone_end_to_end() -> None:
    backbone = get_backbone("pixel")
    image = Image.fromarray(np.full((40, 60, 3), 255, dtype=np.uint8))
    out = backbone.embed(torch.from_numpy(backbone.preprocess(image))[None])
    assert out.shape == (1, backbone.dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(1, 3072))
    assert backbone.weights_id == "none"
    with pytest.raises(GenattrError):
        get_backbone("pixel", weights="some/path")
