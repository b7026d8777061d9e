import json

import numpy as np
import pytest
import torch

from genattr.evaluate import evaluate_protocol
from genattr.heads.checkpoint import load_heads
from genattr.heads.train import (
    PairedFeatures,
    TrainConfig,
    _pick,
    nt_xent_multi_positive,
    save_heads,
    train_heads,
)
from tests.synthetic import make_synthetic_benchmark


def mean_map(result):
    return float(np.mean([s["mAP"] for s in result.summary().values()]))


@pytest.fixture(scope="module")
def planted():
    """60 models with a planted linear distortion between real and synth features."""
    bench = make_synthetic_benchmark(
        n_gallery=6000,
        dim=32,
        n_object_models=45,
        n_style_models=15,
        distortion=1.2,
        noise=0.5,
        seed=7,
    )
    n = len(bench.testcase.exemplar_chunks)
    models = np.random.default_rng(0).permutation(n)
    split = {"train": set(models[:36]), "val": set(models[36:48]), "test": set(models[48:])}
    return bench, {k: bench.testcase.select_models(v) for k, v in split.items()}


def test_strict_validation_and_exemplar_negatives(planted):
    """strict_validation scores the val models on the stricter gallery (the untrained head's
    entry says so); every exemplar as a negative trains; an unknown mode is refused."""
    bench, split = planted
    gallery = bench.gallery.feats
    data = PairedFeatures.from_testcase(split["train"], distractors=gallery[:1000])
    for strict in (False, True):
        config = TrainConfig(
            head="channel", epochs=1, exemplar_negatives="all", strict_validation=strict
        )
        result = train_heads(data, config, validation=(gallery, split["val"]))
        want = evaluate_protocol(gallery, split["val"], (10,), exemplars_as_distractors=strict)
        assert result.history[0]["val_mAP"] == pytest.approx(mean_map(want), abs=1e-9)
        assert np.isfinite(result.history[1]["loss"])
    with pytest.raises(ValueError, match="exemplar_negatives"):
        train_heads(data, TrainConfig(exemplar_negatives="some"))


@pytest.mark.slow
def test_linear_head_learns_planted_distortion(planted, tmp_path):
    bench, split = planted
    gallery = bench.gallery.feats
    raw = mean_map(evaluate_protocol(gallery, split["test"]))
    data = PairedFeatures.from_testcase(split["train"], distractors=gallery[:4000])
    config = TrainConfig(
        head="linear", epochs=40, lr=3e-3, batch_size=64, distractors_per_batch=512, patience=8
    )
    result = train_heads(data, config, validation=(gallery, split["val"]))
    learned = mean_map(evaluate_protocol(gallery, split["test"], mappers=result.mappers))
    assert learned > raw + 0.1, (raw, learned)
    assert result.best_epoch >= 0 and "val_mAP" in result.history[0]
    # saved and loaded, the heads give the same numbers
    save_heads(result, tmp_path / "head", backbone="synthetic")
    pair, doc = load_heads(tmp_path / "head")
    again = mean_map(evaluate_protocol(gallery, split["test"], mappers=pair))
    assert again == pytest.approx(learned, abs=1e-9)
    assert doc["head"] == "linear" and doc["backbone"] == "synthetic"
    assert json.loads((tmp_path / "head" / "head.json").read_text())["format_version"] == 1


@pytest.mark.parametrize("head", ["mlp", "channel"])
def test_other_heads_train_and_are_repeatable(planted, head):
    bench, split = planted
    data = PairedFeatures.from_testcase(split["train"], distractors=bench.gallery.feats[:2000])
    config = TrainConfig(
        head=head,
        epochs=2,
        batch_size=64,
        distractors_per_batch=128,
        mlp_hidden_dim=64,
        mlp_out_dim=32,
    )
    a = train_heads(data, config)
    b = train_heads(data, config)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.mappers.synth(x), b.mappers.synth(x), rtol=0, atol=0)
    assert a.history[-1]["loss"] < a.history[0]["loss"]  # channel: 1.466 -> 1.426, measured


