"""Counterfactual studies end to end on the tiny SD-shaped pipeline: retraining units,
resuming, reproducibility on one machine, margins assembled in the documented layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genattr.customize.config import CustomizeConfig
from genattr.customize.sample import SampleConfig
from genattr.errors import GenattrError
from genattr.workflows.counterfactual import (
    Retrainer,
    SetCase,
    StudySpec,
    build_margins,
    study_units,
    unit_path,
)
from genattr.workflows.model_cases import ImageSet
from tests.support import RES, shape_image

SPEC = StudySpec(subsets=3, seeds=2, timesteps=2, noises_per_timestep=1)
KINDS = [("disc", (200, 40, 30)), ("box", (30, 60, 200)), ("disc", (30, 170, 60)),
         ("box", (220, 200, 40))]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> SetCase:
    root = tmp_path_factory.mktemp("set")
    paths = [shape_image(root / f"{k}.png", kind, c) for k, (kind, c) in enumerate(KINDS)]
    captions = [f"a {kind} number {k}" for k, (kind, _) in enumerate(KINDS)]
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB").resize((RES, RES))) for p in paths])
    config = CustomizeConfig(
        resolution=RES, max_train_steps=8, learning_rate=2e-3, augment=False, hflip=False
    )
    train = ImageSet(arrays, captions, [p.name for p in paths])
    queries = ImageSet(arrays[::-1].copy(), captions[::-1], ["q0", "q1", "q2", "q3"])
    sample = SampleConfig(steps=2, images_per_prompt=1, height=RES, width=RES)
    return SetCase("set0", paths, train, queries, config, sample=sample, query_seeds=[0, 1, 2, 3])


def test_units_are_the_full_set_and_the_subsets_for_every_seed(case):
    units = study_units(case, SPEC)
    assert len(units) == SPEC.seeds * (SPEC.subsets + 1)
    assert all(units[0].keep) and units[0].seed == 0 and units[4].seed == 1
    assert [u.keep for u in units[:4]] == [u.keep for u in units[4:]]
    assert all(sum(u.keep) == 2 for u in units[1:4])
    assert len({u.key for u in units}) == len(units)


@pytest.mark.slow
def test_study_runs_resumes_and_reproduces(tiny, case, tmp_path):
    work = tmp_path / "study"
    got = build_margins([case], base=tiny, work=work, spec=SPEC, progress=False)
    m = got["set0"]
    assert m["masks"].shape == (3, 4) and m["margins"].shape == (2, 4, 3)
    assert m["full"].shape == (2, 4) and np.isfinite(m["margins"]).all()
    assert (m["margins"] < 0).all()  # minus a loss
    saved = np.load(work / "set0" / "margins.npz")
    np.testing.assert_array_equal(saved["margins"], m["margins"])
    header = json.loads((work / "study.json").read_text())
    assert header["spec"]["subsets"] == 3 and header["cases"][0]["images"] == 4
    # Seeds and subsets change the outcome; the measurement is not constant.
    assert not np.allclose(m["margins"][0], m["margins"][1])
    assert np.ptp(m["margins"][0], axis=1).max() > 0

    # Resumed: nothing retrained, a lost unit rebuilt with the same bytes (one machine).
    units = study_units(case, SPEC)
    lost = unit_path(work, case, units[2])
    before = np.load(lost)
    lost.unlink()
    again = build_margins([case], base=tiny, work=work, spec=SPEC, progress=False)
    np.testing.assert_array_equal(np.load(lost), before)
    np.testing.assert_array_equal(again["set0"]["margins"], m["margins"])

    # The full-set unit with seed 0 is the recipe's own model, trained as make-benchmark does.
    retrainer = Retrainer(tiny)
    retrainer.train(case, units[0])
    np.testing.assert_array_equal(retrainer.margins(case, SPEC), m["full"][0])

    with pytest.raises(GenattrError, match="other settings"):
        build_margins([case], base=tiny, work=work, spec=SPEC.model_copy(update={"seeds": 3}))


@pytest.mark.slow
def test_shards_split_the_units(tiny, case, tmp_path):
    work = tmp_path / "study"
    first = build_margins([case], base=tiny, work=work, spec=SPEC, shard=(0, 2), progress=False)
    assert first == {}  # half the units: nothing to assemble yet
    done = sorted(p.name for p in (work / "set0" / "units").iterdir())
    assert len(done) == 4
    second = build_margins([case], base=tiny, work=work, spec=SPEC, shard=(1, 2), progress=False)
    assert set(second) == {"set0"}


@pytest.mark.slow
def test_ray_engine_gives_the_margins_of_the_local_run(tiny, case, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from genattr.workflows.counterfactual import Engine

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    local = build_margins([case], base=tiny, work=tmp_path / "local", spec=SPEC, progress=False)
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False)
    try:
        on_ray = build_margins(
            [case], base=tiny, work=tmp_path / "ray", spec=SPEC, progress=False,
            **Engine(name="ray", workers=2).options(),
        )  # fmt: skip
    finally:
        ray.shutdown()
    np.testing.assert_allclose(on_ray["set0"]["margins"], local["set0"]["margins"], rtol=1e-5)
    np.testing.assert_array_equal(on_ray["set0"]["masks"], local["set0"]["masks"])


@pytest.mark.slow
def test_study_scores_methods_by_lds_and_leave_k_out(tiny, case, tmp_path):
    """The whole study on the tiny pipeline: every method's scores saved with the controls
    and random, LDS against scipy on the saved margins, leave-K-out units that remove each
    method's top images, and the results file."""
    from genattr.workflows.counterfactual_scores import run_study, slug
    from genattr.workflows.model_methods import FeatureMethod, make_method

    stats = pytest.importorskip("scipy.stats")
    work = tmp_path / "study"
    methods = {"pixel": FeatureMethod(backbone="pixel"), "gradient (loss)": make_method("gradient")}
    results = run_study(
        [case], base=tiny, work=work, spec=SPEC, methods=methods, leave_k_out_queries=1,
        progress=False,
    )  # fmt: skip
    assert results is not None
    assert json.loads((work / "results.json").read_text()) == json.loads(json.dumps(results))
    rows = results["lds"]["methods"]
    assert {"pixel", "gradient (loss)", "random", "control: smallest gradient"} <= set(rows)
    margins = np.load(work / "set0" / "margins.npz")
    scores = np.load(work / "set0" / "scores" / f"{slug('gradient (loss)')}.npy")
    assert scores.shape == (4, 4)
    pred = scores @ margins["masks"].T.astype(float)
    target = margins["margins"].mean(0)
    want = np.nanmean([stats.spearmanr(p, t).statistic for p, t in zip(pred, target, strict=True)])
    assert rows["gradient (loss)"]["lds"]["mean"] == pytest.approx(want, nan_ok=True)
    assert results["lds"]["ceiling"]["n"] == 4

    loo = results["leave_k_out"]
    controls = {x: r["lds"]["mean"] for x, r in rows.items() if x.startswith("control: ")}
    assert loo["control"] == max(controls, key=lambda x: controls[x])  # the strongest one
    assert set(loo["methods"]) == {"pixel", "gradient (loss)", "random", loo["control"]}
    pixel = loo["methods"]["pixel"]
    assert set(pixel) == {"0.25", "0.5"}  # K = 1 and 2 of 4 (1/8 rounds up to 1)
    assert pixel["0.25"]["rise"]["n"] == 1
    assert {"rise", "pixel_change", "cnn_change"} <= set(pixel["0.5"])
    assert set(pixel["0.5"]["minus_control"]) == {"rise", "pixel_change", "cnn_change"}
    # one unit per (kept images, query): the full model's and each removal's, regenerated
    units = sorted((work / "set0" / "leave-k-out").glob("*-q0.npz"))
    full = np.load(next(p for p in units if p.name.startswith("f0-r0")))
    assert full["image"].shape == (RES, RES, 3) and full["image"].dtype == np.uint8
    removed = loo["methods"]["random"]["0.5"]
    assert removed["pixel_change"]["mean"] > 0  # half the set gone: the image moves


