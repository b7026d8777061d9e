"""Preprocessing matches torchvision's Resize/CenterCrop/ToTensor/Normalize on real images.

The expected arrays were made with torchvision by scripts/make_preprocess_fixtures.py (see its
docstring for the lossless uint8 + lookup-table storage).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genattr.features import ImagePreprocess, backbone_spec, list_backbones
from genattr.features.preprocess import resized_size

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "preprocess"
INDEX = json.loads((FIXTURES / "index.json").read_text())


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_preprocess_fixtures", ROOT / "scripts" / "make_preprocess_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "torchvision_reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    pytest.importorskip("skimage")
    return _load_script().source_images()


# The world's EfficientNet variants resize to exactly 96x96 (bicubic) and normalise with 0.5:
# the same operations as `pixel` (exact-size bicubic, checked at 32 px) and
# `efficientnet-lite0` (0.5 normalisation). No 96 px reference: the fixtures are made in a
# torchvision venv, and torchvision does not install beside torch 2.13 here.
NO_REFERENCE = {"efficientnet-lite0-96", "efficientnet-lite0-gram", "world-cnn"}


def test_every_registered_backbone_has_a_reference() -> None:
    assert sorted(INDEX["backbones"]) == sorted(set(list_backbones()) - NO_REFERENCE)


def test_world_variants_preprocess_like_their_references() -> None:
    cfg = backbone_spec("efficientnet-lite0-96").preprocess.to_config()
    assert cfg == backbone_spec("efficientnet-lite0-gram").preprocess.to_config()
    pixel = backbone_spec("pixel").preprocess.to_config()
    lite0 = backbone_spec("efficientnet-lite0").preprocess.to_config()
    assert (cfg["interpolation"], cfg["mean"], cfg["std"]) == (
        pixel["interpolation"],
        lite0["mean"],
        lite0["std"],
    )
    assert cfg["resize"] == [96, 96] and cfg["resize_mode"] == pixel["resize_mode"] == "exact"
    # world-cnn: the pixel backbone's 32 px resize, scaled to [-1, 1] as the encoder trained.
    world = backbone_spec("world-cnn").preprocess.to_config()
    assert {k: v for k, v in world.items() if k not in ("mean", "std")} == {
        k: v for k, v in pixel.items() if k not in ("mean", "std")
    }
    assert world["mean"] == world["std"] == lite0["mean"] == [0.5, 0.5, 0.5]


def test_fixture_images_cover_the_awkward_cases(images: dict[str, Image.Image]) -> None:
    modes = {im.mode for im in images.values()}
    assert {"RGB", "L", "RGBA"} <= modes
    assert any(im.width != im.height for im in images.values())
    for name, image in images.items():  # the test rebuilds the very images the script used
        assert [*image.size, image.mode] == INDEX["images"][name]


@pytest.mark.parametrize("backbone", sorted(INDEX["backbones"]))
def test_preprocess_matches_torchvision(
    backbone: str, reference: dict[str, np.ndarray], images: dict[str, Image.Image]
) -> None:
    preprocess = backbone_spec(backbone).preprocess
    geometry = INDEX["backbones"][backbone]["geometry"]
    lut = reference[f"lut__{backbone}"]
    for name, image in images.items():
        u8 = reference[f"u8__{geometry}__{name}"]
        expected = np.stack([lut[c][u8[..., c]] for c in range(3)])
        got = preprocess(image)
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=f"{name}")


@pytest.mark.parametrize("backbone", sorted(INDEX["backbones"]))
def test_config_describes_the_reference_transform(backbone: str) -> None:
    config = backbone_spec(backbone).preprocess.to_config()
    ref = INDEX["backbones"][backbone]
    geometry = INDEX["geometries"][ref["geometry"]]
    assert config["resize"] == geometry["resize"]
    assert config["interpolation"] == geometry["interpolation"]
    assert config["crop"] == geometry["crop"]
    np.testing.assert_allclose(config["mean"], ref["mean"])
    np.testing.assert_allclose(config["std"], ref["std"])
    json.dumps(config)


def test_center_crop_rounds_half_to_even() -> None:
    # 5 px wide, crop 2: torchvision starts at round(1.5) = 2; 7 px: round(2.5) = 2.
    for width, start in [(5, 2), (7, 2)]:
        ramp = np.repeat(np.arange(width, dtype=np.uint8)[None, :, None] * 10, 3, axis=2)
        image = Image.fromarray(np.repeat(ramp, 2, axis=0))
        out = ImagePreprocess(resize=(2, width), interpolation="nearest", crop=2).geometry(image)
        assert out[0, :, 0].tolist() == [10 * start, 10 * (start + 1)]


def test_center_crop_pads_small_images_with_zeros() -> None:
    image = Image.new("RGB", (3, 2), (255, 255, 255))
    out = ImagePreprocess(resize=(2, 3), interpolation="nearest", crop=4).geometry(image)
    assert out.shape == (4, 4, 3)
    # torchvision pads left (4-3)//2 = 0, right 1, top 1, bottom 1.
    assert out[:, :, 0].tolist() == [[0] * 4, [255, 255, 255, 0], [255, 255, 255, 0], [0] * 4]


def test_resized_size_keeps_aspect_with_truncation() -> None:
    assert resized_size(449, 300, 224) == (335, 224)  # 224 * 449 / 300 = 335.2
    assert resized_size(301, 512, 256) == (256, 435)  # 256 * 512 / 301 = 435.4
    assert resized_size(500, 500, 384) == (384, 384)
    assert resized_size(10, 20, (3, 4)) == (4, 3)


def test_config_round_trip_and_pickle() -> None:
    for name in list_backbones():
        pre = backbone_spec(name).preprocess
        assert ImagePreprocess.from_config(json.loads(json.dumps(pre.to_config()))) == pre
        assert pickle.loads(pickle.dumps(pre)) == pre  # DataLoader workers get a copy


def test_output_size() -> None:
    assert backbone_spec("vit-b16-384").preprocess.output_size == (384, 384)
    assert backbone_spec("pixel").preprocess.output_size == (32, 32)
    assert ImagePreprocess(resize=256).output_size is None


def test_normalize_is_the_per_pixel_formula_and_a_channels_last_view() -> None:
    """The tiled-row normalisation computes exactly (x / 255 - mean) / std per pixel, and its
    (3, H, W) result views (H, W, 3) memory so channels-last batches stack without a
    transposition."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pre = ImagePreprocess(resize=37, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    got = pre.normalize(u8)
    mean, std = np.float32(pre.mean), np.float32(pre.std)
    plain = ((u8.astype(np.float32) / np.float32(255) - mean) / std).transpose(2, 0, 1)
    assert got.dtype == np.float32 and got.shape == (3, 37, 53)
    np.testing.assert_array_equal(got, plain)  # same float32 operations in the same order
    assert got.transpose(1, 2, 0).flags.c_contiguous