def test_views_axis_is_used(planted):
    """With a views axis every step draws one view per row: the heads learn from both views
    (they differ from heads trained where the second view repeats the first), and both views
    are drawn about equally."""
    _, split = planted
    base = PairedFeatures.from_testcase(split["train"])
    noise = 0.5 * torch.randn(base.exemplars.shape, generator=torch.Generator().manual_seed(1))

    def trained(second: torch.Tensor):
        views = PairedFeatures(
            torch.stack([base.exemplars, second]),
            base.exemplar_chunks,
            torch.stack([base.synth, base.synth]),
            base.synth_model,
        )
        result = train_heads(views, TrainConfig(epochs=1, batch_size=64, seed=0))
        assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
        return result.mappers.real.state_dict()

    repeated, noisy = trained(base.exemplars), trained(base.exemplars + noise)
    assert any(not torch.equal(repeated[k], noisy[k]) for k in repeated)
    x = torch.stack([torch.zeros(1000, 2), torch.ones(1000, 2)])
    picked = _pick(x, torch.arange(1000), torch.Generator().manual_seed(0))
    assert picked.shape == (1000, 2) and 400 < int(picked[:, 0].sum()) < 600


def test_nt_xent_prefers_positives():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    cand = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]), dim=-1
    )
    good = nt_xent_multi_positive(q, cand, torch.tensor([[True, False, False]]), 0.1)
    bad = nt_xent_multi_positive(q, cand, torch.tensor([[False, True, False]]), 0.1)
    assert good < 0.01 < bad
    # two positives: the target is uniform over them
    both = nt_xent_multi_positive(q, cand, torch.tensor([[True, True, False]]), 0.1)
    logits = q @ cand.T / 0.1
    logp = torch.log_softmax(logits, dim=1)[0]
    assert both.item() == pytest.approx(-(logp[0] + logp[1]).item() / 2)


def test_head_import_export_cli(tmp_path):
    from typer.testing import CliRunner

    from genattr.cli import app
    from genattr.heads.checkpoint import load_mapper_pth
    from tests.conftest import random_mappers

    pair = random_mappers("mlp", 24, seed=1)
    torch.save(
        {"real_mapper": pair.real.state_dict(), "synth_mapper": pair.synth.state_dict()},
        tmp_path / "m.pth",
    )
    runner = CliRunner()
    res = runner.invoke(
        app, ["head", "import", "--mapper", str(tmp_path / "m.pth"), "--out", str(tmp_path / "h")]
    )
    assert res.exit_code == 0, res.output
    heads, doc = load_heads(tmp_path / "h")
    assert doc["head"] == "mlp" and doc["imported_from"].endswith("m.pth")
    res = runner.invoke(
        app, ["head", "export", "--head", str(tmp_path / "h"), "--out", str(tmp_path / "back.pth")]
    )
    assert res.exit_code == 0, res.output
    back = load_mapper_pth(tmp_path / "back.pth")
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(back.synth(x), pair.synth(x))
        torch.testing.assert_close(heads.real(x), pair.real(x))


def test_a_damaged_head_folder_is_refused_in_one_line(tmp_path):
    """A truncated head.safetensors, a head.json that is a list or of another kind: a
    GenattrError naming the folder, not a traceback."""
    from genattr.errors import GenattrError
    from genattr.heads.checkpoint import write_head_folder
    from tests.conftest import random_mappers

    write_head_folder(random_mappers("linear", 8, 0), tmp_path / "h", backbone="x")
    pair, _ = load_heads(tmp_path / "h")
    assert pair.kind == "linear" and pair.in_dim == 8
    weights = (tmp_path / "h" / "head.safetensors").read_bytes()
    (tmp_path / "h" / "head.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(GenattrError, match="not a genattr head directory"):
        load_heads(tmp_path / "h")
    (tmp_path / "h" / "head.safetensors").write_bytes(weights)
    for doc in ([1, 2], {"kind": "genattr.index", "format_version": 1}):
        (tmp_path / "h" / "head.json").write_text(json.dumps(doc))
        with pytest.raises(GenattrError, match="not a genattr head"):
            load_heads(tmp_path / "h")
    good = {"kind": "genattr.head", "format_version": 1, "head": "linear", "in_dim": 8}
    damaged = [
        ({**good, "out_dim": 8, "head": "cnn"}, r"head\.json: damaged \(head:"),
        ({**good, "out_dim": 8, "in_dim": "8"}, r"damaged \(in_dim:"),
        ({**good}, r"damaged \(out_dim:"),
        ({**good, "in_dim": 16, "out_dim": 8}, "maps 8 -> 8 dimensions, head.json says 16"),
    ]
    for doc, message in damaged:
        (tmp_path / "h" / "head.json").write_text(json.dumps(doc))
        with pytest.raises(GenattrError, match=message):
            load_heads(tmp_path / "h")
    (tmp_path / "h" / "head.json").write_text(json.dumps({**good, "out_dim": 8}))
    assert load_heads(tmp_path / "h")[0].out_dim == 8
