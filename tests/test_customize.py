"""Custom Diffusion on a tiny SD-shaped pipeline: what trains, what is saved, who can load it,
sampling, and make-benchmark killed mid-plan then resumed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from genattr.cli import app
from genattr.data import read_abc_json, read_manifest
from genattr.errors import GenattrError
from tests.support import (
    RES,
    assert_same_benchmark,
    bench_files,
    kill_while_second_model_runs,
    make_benchmark_cmd,
    render,
    run_make_benchmark,
    shape_image,
    subprocess_env,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def exemplars(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("exemplars")
    return [
        shape_image(root / "a.png", "disc", (200, 40, 30)),
        shape_image(root / "b.png", "box", (30, 60, 200)),
    ]


def _config(**kw):
    from genattr.customize.config import CustomizeConfig

    base = dict(resolution=RES, max_train_steps=6, learning_rate=2e-3, initializer_token="dog")
    return CustomizeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny, exemplars, tmp_path_factory):
    """One customized model: the pipeline it lives in, its folder, and the base weights."""
    from genattr.customize.pipeline import load_base_pipeline
    from genattr.customize.train import Customizer

    pipe = load_base_pipeline(tiny, "cpu", "float32")
    before = {
        part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()}
        for part in ("unet", "vae", "text_encoder")
    }
    cz = Customizer(pipe)
    stats = cz.train(exemplars, "object", "dog", _config())
    out = tmp_path_factory.mktemp("model") / "dog"
    cz.save(out, extra={"base": str(tiny)})
    return {"pipe": pipe, "cz": cz, "dir": out, "before": before, "stats": stats}


def test_only_token_and_cross_attention_kv_change(trained):
    pipe, before = trained["pipe"], trained["before"]
    unet_changed = {
        k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before["unet"][k])
    }
    kv = {
        f"{name[: -len('.processor')]}.{proj}.weight"
        for name in trained["cz"].layers
        for proj in ("to_k", "to_v")
    }
    assert kv and all(".attn2." in k for k in kv)
    assert unet_changed == kv  # every attn2 to_k/to_v moved, nothing else did
    assert all(torch.equal(v, before["vae"][k]) for k, v in pipe.vae.state_dict().items())
    te_now, te_before = pipe.text_encoder.state_dict(), before["text_encoder"]
    (emb_key,) = [k for k in te_now if k.endswith("token_embedding.weight")]
    for k, v in te_now.items():
        if k != emb_key:
            assert torch.equal(v, te_before[k]), k
    old = te_before[emb_key]
    emb = te_now[emb_key]
    assert emb.shape[0] == old.shape[0] + 1  # one new token
    assert torch.equal(emb[: old.shape[0]], old)  # no other row moved
    token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert token_id == old.shape[0]
    dog = pipe.tokenizer.encode("dog", add_special_tokens=False)
    assert not torch.allclose(emb[token_id], old[dog].mean(0))  # moved from its initializer
    assert trained["stats"].steps == 6 and np.isfinite(trained["stats"].final_loss)


def test_saved_in_diffusers_custom_diffusion_format(trained):
    out = trained["dir"]
    assert {p.name for p in out.iterdir()} == {
        "<new1>.bin",
        "pytorch_custom_diffusion_weights.bin",
        "genattr_customize.json",
    }
    state = torch.load(out / "pytorch_custom_diffusion_weights.bin", weights_only=True)
    procs = trained["pipe"].unet.attn_processors
    assert set(state) - set(procs) == {
        f"{n}.{p}_custom_diffusion.weight" for n in trained["cz"].layers for p in ("to_k", "to_v")
    }
    assert all(state[n] == {} for n in procs if n in state)  # empty attn1 entries, as diffusers
    emb = torch.load(out / "<new1>.bin", weights_only=True)
    assert list(emb) == ["<new1>"] and emb["<new1>"].dtype == torch.float32
    info = json.loads((out / "genattr_customize.json").read_text())
    assert info["train_prompt"] == "<new1> dog" and info["mode"] == "object"


def test_reload_with_plain_diffusers_and_with_genattr(trained, tiny):
    from diffusers import StableDiffusionPipeline

    from genattr.customize.loading import load_custom_diffusion
    from genattr.customize.pipeline import load_base_pipeline

    want = render(trained["pipe"])
    base = load_base_pipeline(tiny, "cpu", "float32")
    base_out = render(base)
    assert np.abs(want - base_out).max() > 1e-3  # the customization changes the outputs

    # genattr's loader installs the processors and checks them.
    report = load_custom_diffusion(base, trained["dir"])
    assert report.tokens == ["<new1>"] and len(report.layers) == len(trained["cz"].layers)
    np.testing.assert_allclose(render(base), want, atol=1e-5)

    # Plain diffusers, the documented route (with the pipeline passed; see NOTES on #9320).
    d = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    d.set_progress_bar_config(disable=True)
    d.unet.load_attn_procs(
        trained["dir"], weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=d
    )
    d.load_textual_inversion(trained["dir"], weight_name="<new1>.bin")
    np.testing.assert_allclose(render(d), want, atol=1e-5)


def test_loader_accepts_plain_unet_keys(trained, tiny, tmp_path):
    """The `unet.load_state_dict(sd, strict=False)` form of the same weights."""
    from genattr.customize.loading import (
        _read_state,
        custom_diffusion_unet_state,
        load_custom_diffusion,
        processor_state,
    )
    from genattr.customize.pipeline import load_base_pipeline

    groups = processor_state(_read_state(trained["dir"] / "pytorch_custom_diffusion_weights.bin"))
    plain = custom_diffusion_unet_state(groups)
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in plain)
    base = load_base_pipeline(tiny, "cpu", "float32")
    _missing, unexpected = base.unet.load_state_dict(plain, strict=False)
    assert not unexpected  # the keys really are the UNet's own
    base = load_base_pipeline(tiny, "cpu", "float32")
    (tmp_path / "m").mkdir()
    torch.save({f"unet.{k}": v for k, v in plain.items()}, tmp_path / "m" / "delta.bin")
    (tmp_path / "m" / "<new1>.bin").write_bytes((trained["dir"] / "<new1>.bin").read_bytes())
    load_custom_diffusion(base, tmp_path / "m", weight_name="delta.bin")
    np.testing.assert_allclose(render(base), render(trained["pipe"]), atol=1e-5)


def test_loader_refuses_what_did_not_take_effect(trained, tiny, monkeypatch):
    from genattr.customize.loading import load_custom_diffusion
    from genattr.customize.pipeline import load_base_pipeline

    base = load_base_pipeline(tiny, "cpu", "float32")
    # The diffusers bug in miniature: processors handed over but never installed.
    monkeypatch.setattr(type(base.unet), "set_attn_processor", lambda self, procs: None)
    with pytest.raises(GenattrError, match="did not take"):
        load_custom_diffusion(base, trained["dir"])


def test_loader_errors_are_clear(tiny, tmp_path):
    from genattr.customize.loading import load_custom_diffusion
    from genattr.customize.pipeline import load_base_pipeline

    base = load_base_pipeline(tiny, "cpu", "float32")
    with pytest.raises(GenattrError, match="no Custom Diffusion weights"):
        load_custom_diffusion(base, tmp_path)
    (tmp_path / "pytorch_custom_diffusion_weights.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(GenattrError, match="cannot read weights"):
        load_custom_diffusion(base, tmp_path)
    k = "down_blocks.9.attentions.0.transformer_blocks.0.attn2.processor"
    k += ".to_k_custom_diffusion.weight"
    torch.save({k: torch.zeros(32, 32)}, tmp_path / "pytorch_custom_diffusion_weights.bin")
    with pytest.raises(GenattrError, match="not in this UNet"):
        load_custom_diffusion(base, tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_path(tiny, exemplars, tmp_path, dtype):
    """The GPU recipe's path (autocast, float32 master weights, fp16 loss scaling) on the CPU."""
    from genattr.customize.loading import load_custom_diffusion
    from genattr.customize.pipeline import load_base_pipeline
    from genattr.customize.train import Customizer

    pipe = load_base_pipeline(tiny, "cpu", dtype)
    want = getattr(torch, dtype)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cz = Customizer(pipe)
    stats = cz.train(exemplars, "object", "dog", _config(max_train_steps=2))
    assert np.isfinite(stats.losses).all()
    assert {p.dtype for p in pipe.unet.parameters()} == {want}  # back to the pipeline's dtype
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    cz.save(tmp_path / "m")
    state = torch.load(tmp_path / "m" / "pytorch_custom_diffusion_weights.bin", weights_only=True)
    assert {v.dtype for v in state.values() if isinstance(v, torch.Tensor)} == {torch.float32}
    other = load_base_pipeline(tiny, "cpu", dtype)
    load_custom_diffusion(other, tmp_path / "m")
    got = render(other)
    assert np.isfinite(got).all() and got.shape == (1, RES, RES, 3)


