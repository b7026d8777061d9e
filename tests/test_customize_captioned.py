"""Customization on a captioned set (each image with its own caption, no modifier token), as
the paper's generalization experiment tunes models on random captioned images: training,
the trainable layers (`freeze_model`), the saved format, plans and make-benchmark with resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from genattr.cli import app
from genattr.data import read_manifest
from genattr.errors import GenattrError
from tests.support import (
    RES,
    assert_same_benchmark,
    bench_files,
    kill_while_second_model_runs,
    render,
    run_make_benchmark,
    shape_image,
)

pytestmark = pytest.mark.slow

CAPTIONS = ["a red disc on grey", "a blue box on grey", "a green disc on grey"]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("set")
    return [
        shape_image(root / "0.png", "disc", (200, 40, 30)),
        shape_image(root / "1.png", "box", (30, 60, 200)),
        shape_image(root / "2.png", "disc", (30, 170, 60)),
    ]


def _config(**kw):
    from genattr.customize.config import CustomizeConfig

    base = dict(resolution=RES, max_train_steps=6, learning_rate=2e-3, augment=False, hflip=False)
    return CustomizeConfig(**{**base, **kw})


def _train(tiny: Path, images: list[Path], **kw):
    from genattr.customize.pipeline import load_base_pipeline
    from genattr.customize.train import Customizer

    pipe = load_base_pipeline(tiny, "cpu", "float32")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    n_tokens = len(pipe.tokenizer)
    cz = Customizer(pipe)
    stats = cz.train(images, "captioned", None, _config(**kw), captions=CAPTIONS)
    return cz, before, n_tokens, stats


def _changed(pipe, before) -> set[str]:
    return {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])}


def test_each_image_is_trained_with_its_own_caption(tiny, images, monkeypatch):
    from genattr.customize import loop
    from genattr.customize.examples import read_square

    seen: list[tuple[np.ndarray, str]] = []
    real_next = loop.Batches.next

    def spy(self):
        batch = real_next(self)
        seen.extend(zip(batch.pix, batch.prompts, strict=True))
        return batch

    monkeypatch.setattr(loop.Batches, "next", spy)
    cz, _before, n_tokens, stats = _train(tiny, images)
    assert len(cz.pipe.tokenizer) == n_tokens and cz.token is None  # no modifier token
    assert stats.steps == 6 and np.isfinite(stats.losses).all()
    # Without augmentation an example is its image, exactly: its prompt must be its caption.
    plain = [read_square(p, RES) for p in images]
    assert len(seen) == 12
    for pix, prompt in seen:
        (i,) = [
            k for k, im in enumerate(plain) if np.allclose(pix, im.astype(np.float32) / 127.5 - 1)
        ]
        assert prompt == CAPTIONS[i]
    assert {p for _, p in seen} == set(CAPTIONS)  # every image drawn in 12 draws of 3


@pytest.mark.parametrize(
    ("freeze_model", "projections"),
    [
        ("crossattn_kv", {"to_k.weight", "to_v.weight"}),
        (
            "crossattn",
            {"to_k.weight", "to_v.weight", "to_q.weight"} | {"to_out.0.weight", "to_out.0.bias"},
        ),
    ],
)
def test_trained_layers_saved_reloaded_and_reset(tiny, images, tmp_path, freeze_model, projections):
    from genattr.customize.loading import load_custom_diffusion
    from genattr.customize.pipeline import load_base_pipeline

    cz, before, _n, _stats = _train(tiny, images, freeze_model=freeze_model)
    want = {f"{name[: -len('.processor')]}.{p}" for name in cz.layers for p in projections}
    assert _changed(cz.pipe, before) == want  # exactly these, in every attn2, nothing else

    out = cz.save(tmp_path / "m", extra={"base": str(tiny)})
    assert {p.name for p in out.iterdir()} == {
        "pytorch_custom_diffusion_weights.bin",
        "genattr_customize.json",
    }  # no token embedding file
    info = json.loads((out / "genattr_customize.json").read_text())
    assert info["mode"] == "captioned" and info["captions"] == CAPTIONS
    assert info["modifier_tokens"] == [] and info["train_prompt"] is None
    assert info["config"].get("freeze_model", "crossattn_kv") == freeze_model

    prompt = CAPTIONS[0]
    trained = render(cz.pipe, prompt)
    other = load_base_pipeline(tiny, "cpu", "float32")
    base_render = render(other, prompt)
    report = load_custom_diffusion(other, out)
    assert report.tokens == []
    np.testing.assert_allclose(render(other, prompt), trained, atol=1e-5)
    assert np.abs(trained - base_render).max() > 1e-3  # the tuning changed the outputs

    cz.reset()
    assert not _changed(cz.pipe, before)  # every trained projection back to the base, bitwise


def test_object_models_keep_their_records(tiny, images, tmp_path):
    """The new option stays out of records at its default: models made before it keep their
    bytes (test_customize_multiconcept pins the weights) and their plan keys."""
    from genattr.customize.config import CustomizeConfig

    assert "freeze_model" not in CustomizeConfig().record()
    assert CustomizeConfig(freeze_model="crossattn").record()["freeze_model"] == "crossattn"


def test_captions_are_checked(tiny, images, tmp_path):
    from genattr.customize.prompts import read_image_captions
    from genattr.customize.train import customize

    with pytest.raises(GenattrError, match="3 images, 2 captions"):
        customize(tiny, images, "captioned", tmp_path / "m", captions=CAPTIONS[:2])
    with pytest.raises(GenattrError, match="3 images, 0 captions"):
        customize(tiny, images, "captioned", tmp_path / "m")
    (tmp_path / "caps.json").write_text(json.dumps({"0.png": "x", "1.png": "y"}))
    with pytest.raises(GenattrError, match=r"no caption for 2\.png"):
        read_image_captions(tmp_path / "caps.json", images)
    (tmp_path / "caps.json").write_text(json.dumps({f"{i}.png": c for i, c in enumerate("abc")}))
    assert read_image_captions(tmp_path / "caps.json", images[::-1]) == ["c", "b", "a"]
    (tmp_path / "caps.txt").write_text("one\n\ntwo\nthree\n")
    assert read_image_captions(tmp_path / "caps.txt", images) == ["one", "two", "three"]
    with pytest.raises(GenattrError, match="non-empty strings"):
        read_image_captions(["a", "", "c"], images)


def test_cli_customize_captioned(tiny, images, tmp_path):
    runner = CliRunner()
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS))
    args = ["customize", "--base", str(tiny), "--mode", "captioned", "--steps", "2"]
    args += ["--resolution", str(RES), "--device", "cpu", "--freeze-model", "crossattn"]
    r = runner.invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "m"),
            "--captions",
            str(caps),
            "--exemplars",
            *map(str, images),
        ],
    )
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "m" / "genattr_customize.json").read_text())
    assert info["captions"] == CAPTIONS and info["config"]["freeze_model"] == "crossattn"
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "n"), "--exemplars", str(images[0])])
    assert r.exit_code == 2 and "--captions goes with --mode captioned" in r.output
    bad = runner.invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "k"),
            "--freeze-model",
            "all",
            "--captions",
            str(caps),
            "--exemplars",
            *map(str, images),
        ],
    )
    assert bad.exit_code == 2 and "freeze_model" in bad.output


# -- plans and make-benchmark ------------------------------------------------------------


def _write_plan(root: Path, tiny: Path) -> Path:
    for s in range(2):
        for i, (kind, color) in enumerate(
            [("disc", (200, 40, 30)), ("box", (30, 60, 200)), ("disc", (30, 170, 60))]
        ):
            shape_image(root / f"set{s}" / f"img{i}.png", kind, color if s == 0 else color[::-1])
    (root / "set0.json").write_text(json.dumps({f"img{i}.png": c for i, c in enumerate(CAPTIONS)}))
    (root / "heldout.txt").write_text("a purple box on grey\na yellow disc on grey\n")
    plan = {
        "name": "sets",
        "base": str(tiny),
        "device": "cpu",
        "dtype": "float32",
        "train": {"max_train_steps": 3, "resolution": RES},
        "sample": {"steps": 2, "images_per_prompt": 1, "height": RES, "width": RES},
        "models": [
            {
                "id": "set0",
                "mode": "captioned",
                "exemplars": "set0",
                "image_captions": "set0.json",
                "heldout_captions": "heldout.txt",
                "split": "test",
            },
            {
                "id": "set1",
                "mode": "captioned",
                "exemplars": "set1",
                "image_captions": ["one disc", "one box", "another disc"],
                "prompts": {"set": ["one box"], "novel": ["two discs", "a box and a disc"]},
                "train": {"freeze_model": "crossattn"},
                "split": "train",
            },
        ],
    }
    path = root / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_plan_reads_captioned_sets(tiny, tmp_path):
    from genattr.customize.plan import read_plan

    plan = read_plan(_write_plan(tmp_path, tiny))
    set0, set1 = plan.models
    assert set0.mode == "captioned" and set0.captions == CAPTIONS
    assert set0.prompts == {
        "set": CAPTIONS,
        "held-out": ["a purple box on grey", "a yellow disc on grey"],
    }
    assert set1.prompts == {"set": ["one box"], "novel": ["two discs", "a box and a disc"]}
    assert set1.train.freeze_model == "crossattn"
    # The captions are part of the model's key: another caption is another model.
    other = read_plan(_write_plan(tmp_path, tiny))
    other.models[0].captions = [*CAPTIONS[:2], "a green ball"]
    assert other.models[0].key(plan.base, plan.sample) != set0.key(plan.base, plan.sample)

    data = json.loads((tmp_path / "plan.json").read_text())
    for change, message in [
        ({"image_captions": None}, "needs 'image_captions'"),
        ({"image_captions": ["a", "b"]}, "2 captions for 3 images"),
        ({"heldout_captions": "nope.txt"}, "no such file"),
        ({"prompts": {"set": []}}, "non-empty list"),
        ({"mode": "object", "category": "disc"}, "for captioned sets only"),
        ({"mode": "painting"}, "mode must be one of object, style, captioned"),
    ]:
        bad = json.loads(json.dumps(data))
        bad["models"][0].update(change)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(GenattrError, match=message):
            read_plan(tmp_path / "bad.json")


def test_make_benchmark_with_captioned_sets_resumes(tiny, tmp_path):
    """Killed while the second set trains, resumed: the same benchmark byte for byte as one
    uninterrupted run (bar measured times)."""
    plan = _write_plan(tmp_path, tiny)
    ref = tmp_path / "ref" / "bench"
    done = run_make_benchmark(plan, ref)
    assert done.returncode == 0, done.stderr[-2000:]

    bench = tmp_path / "run" / "bench"
    kill_while_second_model_runs(plan, bench, "set0", "set1")
    assert not (bench / "state" / "set1.json").exists()
    again = run_make_benchmark(plan, bench)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "model set0: complete, skipped" in again.stderr
    assert_same_benchmark(bench_files(bench), bench_files(ref))

    manifest = read_manifest(bench / "manifest.json")
    set0, set1 = manifest.models
    assert set0.mode == set1.mode == "captioned" and set0.category is None
    assert set0.extra["captions"] == CAPTIONS and set0.extra["train_prompt"] is None
    assert {k: len(v) for k, v in set0.synth.items()} == {"set": 3, "held-out": 2}
    assert {k: len(v) for k, v in set1.synth.items()} == {"set": 1, "novel": 2}
    assert len(set0.exemplars) == 3 and all((bench.parent / p).is_file() for p in set0.exemplars)
    meta = json.loads(
        (bench / "synth" / "held-out" / "set0" / "samples" / "generation.json").read_text()
    )
    assert "a purple box on grey" in json.dumps(meta)  # sampled with the held-out captions
    info = json.loads((bench / "models" / "set1" / "genattr_customize.json").read_text())
    assert info["config"]["freeze_model"] == "crossattn"

    # Model-based methods read the folder: each exemplar with the caption it was trained with.
    from genattr.workflows.model_cases import manifest_cases

    case = manifest_cases(bench / "manifest.json", models=["set0"])[0]
    (concept,) = case.concepts
    assert concept.exemplars.prompts == CAPTIONS
    assert concept.queries["held-out"].prompts == ["a purple box on grey", "a yellow disc on grey"]
