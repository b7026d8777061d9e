"""The whole attribution path through the CLI, on images on disk: extract, train-head,
calibrate, index build, attribute (JSON and HTML)."""

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from genattr.cli import app
from genattr.data.benchmark import BenchmarkManifest, CustomizedModel, write_manifest
from genattr.heads.checkpoint import write_head_folder
from tests.conftest import random_mappers
from tests.support import drawing

pytestmark = pytest.mark.slow  # subprocesses, servers or a shared kit: seconds each

runner = CliRunner()


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def synthesized(m: int, k: int) -> Image.Image:
    """A 'generated' image of model m: its exemplar, washed grey (a planted affine shift)
    and with a small extra mark, different per sample."""
    im = drawing(m)
    im = Image.blend(im, Image.new("RGB", im.size, (128, 128, 128)), 0.35)
    im.paste((255 * (k % 2), 0, 255 * (k // 2)), (4 + 10 * k, 50, 12 + 10 * k, 58))
    return im


@pytest.mark.slow
def test_extract_train_calibrate_index_attribute(tmp_path):
    train, synth = tmp_path / "train", tmp_path / "synth"
    train.mkdir()
    synth.mkdir()
    for i in range(100):
        drawing(i).save(train / f"img_{i:03d}.png")
    models = []
    for m in range(18):
        paths = []
        for k in range(4):
            p = synth / f"m{m:02d}_{k}.png"
            synthesized(m, k).save(p)
            paths.append(str(p))
        split = "train" if m < 10 else "val" if m < 14 else "test"
        models.append(
            CustomizedModel(
                f"m{m}",
                [str(train / f"img_{m:03d}.png")],
                {"media": paths},
                "drawing",
                "object",
                split,
            )
        )
    write_manifest(BenchmarkManifest("drawings", models), tmp_path / "bench.json")

    for name, folder in (("train", train), ("synth", synth)):
        run(
            "extract",
            "--features",
            "pixel",
            "--images",
            folder,
            "--out",
            tmp_path / f"store_{name}",
            "--workers",
            "0",
        )
    stores = ["--store-real", tmp_path / "store_train", "--store-synth", tmp_path / "store_synth"]
    run(
        "train-head",
        "--bench",
        tmp_path / "bench.json",
        *stores,
        "--distractors",
        tmp_path / "store_train",
        "--head",
        "linear",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--out",
        tmp_path / "head",
    )
    head_doc = json.loads((tmp_path / "head" / "head.json").read_text())
    assert head_doc["backbone"] == "pixel" and "val_mAP" in head_doc["history"][0]
    _refuses_heads_that_do_not_fit(tmp_path, stores)

    res = run(
        "calibrate",
        "--bench",
        tmp_path / "bench.json",
        *stores,
        "--distractors",
        tmp_path / "store_train",
        "--head",
        tmp_path / "head",
        "--top-l",
        "20",
        "--out",
        tmp_path / "cal.json",
    )
    assert "held-out" in res.output
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["kind"] == "genattr.calibrator" and (tmp_path / "cal.reliability.png").exists()

    run(
        "index",
        "build",
        "--store",
        tmp_path / "store_train",
        "--head",
        tmp_path / "head",
        "--out",
        tmp_path / "index",
    )
    queries = [synth / "m15_0.png", synth / "m16_3.png"]
    run(
        "attribute",
        *queries,
        "--index",
        tmp_path / "index",
        "--calibrator",
        tmp_path / "cal.json",
        "--top-k",
        "5",
        "--format",
        "json",
        "--out",
        tmp_path / "a.json",
    )
    answers = json.loads((tmp_path / "a.json").read_text())
    assert [a["results"][0]["path"] for a in answers] == [
        str(train / "img_015.png"),
        str(train / "img_016.png"),
    ]
    for a in answers:
        infl = [r["influence"] for r in a["results"]]
        assert infl == sorted(infl, reverse=True) and infl[0] > 0
        assert sum(infl) + a["remaining_influence"] == pytest.approx(1.0, abs=1e-6)
        assert a["exact"]
    run(
        "attribute",
        queries[0],
        "--index",
        tmp_path / "index",
        "--calibrator",
        tmp_path / "cal.json",
        "--format",
        "html",
        "--out",
        tmp_path / "a.html",
    )
    assert "img_015.png" in (tmp_path / "a.html").read_text()
    table = run("attribute", queries[0], "--index", tmp_path / "index", "--top-k", "3")
    assert "img_015.png" in table.output


def _refuses_heads_that_do_not_fit(tmp_path, stores):
    """A head of another input size, or one trained on other weights, is refused by every
    command that reads a head with a store, naming the head; nothing is written."""
    wrong_dim = tmp_path / "head_16d"
    write_head_folder(random_mappers("linear", 16, 0), wrong_dim, backbone="pixel")
    other_weights = tmp_path / "head_other"
    shutil.copytree(tmp_path / "head", other_weights)
    doc = json.loads((other_weights / "head.json").read_text())
    (other_weights / "head.json").write_text(json.dumps({**doc, "weights_id": "abc123"}))
    for head, says in ((wrong_dim, "16-d"), (other_weights, "abc123")):
        commands = {
            "index": ["index", "build", "--store", tmp_path / "store_train"],
            "calibrate": [
                "calibrate",
                "--bench",
                tmp_path / "bench.json",
                *stores,
                "--distractors",
                tmp_path / "store_train",
            ],
            "evaluate": [
                "evaluate",
                "--gallery-feats",
                tmp_path / "store_train",
                "--test-feats",
                tmp_path / "store_train",
            ],
        }
        flag = {"index": "--head", "calibrate": "--head", "evaluate": "--mapper"}
        for name, args in commands.items():
            out = tmp_path / f"refused_{name}"
            res = runner.invoke(app, [str(a) for a in (*args, flag[name], head, "--out", out)])
            assert res.exit_code == 2, (name, res.output)
            assert str(head.name) in res.output and says in res.output, (name, res.output)
            assert "Traceback" not in res.output and not out.exists()


def test_attribute_cli_errors(tmp_path):
    res = runner.invoke(app, ["attribute", str(tmp_path / "x.png"), "--index", str(tmp_path)])
    assert res.exit_code == 2 and "not a genattr index" in res.output
    res = runner.invoke(app, ["attribute", "x.png", "--index", str(tmp_path), "--format", "json"])
    assert res.exit_code == 2 and "--out" in res.output
