"""`genattr demo` on the shipped miniature world, end to end through the CLI (every backbone,
few epochs, to keep CI short): the report exists, its numbers are the ones written to
results files, customized samples are attributed far above chance in every feature space, a
trained head beats its raw backbone, and headless Chromium renders every table and image of
the report (skipped where Chromium/Playwright are missing)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from genattr.cli import app
from genattr.evaluate import expected_random_ap
from genattr.workflows.demo import DEMO_BACKBONES

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output
    return out


# Measured on the shipped world (session ten, chance = the exact expected AP of a random
# ranking), raw features of both default backbones: objects 25-32x chance, unobserved
# 22-30x, styles 1.9-6.7x. Each floor sits well under the smallest measured ratio, so noise
# never trips it while a broken stage does.
CHANCE_FACTOR = {"object": 10, "unobserved": 8, "style": 1.3}
# Raw mAP over the query-independent control on the stricter gallery (what looking like a
# held-out image alone scores), measured: objects 30-59x, unobserved 12.7-70x, styles 3.3-3.7x.
CONTROL_FACTOR = {"object": 10, "unobserved": 5, "style": 1.5}


def test_demo_writes_results_above_chance_and_controls(demo_out) -> None:
    from genattr.world.benchmark import load_benchmark
    from genattr.world.clipart import load_data

    n_gallery = len(load_data().indices("pretrain"))
    models = [m for m in load_benchmark().models if m["split"] == "test"]
    summary = json.loads((demo_out / "summary.json").read_text())
    assert set(summary["backbones"]) == set(DEMO_BACKBONES)
    for name in DEMO_BACKBONES:
        raw = json.loads((demo_out / "results" / f"{name}.raw.json").read_text())["results"]
        head = json.loads((demo_out / "results" / f"{name}.head.json").read_text())["results"]
        cases = {f"{m.get('case', m['mode'])}: {p}" for m in models for p in m["synth"]}
        assert set(raw) == set(head) == cases
        control = summary["backbones"][name]["controls"]["raw, query-independent, stricter gallery"]
        for ptype, r in raw.items():
            case, p = ptype.split(": ")
            n_ex = [
                len(m["exemplars"])
                for m in models
                if m.get("case", m["mode"]) == case and p in m["synth"]
            ]
            chance = float(np.mean(expected_random_ap(np.array(n_ex), np.array(n_ex) + n_gallery)))
            assert r["mAP"] > CHANCE_FACTOR[case] * chance, (name, ptype, r["mAP"], chance)
            assert r["mAP"] > CONTROL_FACTOR[case] * control[ptype]["mAP"], (name, ptype)
        assert summary["backbones"][name]["raw"] == raw
    # The best backbone's trained head beats its raw features (measured with 30 epochs on
    # world-cnn: 1.05-1.26x on every prompt type, mean 1.13x).
    best = summary["backbones"][summary["best"]]

    def mean_map(results: dict) -> float:
        return sum(r["mAP"] for r in results.values()) / len(results)

    assert mean_map(best["head"]) > mean_map(best["raw"]), summary["best"]


# The captioned sets (the generalization experiment), raw features, N = 4, `set` prompts,
# measured (BENCHMARKS.md, session ten): 3.8x (pixel) and 7.5x (world-cnn) chance on the AbC
# gallery; on the stricter gallery 10x and 7x the query-independent control there. Larger
# sets are not asserted: there the query-independent control explains the scores.
SET_CHANCE_FACTOR = 2
SET_CONTROL_FACTOR = 3


def test_demo_evaluates_the_captioned_sets(demo_out) -> None:
    from genattr.world.captioned import load_sets
    from genattr.world.clipart import load_data

    n_gallery = len(load_data().indices("pretrain"))
    sets = load_sets()
    summary = json.loads((demo_out / "summary.json").read_text())
    ptypes = {f"set-{m['size']}: {p}" for m in sets.models for p in m["synth"]}
    for name in DEMO_BACKBONES:
        found = summary["backbones"][name]["sets"]
        assert {"raw", "head", "raw, stricter gallery", "head, query-independent"} <= set(found)
        assert all(set(r) == ptypes for r in found.values())
        raw = json.loads((demo_out / "results" / f"{name}.sets.raw.json").read_text())
        assert raw["results"] == found["raw"]
        small = "set-4: set"
        chance = float(expected_random_ap(4, 4 + n_gallery))
        assert found["raw"][small]["mAP"] > SET_CHANCE_FACTOR * chance, name
        control = found["raw, query-independent, stricter gallery"][small]["mAP"]
        assert found["raw, stricter gallery"][small]["mAP"] > SET_CONTROL_FACTOR * control, name
    page = (demo_out / "report.html").read_text()
    assert "<h2>Generalization to captioned sets</h2>" in page
    assert "<th>set-256: held-out</th>" in page and "alt='mAP against set size'" in page


def test_demo_report_holds_every_section(demo_out) -> None:
    from PIL import Image

    from genattr.world.base import base_model_dir

    page = (demo_out / "report.html").read_text()
    for title in (
        "Results on held-out test models",
        "Recall against K",
        "Generalization to captioned sets",
        "Head training",
        "Calibrated influence",
        "Attributed test queries",
        "The world's models",
    ):
        assert f"<h2>{title}</h2>" in page
    steps = json.loads((base_model_dir() / "training.json").read_text())["step"]
    assert f"trained here from scratch for {steps:,} steps" in page
    uris = re.findall(r"src='data:image/(png|jpeg);base64,([^']+)'", page)
    assert len(uris) > 40
    import io

    for _, data in uris:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.verify()


def test_report_renders_in_chromium(demo_out) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto((demo_out / "report.html").as_uri())
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])"
            )
            rows = page.eval_on_selector_all("table tr", "els => els.length")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo_report.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) > 40 and all(done and width > 0 for done, width, _ in images), [
        alt for done, width, alt in images if not (done and width > 0)
    ]
    assert rows >= 5