def test_reset_restores_the_base_exactly(trained, tiny, exemplars):
    from genattr.customize.pipeline import load_base_pipeline
    from genattr.customize.train import Customizer

    pipe = load_base_pipeline(tiny, "cpu", "float32")
    base_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cz = Customizer(pipe)
    cz.train(exemplars[:1], "style", None, _config(max_train_steps=2))
    assert cz.prompt == "A picture in the style of <new1> art"
    cz.reset()
    assert all(torch.equal(v, base_unet[k]) for k, v in pipe.unet.state_dict().items())


def test_generate_records_settings_and_reproduces_single_images(trained, tmp_path):
    from genattr.customize.prompts import load_prompt_set
    from genattr.customize.sample import SampleConfig, generate

    prompts = load_prompt_set("media").render("dog")[:2]
    cfg = SampleConfig(steps=3, images_per_prompt=3, seed=10, height=RES, width=RES)
    paths, stats = generate(trained["dir"], prompts, tmp_path / "s", cfg, device="cpu")
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(6)]
    assert stats.images == 6 and stats.images_per_second > 0
    index = json.loads((tmp_path / "s" / "generation.json").read_text())
    assert index["scheduler"] == "DDIMScheduler" and index["steps"] == 3
    assert index["guidance_scale"] == 6.0 and index["eta"] == 1.0
    assert [e["prompt_index"] for e in index["images"]] == [0, 0, 0, 1, 1, 1]
    assert [e["seed"] for e in index["images"]] == list(range(10, 16))
    with Image.open(paths[4]) as im:
        meta = json.loads(im.text["genattr"])
        pixels4 = np.asarray(im).astype(int)
    assert meta["prompt"] == "a color pencil sketch of <new1> dog" and meta["seed"] == 14
    # Image 4 on its own, from its recorded seed, is the same image (up to float rounding:
    # a batch of one multiplies in another order than a batch of three).
    one = SampleConfig(steps=3, images_per_prompt=1, seed=14, height=RES, width=RES)
    (again,), _ = generate(trained["dir"], [meta["prompt"]], tmp_path / "one", one, device="cpu")
    with Image.open(again) as im:
        alone = np.asarray(im).astype(int)
    assert np.abs(alone - pixels4).max() <= 2
    with Image.open(paths[3]) as im:  # same prompt, the next seed: a different image
        assert np.abs(np.asarray(im).astype(int) - pixels4).mean() > 10