@pytest.mark.slow
def test_cli_runs_a_study_on_a_make_benchmark_folder(tiny, tmp_path):
    """`genattr counterfactual --bench` on a captioned make-benchmark folder of the tiny
    pipeline: margins, scores and results.json; bad options are one-line errors."""
    from typer.testing import CliRunner

    from genattr.cli import app
    from genattr.customize.driver import make_benchmark

    root = tmp_path / "plan"
    for k, (kind, c) in enumerate(KINDS):
        shape_image(root / "set0" / f"img{k}.png", kind, c)
    plan = {
        "base": str(tiny), "device": "cpu", "dtype": "float32",
        "train": {"max_train_steps": 4, "resolution": RES, "augment": False},
        "sample": {"steps": 2, "images_per_prompt": 1, "height": RES, "width": RES},
        "models": [{
            "id": "set0", "mode": "captioned", "exemplars": "set0", "split": "test",
            "image_captions": [f"a {kind} number {k}" for k, (kind, _) in enumerate(KINDS)],
            "prompts": {"set": ["a disc number 0", "a box number 1"]},
        }],
    }  # fmt: skip
    (root / "plan.json").write_text(json.dumps(plan))
    make_benchmark(root / "plan.json", tmp_path / "bench")
    manifest = tmp_path / "bench" / "manifest.json"
    args = ["counterfactual", "--bench", str(manifest), "--out", str(tmp_path / "study"),
            "--subsets", "2", "--seeds", "2", "--timesteps", "1", "--noises", "1",
            "--methods", "pixel,gradient-loss", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "seed ceiling" in res.output and "gradient (loss)" in res.output
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert set(results["lds"]["methods"]) >= {"pixel", "gradient (loss)", "random"}
    assert np.load(tmp_path / "study" / "set0" / "margins.npz")["margins"].shape == (2, 2, 2)
    # the retrained full model regenerates each query from its recorded seed
    from genattr.workflows.counterfactual import Unit, bench_set_cases

    _, (bench_case,) = bench_set_cases(manifest)
    assert bench_case.query_seeds == [0, 1]
    retrainer = Retrainer(tiny)
    retrainer.train(bench_case, Unit((True,) * 4, 0))
    again = retrainer.regenerate(bench_case, 1).astype(float)
    query = bench_case.queries.images[1].astype(float)
    assert np.abs(again - query).mean() < 0.5  # grey levels: the same image
    bench_case.query_seeds = [0, 7]
    assert np.abs(retrainer.regenerate(bench_case, 1) - query).mean() > 2.0  # other noise
    # new queries: any prompt and seed with the same sampler (seed 1 is query 1 again)
    more = retrainer.sample(bench_case, [bench_case.queries.prompts[1]] * 2, [1, 7])
    assert more.shape == (2, *query.shape) and more.dtype == np.uint8
    assert np.abs(more[0] - query).mean() < 0.5 and np.abs(more[1] - query).mean() > 2.0
    res = CliRunner().invoke(app, [*args, "--write-teacher", "gradient-loss"])  # resumed
    assert res.exit_code == 0 and "teacher:" in res.output, res.output
    from genattr.heads.distill import read_teacher

    teacher = read_teacher(tmp_path / "study" / "teachers" / "gradient-loss.npz")
    assert teacher.scores.shape == (2, 4) and teacher.method == "gradient-loss"
    assert all(Path(p).is_file() for p in [*teacher.query_paths, *teacher.candidate_paths])
    for bad, message in (
        (["--write-teacher", "trak-loss"], "no scores"),
        (["--methods", "nope"], "unknown method"),
        (["--shard", "2/2"], "--shard"),
        (["--subsets", "1"], "study options"),
        (["--world-sets", "16"], "one of --world-sets"),
        (["--engine", "slurm"], "--engine"),
        (["--workers", "0"], "--workers"),
        (["--device", "tpu"], "--device"),
    ):
        res = CliRunner().invoke(app, [*args, *bad])
        assert res.exit_code == 2 and message in res.output, (bad, res.output)


def test_image_changes_measure_how_far_a_regeneration_moved():
    from genattr.workflows.counterfactual_scores import image_changes

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
    shifted = reference + np.uint8(51)  # every value up by 0.2
    other = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    got = image_changes(np.stack([reference] * 3), np.stack([reference, shifted, other]))
    np.testing.assert_allclose(got["pixel"][:2], [0.0, 0.2], atol=1e-12)
    assert abs(got["world-cnn"][0]) < 1e-5
    assert got["world-cnn"][2] > got["world-cnn"][0] + 0.01


def test_scores_are_added_method_by_method_and_on_chosen_queries(case, tmp_path):
    """Methods that read no model are scored without one; a method added later is scored
    alone; `rows` scores a slow method on some queries (NaN elsewhere), and LDS and the
    exemplar AP leave those queries out."""
    from genattr.counterfactual import exemplar_ap, lds
    from genattr.workflows.counterfactual_scores import load_scores, score_cases
    from genattr.workflows.model_methods import FeatureMethod

    work = tmp_path / "study"
    first = score_cases(
        [case], base="no model is loaded", work=work,
        methods={"pixel": FeatureMethod(backbone="pixel")}, progress=False,
    )  # fmt: skip
    assert first == ["pixel", "random"]
    before = load_scores(work, case, first)
    labels = score_cases(
        [case], base="no model is loaded", work=work, rows=[1, 2], progress=False,
        methods={"pixel": FeatureMethod(backbone="world-cnn"), "cnn": FeatureMethod()},
    )  # fmt: skip
    assert labels == ["pixel", "random", "cnn"]
    got = load_scores(work, case, labels)
    np.testing.assert_array_equal(got["pixel"], before["pixel"])  # kept, not rescored
    assert np.isnan(got["cnn"][[0, 3]]).all() and np.isfinite(got["cnn"][[1, 2]]).all()
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    per_query = lds(got["cnn"], masks, np.random.default_rng(0).normal(size=(4, 3)))
    assert np.isnan(per_query[[0, 3]]).all() and np.isfinite(per_query[[1, 2]]).all()
    ap = exemplar_ap(got["cnn"], np.eye(4, dtype=bool))
    assert np.isnan(ap[[0, 3]]).all() and np.isfinite(ap[[1, 2]]).all()


def test_a_study_teacher_pools_every_model_with_nan_off_its_own_images(case, tmp_path):
    """One teacher over two models: each query scored on its own model's images only (NaN
    on the other's), slow-method rows not scored left out, the margins read as
    `margin_contrast`; the query images written where the file says."""
    import dataclasses

    from genattr.counterfactual import margin_contrast
    from genattr.heads.distill import read_teacher
    from genattr.workflows.counterfactual_scores import save_scores
    from genattr.workflows.teachers import write_study_teacher

    other = dataclasses.replace(case, id="set1")
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    second[1] = np.nan  # a slow method left this query out
    save_scores(tmp_path, case, {"slow": first})
    save_scores(tmp_path, other, {"slow": second})
    teacher = read_teacher(write_study_teacher(tmp_path, [case, other], "slow"))
    assert teacher.scores.shape == (7, 8)
    np.testing.assert_allclose(teacher.scores[:4, :4], first, rtol=1e-6)
    np.testing.assert_allclose(teacher.scores[4:, 4:], second[[0, 2, 3]], rtol=1e-6)
    assert np.isnan(teacher.scores[:4, 4:]).all() and np.isnan(teacher.scores[4:, :4]).all()
    assert teacher.query_paths[4:] == [
        str(tmp_path / "set1" / "queries" / f"{r:05d}.png") for r in (0, 2, 3)
    ]
    saved = np.asarray(Image.open(teacher.query_paths[5]).convert("RGB"))
    np.testing.assert_array_equal(saved, case.queries.images[2])
    with pytest.raises(GenattrError, match="no margins"):
        write_study_teacher(tmp_path, [case], "margins")
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    margins = rng.normal(size=(2, 4, 3))
    np.savez(tmp_path / "set0" / "margins.npz", masks=masks, margins=margins)
    teacher = read_teacher(write_study_teacher(tmp_path, [case], "margins"))
    want = margin_contrast(masks, margins.mean(axis=0))
    np.testing.assert_allclose(teacher.scores, want, rtol=1e-5)
