"""The transformers families (CLIP, DINO, ViT-384, DINOv2), loaded through the real path.

Each test saves a tiny random model in the layout of the real hub checkpoint to a temp dir and
loads it with `get_backbone(name, weights=dir)`; the expected features come from the saved
model itself, so random re-initialisation or a wrong output tensor would fail.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.errors import GenattrError
from genattr.features import backbone_spec, get_backbone

transformers = pytest.importorskip("transformers")


def _photo(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _batch(backbone, n: int = 2) -> torch.Tensor:
    return torch.from_numpy(np.stack([backbone.preprocess(_photo(i)) for i in range(n)]))


def _sha16(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _vit_config(**kw):
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        layer_norm_eps=1e-6,
    )
    return transformers.ViTConfig(**(base | kw))


def _check_common(backbone, name: str, directory: Path, dim: int) -> None:
    assert backbone.name == name
    assert backbone.dim == dim
    assert backbone.preprocess == backbone_spec(name).preprocess
    assert backbone.weights_id == _sha16(directory / "model.safetensors")
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    json.dumps(backbone.preprocess_config)


def test_clip_image_embeds_match_clip_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=24,
    )
    full = transformers.CLIPModel(config).eval()  # the hub repo holds the full CLIP model
    full.save_pretrained(tmp_path)

    backbone = get_backbone("clip-vit-b32", weights=str(tmp_path))
    _check_common(backbone, "clip-vit-b32", tmp_path, 24)
    x = _batch(backbone)
    with torch.inference_mode():
        out = full.get_image_features(pixel_values=x)
        expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    got = backbone.embed(x)
    assert got.shape == (2, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_clip_vision_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(7)
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=16,
    )
    vision = transformers.CLIPVisionModelWithProjection(config).eval()
    vision.save_pretrained(tmp_path)
    backbone = get_backbone("clip-vit-b32", weights=tmp_path)
    _check_common(backbone, "clip-vit-b32", tmp_path, 16)
    x = _batch(backbone, 1)
    with torch.inference_mode():
        expected = vision(pixel_values=x).image_embeds
    torch.testing.assert_close(backbone.embed(x), expected, rtol=1e-5, atol=1e-5)


def test_dino_returns_normed_cls_not_pooler(tmp_path: Path) -> None:
    torch.manual_seed(1)
    vit = transformers.ViTModel(_vit_config(image_size=224, patch_size=32)).eval()
    vit.save_pretrained(tmp_path)

    backbone = get_backbone("dino-vitb16", weights=tmp_path)
    _check_common(backbone, "dino-vitb16", tmp_path, 32)
    x = _batch(backbone)
    with torch.inference_mode():
        out = vit(pixel_values=x)
    got = backbone.embed(x)
    torch.testing.assert_close(got, out.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, out.pooler_output, atol=1e-3)


def test_vit384_features_feed_the_classifier(tmp_path: Path) -> None:
    torch.manual_seed(2)
    config = _vit_config(image_size=384, patch_size=64, num_labels=7)
    classifier = transformers.ViTForImageClassification(config).eval()
    classifier.save_pretrained(tmp_path)

    backbone = get_backbone("vit-b16-384", weights=tmp_path)
    _check_common(backbone, "vit-b16-384", tmp_path, 32)
    x = _batch(backbone)
    assert x.shape[-2:] == (384, 384)
    with torch.inference_mode():
        logits = classifier(pixel_values=x).logits
        got = backbone.embed(x)
        # "head removed": the features are exactly what the classifier consumes.
        torch.testing.assert_close(classifier.classifier(got), logits, rtol=1e-5, atol=1e-5)


def test_dinov2_cls(tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=224,
        patch_size=32,
    )
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(tmp_path)

    backbone = get_backbone("dinov2-vitb14", weights=tmp_path)
    _check_common(backbone, "dinov2-vitb14", tmp_path, 32)
    x = _batch(backbone)
    with torch.inference_mode():
        out = model(pixel_values=x)
    got = backbone.embed(x)
    torch.testing.assert_close(got, out.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, out.pooler_output, rtol=1e-5, atol=1e-5)


def _legacy_vit_key(key: str) -> str:
    """transformers 5 names -> the names in the hub's ViT checkpoints (written by 4.x)."""
    key = key.replace("layers.", "encoder.layer.")
    for new, old in [("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")]:
        key = key.replace(f"attention.{new}", f"attention.attention.{old}")
    key = key.replace("attention.o_proj", "attention.output.dense")
    return key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")


