"""The world's own feature space: SimCLR training (resumable, bit for bit), the `world-cnn`
backbone that loads its weights, and the shipped encoder's features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genattr.errors import GenattrError
from genattr.features import get_backbone
from genattr.features.worldcnn import DEFAULT_WEIGHTS, WorldCNN, load_world_cnn, save_world_cnn
from genattr.world.clipart import ClipartData
from genattr.world.encoder import EncoderConfig, augment, nt_xent, train_encoder


def _tiny_data(n: int = 24) -> ClipartData:
    rng = np.random.default_rng(0)
    images = np.full((n, 32, 32, 3), 255, np.uint8)
    for i in range(n):  # a coloured square at a random place on white
        y, x = rng.integers(0, 20, 2)
        images[i, y : y + 12, x : x + 12] = rng.integers(0, 256, 3)
    records = [{"split": "pretrain" if i < n - 4 else "object-exemplar"} for i in range(n)]
    return ClipartData(images, records, {})


TINY = {"widths": [4, 8], "grid": 2, "batch_size": 8, "projection_dim": 8, "checkpoint_every": 2}


def test_resumed_training_equals_uninterrupted(tmp_path: Path) -> None:
    data = _tiny_data()
    whole = train_encoder(data, tmp_path / "whole", EncoderConfig(steps=4, **TINY))
    first = train_encoder(data, tmp_path / "split", EncoderConfig(steps=4, **TINY), max_steps=2)
    assert first == tmp_path / "split" and not (first / DEFAULT_WEIGHTS.name).exists()
    resumed = train_encoder(data, tmp_path / "split", max_steps=None)  # settings from the run
    a, b = load_world_cnn(whole).state_dict(), load_world_cnn(resumed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # Training moved the weights away from the initialisation.
    torch.manual_seed(0)
    init = WorldCNN([4, 8], 2).state_dict()
    assert not torch.equal(init["body.0.weight"], a["body.0.weight"].to(init["body.0.weight"]))


def test_nt_xent_rewards_matching_views() -> None:
    z = torch.nn.functional.normalize(
        torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1
    )
    other = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    assert nt_xent(z, z, 0.2) < nt_xent(z, other, 0.2)


def test_augment_keeps_range_and_shape() -> None:
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    view = augment(x, EncoderConfig(), torch.Generator().manual_seed(1))
    assert view.shape == x.shape and view.min() >= -1 and view.max() <= 1
    assert not torch.equal(view, x)


def test_backbone_from_a_weights_file(tmp_path: Path) -> None:
    model = WorldCNN([4, 8], 2)
    save_world_cnn(model, tmp_path / "enc.safetensors", {"note": "test"})
    bb = get_backbone("world-cnn", weights=str(tmp_path / "enc.safetensors"))
    assert bb.dim == 8 * 2 * 2 and bb.weights_id.startswith("sha256:")
    x = torch.rand(3, 3, 32, 32)
    # fp16 storage: the loaded network computes what the saved one did, to fp16 precision.
    with torch.no_grad():
        torch.testing.assert_close(bb.embed(x), model.eval()(x), rtol=2e-2, atol=2e-2)
    (tmp_path / "bad.safetensors").write_text("not weights")
    with pytest.raises(GenattrError, match="not a world-cnn weights file"):
        get_backbone("world-cnn", weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(GenattrError, match="no world-cnn weights"):
        get_backbone("world-cnn", weights=str(tmp_path / "absent.safetensors"))


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="no shipped world-cnn weights")
def test_shipped_encoder_separates_images_better_than_chance() -> None:
    """The shipped encoder's features put an image nearer its own augmented view than other
    images of the world: what it was trained for."""
    from genattr.features import backbone_spec
    from genattr.world.clipart import load_data

    data = load_data()
    bb = get_backbone("world-cnn")
    assert bb.dim == backbone_spec("world-cnn").dim
    idx = data.indices("pretrain")[:64]
    x = torch.from_numpy(data.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    views = augment(x, EncoderConfig(), torch.Generator().manual_seed(3))
    f = torch.nn.functional.normalize(bb.embed(x), dim=1)
    g = torch.nn.functional.normalize(bb.embed(views), dim=1)
    top1 = (f @ g.T).argmax(1) == torch.arange(len(f))
    assert top1.float().mean() > 0.5  # chance is 1/64