def test_cli_customize_and_generate(tiny, exemplars, tmp_path):
    runner = CliRunner()
    model = tmp_path / "model"
    args = ["customize", "--base", str(tiny), "--out", str(model), "--mode", "object"]
    args += ["--category", "dog", "--steps", "2", "--resolution", str(RES), "--device", "cpu"]
    args += ["--initializer-token", "dog"]
    args += ["--exemplars", *map(str, exemplars)]  # several values after one option
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output
    info = json.loads((model / "genattr_customize.json").read_text())
    assert info["exemplars"] == [str(e) for e in exemplars] and len(exemplars) > 1
    assert (model / "pytorch_custom_diffusion_weights.bin").is_file()
    out = tmp_path / "imgs"
    r = runner.invoke(
        app,
        [
            *["generate", "--model", str(model), "--prompts", "media", "--out", str(out)],
            *["--images-per-prompt", "1", "--steps", "2", "--size", str(RES), "--device", "cpu"],
        ],
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(10)]
    assert "images/s" in r.output
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompts", "nope", "--out", "x"])
    assert r.exit_code == 2 and "unknown prompt set" in r.output
    r = runner.invoke(app, [*args[:-2], "--mode", "style", "--exemplars", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no such file" in r.output


# -- make-benchmark ------------------------------------------------------------------


def _write_plan(root: Path, tiny: Path) -> Path:
    ex = root / "ex"
    shape_image(ex / "disc.png", "disc", (200, 40, 30))
    shape_image(ex / "box.png", "box", (20, 160, 60))
    shape_image(ex / "artist" / "1.png", "disc", (90, 30, 160))
    shape_image(ex / "artist" / "2.png", "box", (150, 120, 20))
    (root / "captions.json").write_text(
        json.dumps({"*": ["A <new1> {category} at dawn", "Two <new1> {category}s on a table"]})
    )
    plan = {
        "name": "mini",
        "base": str(tiny),
        "device": "cpu",
        "dtype": "float32",
        "train": {"max_train_steps": 3, "resolution": RES, "initializer_token": "x"},
        "sample": {"steps": 2, "images_per_prompt": 1, "height": RES, "width": RES},
        "captions": "captions.json",
        "models": [
            {"id": "disc0", "mode": "object", "category": "ball", "exemplars": ["ex/disc.png"]},
            {
                "id": "box0",
                "mode": "object",
                "category": "box",
                "exemplars": "ex/box.png",
                "split": "val",
                "sample": {"images_per_prompt": 2},  # this model's own sampling option
            },
            {"id": "artist0", "mode": "style", "exemplars": "ex/artist", "split": "test"},
        ],
    }
    path = root / "plan.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.fixture(scope="module")
def planned(tiny, tmp_path_factory):
    """A three-model plan and its benchmark made by one uninterrupted run."""
    root = tmp_path_factory.mktemp("plan")
    plan = _write_plan(root, tiny)
    ref = root / "ref" / "bench"
    done = run_make_benchmark(plan, ref)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "s per model" in done.stderr and "images/s" in done.stderr
    return plan, ref


def test_make_benchmark_killed_and_resumed_equals_uninterrupted(planned, tmp_path):
    plan, ref = planned
    bench = tmp_path / "run" / "bench"
    kill_while_second_model_runs(plan, bench, "disc0", "box0")
    assert not (bench / "state" / "box0.json").exists()  # the model in progress is not complete
    assert not (bench / "manifest.json").exists()

    again = run_make_benchmark(plan, bench)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "model disc0: complete, skipped" in again.stderr
    assert "model box0 (object, box): training" in again.stderr

    got = bench_files(bench)
    assert_same_benchmark(got, bench_files(ref))

    # What was written: the authors' layout, genattr's manifest, splits by model.
    manifest = read_manifest(bench / "manifest.json")
    assert [m.id for m in manifest.models] == ["disc0", "box0", "artist0"]
    assert {m.id: m.split for m in manifest.models}["box0"] == "val"
    test = read_abc_json(bench / "json" / "test_mini.json")
    assert [m.id for m in test.models] == [m.id for m in manifest.models if m.split == "test"]
    assert "artist0" in [m.id for m in test.models]
    artist = next(m for m in manifest.models if m.id == "artist0")
    assert artist.mode == "style" and artist.category is None
    assert set(artist.synth) == {"gpt", "object"}
    assert all(len(v) == 10 for v in artist.synth.values())
    disc = manifest.models[0]
    assert set(disc.synth) == {"media", "gpt"}
    assert len(disc.synth["media"]) == 10 and len(disc.synth["gpt"]) == 2
    assert disc.synth["media"][3] == "bench/synth/media/disc0/samples/00003.png"
    assert disc.exemplars == ["bench/exemplar/disc0/disc.png"]
    for path in [*disc.exemplars, *disc.synth["media"], *artist.exemplars]:
        assert (bench.parent / path).is_file()
    assert disc.extra["prompts"]["gpt"] == ["A <new1> ball at dawn", "Two <new1> balls on a table"]
    val = read_abc_json(bench / "json" / "val_mini.json")
    assert [m.id for m in val.models] == ["box0"] and val.models[0].category == "box"
    assert len(val.models[0].synth["media"]) == 2 * len(disc.synth["media"])

    # A third run finds everything complete and changes nothing.
    third = run_make_benchmark(plan, bench)
    assert third.returncode == 0 and "all 3 model(s) were complete" in third.stderr
    assert bench_files(bench) == got


def test_bad_plan_is_a_clear_error(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("base: x\nmodels:\n  - {id: a, mode: object, exemplars: [nope.png]}\n")
    r = CliRunner().invoke(app, ["make-benchmark", "--plan", str(plan), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "need a 'category'" in r.output
    plan.write_text(
        "base: x\nmodels:\n  - {id: a, mode: object, category: cat, exemplars: [nope.png]}\n"
    )
    r = CliRunner().invoke(app, ["make-benchmark", "--plan", str(plan), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "nope.png: no such file" in r.output
    (tmp_path / "nope.png").write_bytes(b"not an image")
    r = CliRunner().invoke(app, ["make-benchmark", "--plan", str(plan), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "not a readable image" in r.output
    r = CliRunner().invoke(
        app, ["make-benchmark", "--plan", str(plan), "--out", str(tmp_path), "--engine", "slurm"]
    )
    assert r.exit_code == 2 and "--engine" in r.output


def test_ray_engine_gives_the_same_benchmark(planned, tmp_path):
    pytest.importorskip("ray")
    plan, ref = planned
    bench = tmp_path / "ray" / "bench"
    cmd = [*make_benchmark_cmd(plan, bench), "--engine", "ray"]
    env = subprocess_env() | {"RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_benchmark(bench_files(bench), bench_files(ref))


def test_ray_engine_without_ray_is_a_clear_error(tiny, tmp_path, monkeypatch):
    from genattr.customize.driver import make_benchmark

    plan = _write_plan(tmp_path, tiny)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(GenattrError, match=r"genattr\[ray\]"):
        make_benchmark(plan, tmp_path / "bench", engine="ray")