def test_hub_era_checkpoint_layout_loads(tmp_path: Path) -> None:
    """The real DINO / ViT repos hold pytorch_model.bin with transformers-4 key names."""
    torch.manual_seed(8)
    config = _vit_config(image_size=224, patch_size=32)
    vit = transformers.ViTModel(config, add_pooling_layer=False).eval()
    config.save_pretrained(tmp_path)
    legacy = {_legacy_vit_key(k): v for k, v in vit.state_dict().items()}
    assert "encoder.layer.0.attention.attention.query.weight" in legacy
    torch.save(legacy, tmp_path / "pytorch_model.bin")

    backbone = get_backbone("dino-vitb16", weights=tmp_path)
    assert backbone.weights_id == _sha16(tmp_path / "pytorch_model.bin")
    x = _batch(backbone, 1)
    with torch.inference_mode():
        expected = vit(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(backbone.embed(x), expected, rtol=1e-5, atol=1e-5)


def test_loads_from_the_hub_cache_by_repo_id(tmp_path: Path, monkeypatch) -> None:
    """A model in the hub cache layout loads by its repo id with no network and no path."""
    torch.manual_seed(4)
    vit = transformers.ViTModel(_vit_config(image_size=224, patch_size=32)).eval()
    repo = tmp_path / "hub" / "models--facebook--dino-vitb16"
    commit = "0123456789abcdef0123456789abcdef01234567"
    vit.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    backbone = get_backbone("dino-vitb16")  # default repo id, found in the cache
    assert Path(backbone.weights_path) == repo / "snapshots" / commit
    x = _batch(backbone, 1)
    with torch.inference_mode():
        expected = vit(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(backbone.embed(x), expected, rtol=1e-5, atol=1e-5)


def test_same_weights_elsewhere_have_the_same_id(tmp_path: Path) -> None:
    torch.manual_seed(5)
    vit = transformers.ViTModel(_vit_config(image_size=224, patch_size=32))
    vit.save_pretrained(tmp_path / "a")
    vit.save_pretrained(tmp_path / "b")
    torch.manual_seed(6)
    transformers.ViTModel(_vit_config(image_size=224, patch_size=32)).save_pretrained(
        tmp_path / "c"
    )
    ids = [get_backbone("dino-vitb16", weights=tmp_path / d).weights_id for d in "abc"]
    assert ids[0] == ids[1] != ids[2]


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=224, patch_size=32
    )
    transformers.Dinov2Model(config).save_pretrained(tmp_path)
    with pytest.raises(GenattrError, match="dinov2"):
        get_backbone("dino-vitb16", weights=tmp_path)


def test_checkpoint_missing_weights_is_refused(tmp_path: Path) -> None:
    """transformers would fill absent weights with random values; genattr refuses."""
    vit = transformers.ViTModel(_vit_config(image_size=224, patch_size=32))
    vit.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3  # one more layer than the file holds
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GenattrError, match="missing or mismatched"):
        get_backbone("dino-vitb16", weights=tmp_path)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(GenattrError, match=r"config\.json"):
        get_backbone("clip-vit-b32", weights=tmp_path)
    with pytest.raises(GenattrError, match="no such directory"):
        get_backbone("clip-vit-b32", weights=str(tmp_path / "nope" / "clip"))
