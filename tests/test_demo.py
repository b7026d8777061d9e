"""`genattr demo` on the shipped miniature world, end to end through the CLI (every backbone,
few epochs, to keep CI short): the report exists, its numbers are the ones written to
results files, customized samples are attributed far above chance in every feature space, a
trained head beats its raw backbone, the attributed test queries are a seeded draw whose
stated exemplar ranks, influence and hit rate are those of the scores, and headless Chromium
renders every table and image of the report (skipped where Chromium/Playwright are
missing)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from genattr.cli import app
from genattr.data.benchmark import BenchmarkManifest, CustomizedModel
from genattr.evaluate import expected_random_ap
from genattr.report.demo_report import kept_epoch, training_figure
from genattr.workflows.demo import DEMO_BACKBONES
from genattr.workflows.demo_queries import CASES, QUERY_SEED, draw_queries

slow = pytest.mark.slow  # the demo itself; the draw and the plot are checked in milliseconds
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


@slow
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


@slow
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


@slow
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
        "Counterfactual ground truth: which method predicts retraining",
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


@slow
def test_demo_recomputes_the_packed_counterfactual_study(demo_out) -> None:
    """The world's packed study (margins and scores): LDS recomputed in the demo, the same
    as a direct computation, every method with its controls, and the ceiling above them."""
    from genattr.counterfactual import lds
    from genattr.workflows.counterfactual_scores import load_packed_outcomes
    from genattr.world.captioned import COUNTERFACTUAL_PACK
    from genattr.world.clipart import DEFAULT_DATA_DIR

    study = json.loads((demo_out / "summary.json").read_text())["counterfactual"]
    outcomes, meta = load_packed_outcomes(DEFAULT_DATA_DIR / COUNTERFACTUAL_PACK)
    assert study["models"] == [o.id for o in outcomes] and len(outcomes) >= 6
    rows = study["lds"]["methods"]
    assert {"world-cnn", "random", "control: self-influence"} <= set(rows)
    direct = np.concatenate(
        [lds(o.scores["world-cnn"], o.masks, o.margins.mean(0)) for o in outcomes]
    )
    assert rows["world-cnn"]["lds"]["mean"] == pytest.approx(float(np.nanmean(direct)))
    assert study["lds"]["ceiling"]["mean"] > max(r["lds"]["mean"] for r in rows.values())
    assert study["leave_k_out"] == meta["leave_k_out"]


@slow
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


def _manifest(models_per_case: int = 5, per_type: int = 4) -> BenchmarkManifest:
    """Test models of every case, two prompt types each, with made-up sample paths."""
    return BenchmarkManifest(
        "made-up",
        [
            CustomizedModel(
                f"{case}-{i}",
                [f"ex/{case}-{i}.png"],
                {t: [f"synth/{case}-{i}-{t}-{j}.png" for j in range(per_type)] for t in "ab"},
                mode="style" if case == "style" else "object",
                extra={"case": case},
            )
            for case in CASES
            for i in range(models_per_case)
        ],
    )


def test_draw_queries_is_a_seeded_draw_in_turn_from_each_test_case() -> None:
    test = _manifest()
    paths = [p for _, _, p in draw_queries(test, 6)]
    assert paths == [p for _, _, p in draw_queries(test, 6, QUERY_SEED)]
    assert paths != [p for _, _, p in draw_queries(test, 6, QUERY_SEED + 1)]
    # not the first sample of the first models, as the report once showed
    assert paths != [f"synth/{case}-{i}-a-0.png" for i in range(2) for case in CASES]
    drawn = draw_queries(test, 6)
    assert [m.extra["case"] for m, _, _ in drawn] == [*CASES, *CASES]
    assert all(path in m.synth[ptype] for m, ptype, path in drawn)
    assert len(set(paths)) == 6
    # every model of a case once before any twice
    assert len({m.id for m, _, _ in draw_queries(test, 15)}) == 15
    # a draw larger than the test set takes every sample once
    everything = draw_queries(test, 10_000)
    assert len(everything) == 3 * 5 * 2 * 4 == len({p for _, _, p in everything})


def test_training_plot_dots_sit_on_their_curves_and_are_named() -> None:
    import matplotlib.pyplot as plt

    def history(vals):  # epoch -1 is the untrained heads
        return [{"epoch": e - 1, "loss": 1.0 / (e + 1), "val_mAP": v} for e, v in enumerate(vals)]

    outcomes = {
        "a": SimpleNamespace(
            history=history([0.1, 0.2, 0.3, 0.25]), best_epoch=1, val_gallery="stricter gallery"
        ),
        "b": SimpleNamespace(
            history=history([0.4, 0.3, 0.2]), best_epoch=-1, val_gallery="stricter gallery"
        ),
    }
    fig = training_figure(outcomes)
    try:
        ax = fig.axes[1]
        for line, dots, o in zip(ax.get_lines(), ax.collections, outcomes.values(), strict=True):
            kept = kept_epoch(o.history, o.best_epoch)
            assert kept["val_mAP"] == max(h["val_mAP"] for h in o.history)
            (x, y), curve = dots.get_offsets()[0], dict(zip(*line.get_data(), strict=True))
            assert (x, y) == (o.best_epoch, kept["val_mAP"]) and curve[x] == y  # on its curve
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["a", "b", "epoch kept (best val mAP)"]
        assert "stricter gallery" in ax.get_ylabel()
    finally:
        plt.close(fig)


@slow
def test_demo_plots_the_epoch_each_head_kept(demo_out) -> None:
    for name in DEMO_BACKBONES:
        head = json.loads((demo_out / "heads" / name / "head.json").read_text())
        kept = kept_epoch(head["history"], head["best_epoch"])
        assert kept is not None and kept["val_mAP"] == max(h["val_mAP"] for h in head["history"])
    assert "the epoch with the best val mAP (dot) is kept" in (demo_out / "report.html").read_text()


@slow
def test_demo_shows_a_seeded_draw_of_test_queries(demo_out) -> None:
    from genattr.data.benchmark import read_manifest

    shown = json.loads((demo_out / "summary.json").read_text())["attributed_queries"]
    assert shown["seed"] == QUERY_SEED and shown["top_k"] == 10
    test = read_manifest(demo_out / "world" / "manifest.json").split("test")
    drawn = draw_queries(test, len(shown["queries"]))
    assert [(q["model"], q["prompt_type"], q["query"]) for q in shown["queries"]] == [
        (m.id, ptype, path) for m, ptype, path in drawn
    ]
    assert {q["case"] for q in shown["queries"]} == set(CASES)


@slow
def test_demo_states_where_each_true_exemplar_ranked(demo_out) -> None:
    """Each shown query's true exemplars: their stated rank is the rank of their score among
    the whole gallery's, their influence the calibrator's, and the hit rate (per test case and
    in all) the fraction of those ranks within the top 10; each query's Recall@10 on the
    stricter gallery, the evaluation's, agrees with those ranks (the same gallery)."""
    import pyarrow.parquet as pq
    import torch

    from genattr.attribution import Attributor

    summary = json.loads((demo_out / "summary.json").read_text())
    shown, best = summary["attributed_queries"], summary["best"]
    attributor = Attributor.load(demo_out / "index", demo_out / "calibrators" / f"{best}.json")
    index = attributor.index
    row = {os.path.normpath(p): i for i, p in enumerate(index.metadata()[1])}
    assert shown["gallery_size"] == index.count == len(row)
    queries = shown["queries"]
    vectors = attributor.embed([q["query"] for q in queries])
    scores = (torch.from_numpy(vectors) @ torch.from_numpy(index.exact_vectors).T).numpy()
    per_query = pq.read_table(
        demo_out / "results" / f"{best}.head.stricter-gallery.queries.parquet"
    ).to_pylist()
    evaluated = {os.path.normpath(r["query_path"]): r for r in per_query}
    hits: dict[str, list[bool]] = {}
    for q, s in zip(queries, scores, strict=True):
        p = attributor.calibrator.probabilities(s)  # elementwise but for the row's max
        ranks = []
        for ex in q["exemplars"]:
            own = s[row[os.path.normpath(ex["path"])]]
            above, tied = int((s > own).sum()), int((s == own).sum())
            assert above + 1 <= ex["rank"] <= above + tied, (q["query"], ex)
            assert ex["influence"] == pytest.approx(p[row[os.path.normpath(ex["path"])]], abs=1e-12)
            ranks.append(above + 1)
        assert q["rank"] == min(ex["rank"] for ex in q["exemplars"]) == min(ranks)
        assert q["influence"] == min(q["exemplars"], key=lambda e: e["rank"])["influence"]
        assert q["hit"] == (min(ranks) <= 10)
        hits.setdefault(q["case"], []).append(min(ranks) <= 10)
        recall = evaluated[os.path.normpath(q["query"])]["recall@10"]
        assert recall == pytest.approx(np.mean([r <= 10 for r in ranks])), q["query"]
    for case, found in hits.items():
        stated = shown["cases"][case]
        assert (stated["shown"], stated["hits"]) == (len(found), sum(found))
        assert stated["hit_rate"] == pytest.approx(np.mean(found))
        rows = [r for r in per_query if r["prompt_type"].split(": ")[0] == case]
        assert stated["all_hit_rate_stricter"] == pytest.approx(
            np.mean([r["recall@10"] > 0 for r in rows])
        )
        assert stated["recall_stricter"] == pytest.approx(np.mean([r["recall@10"] for r in rows]))
    every = [h for found in hits.values() for h in found]
    assert shown["all"]["hits"] == sum(every)
    assert shown["all"]["hit_rate"] == pytest.approx(np.mean(every))
    # the page says it: each query's rank and influence, the hit rate beside R@10
    page = (demo_out / "report.html").read_text()
    for q in queries:
        assert f"rank <b>{q['rank']}</b> of {index.count:,}, influence <b>" in page
    n, tot = len(queries), shown["all"]
    assert f"in their top 10: <b>{sum(every)} of {n} ({np.mean(every):.2f})</b>" in page
    assert f"R@10 {tot['recall']:.3f} (AbC protocol)" in page
