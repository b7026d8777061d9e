import json

import numpy as np
import pytest
import torch
from torch import nn

from genattr.data import (
    BenchmarkManifest,
    CustomizedModel,
    load_gallery_pth,
    load_testcase_pth,
    read_abc_json,
    read_benchmark,
    read_manifest,
    save_testcase_pth,
    write_abc_json,
    write_manifest,
)
from genattr.errors import GenattrError
from genattr.heads.checkpoint import load_mapper_pth, save_mapper_pth
from tests.conftest import random_mappers


def test_official_json_bamfg(shared_abc, tmp_path):
    bench = read_abc_json(shared_abc / "test_bamfg.json")
    assert len(bench.models) == 250
    assert sum(len(m.exemplars) for m in bench.models) == 1692
    assert bench.prompt_types == ["gpt", "object"]
    assert all(m.mode == "style" and m.category is None for m in bench.models)
    assert all(len(v) == 40 for m in bench.models for v in m.synth.values())
    # written back, the authors' layout is the same data
    write_abc_json(bench, tmp_path / "out.json")
    original = json.loads((shared_abc / "test_bamfg.json").read_text())
    written = json.loads((tmp_path / "out.json").read_text())
    assert written == original


def test_official_json_imagenet_and_manifest_round_trip(shared_abc, tmp_path):
    bench = read_abc_json(shared_abc / "test_observed_imagenet.json")
    assert len(bench.models) == 593
    assert {len(m.exemplars) for m in bench.models} == {1}
    assert bench.prompt_types == ["media", "gpt"]
    assert all(m.mode == "object" and m.category for m in bench.models)
    write_manifest(bench, tmp_path / "bench.json")
    again = read_benchmark(tmp_path / "bench.json")
    assert again.models == bench.models
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["format_version"] == 1 and doc["kind"] == "genattr.benchmark"


def test_manifest_split_and_validation(tmp_path):
    models = [
        CustomizedModel("a", ["e.png"], {"media": ["s.png"]}, "dog", "object", "train"),
        CustomizedModel("b", ["f.png", "g.png"], {"media": ["t.png"]}, None, "style", "val"),
    ]
    bench = BenchmarkManifest("toy", models)
    assert [m.id for m in bench.split("val").models] == ["b"]
    write_manifest(bench, tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["models"][0]["split"] = "holdout"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(GenattrError, match=r"bad\.json"):
        read_manifest(tmp_path / "bad.json")
    doc["format_version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(doc))
    with pytest.raises(GenattrError, match="format_version 99"):
        read_manifest(tmp_path / "v99.json")


def authors_style_testcase_dict(rng):
    """A test-case file laid out exactly as the authors' extract_feat.py writes it."""
    chunks = [(0, 1), (1, 5), (5, 6)]
    return {
        "exemplar_paths": [f"ex/{i}.jpg" for i in range(6)],
        "exemplar_chunks": chunks,
        "exemplar_tensors": torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32)),
        "synth_paths": {"media": [f"s/{i}.png" for i in range(4)], "gpt": ["g/0.png"]},
        "synth_ids": {"media": [0, 1, 1, 2], "gpt": [1]},
        "synth_tensors": {
            "media": torch.from_numpy(rng.standard_normal((4, 8)).astype(np.float32)),
            "gpt": torch.from_numpy(rng.standard_normal((1, 8)).astype(np.float32)),
        },
    }


def test_feature_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    raw = authors_style_testcase_dict(rng)
    torch.save(raw, tmp_path / "test.pth")
    tc = load_testcase_pth(tmp_path / "test.pth")
    assert tc.exemplar_chunks == raw["exemplar_chunks"]
    assert tc.synth_ids == raw["synth_ids"] and tc.prompt_types == ["media", "gpt"]
    save_testcase_pth(tc, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again.keys() == raw.keys()
    assert torch.equal(again["exemplar_tensors"], raw["exemplar_tensors"])
    assert torch.equal(again["synth_tensors"]["gpt"], raw["synth_tensors"]["gpt"])
    assert [tuple(c) for c in again["exemplar_chunks"]] == raw["exemplar_chunks"]

    feats = torch.randn(10, 8)
    torch.save({"feats": feats, "paths": [f"{i}.jpg" for i in range(10)]}, tmp_path / "g.pth")
    gallery = load_gallery_pth(tmp_path / "g.pth")
    assert torch.equal(gallery.feats, feats) and gallery.paths[3] == "3.jpg"


class AuthorsElementWise(nn.Module):
    """The authors' channel mapper, as their networks.py defines its parameter."""

    def __init__(self, dim):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, dim))

    def forward(self, x):
        return x * self.weights


def authors_mlp(dim, hidden=512, out=256):
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.0),
        nn.Linear(hidden, out, bias=False),
        nn.BatchNorm1d(out, affine=False),
    )


@pytest.mark.parametrize(
    "kind,make",
    [
        ("linear", lambda: nn.Linear(16, 16)),
        ("channel", lambda: AuthorsElementWise(16)),
        ("mlp", lambda: authors_mlp(16)),
    ],
)
def test_authors_mapper_checkpoint(tmp_path, kind, make):
    torch.manual_seed(0)
    real, synth = make().eval(), make().eval()
    with torch.no_grad():
        for module in (real, synth):
            for name, t in module.state_dict().items():
                if t.is_floating_point():
                    t.copy_(
                        torch.randn_like(t).abs() + 0.1 if "var" in name else torch.randn_like(t)
                    )
    torch.save(
        {"real_mapper": real.state_dict(), "synth_mapper": synth.state_dict()}, tmp_path / "m.pth"
    )
    pair = load_mapper_pth(tmp_path / "m.pth")
    assert pair.kind == kind and pair.in_dim == 16
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(pair.real(x), real(x))
        torch.testing.assert_close(pair.synth(x), synth(x))
    with pytest.raises(GenattrError, match=r"m\.pth"):
        load_mapper_pth(tmp_path / "m.pth", "channel" if kind != "channel" else "linear")
    # written back, the authors' modules load it strictly
    save_mapper_pth(pair, tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    fresh = make()
    fresh.load_state_dict(back["synth_mapper"], strict=True)


def test_mapper_round_trip_random_heads(tmp_path):
    pair = random_mappers("mlp", 24, seed=0)
    save_mapper_pth(pair, tmp_path / "m.pth")
    again = load_mapper_pth(tmp_path / "m.pth", "mlp")
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(again.real(x), pair.real(x))


def test_truncated_and_wrong_files(tmp_path):
    torch.save({"feats": torch.randn(100, 8), "paths": ["x"] * 100}, tmp_path / "g.pth")
    data = (tmp_path / "g.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(GenattrError, match=r"cut\.pth: cannot read"):
        load_gallery_pth(tmp_path / "cut.pth")
    with pytest.raises(GenattrError, match="not a test-case feature file"):
        load_testcase_pth(tmp_path / "g.pth")
    with pytest.raises(GenattrError, match="no such file"):
        load_gallery_pth(tmp_path / "missing.pth")
