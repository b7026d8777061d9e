"""The world's base model: training that survives SIGKILL and resumes to the same state, the
identity VAE, and the saved pipeline customized by genattr.customize and sampled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.world.base import BaseConfig
from genattr.world.training import BaseTrainer, list_checkpoints
from tests.support import WORLD_TINY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = np.full((12, 16, 16, 3), 255, np.uint8)
    captions = []
    for i in range(12):
        color = rng.integers(0, 200, 3)
        if i % 2:
            images[i, 4:12, 4:12] = color
            captions.append("a clipart of a box, shapes")
        else:
            images[i, 6:10, 2:14] = color
            captions.append("a clipart of a bar, shapes, lines")
    path = tmp_path_factory.mktemp("world") / "tiny.npz"
    np.savez(path, images=images, captions=np.array(captions))
    return path


def _trainer(out: Path, npz: Path) -> BaseTrainer:
    with np.load(npz) as z:
        return BaseTrainer(out, z["images"], [str(c) for c in z["captions"]], _cfg())


def _cfg() -> BaseConfig:
    return BaseConfig.from_dict(WORLD_TINY)


def _same_state(a: BaseTrainer, b: BaseTrainer) -> None:
    sa, sb = a.state(), b.state()
    assert sa["step"] == sb["step"]
    for part in ("unet", "text_encoder", "ema"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), f"{part}.{k} differs"
    for k, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])
    assert sa["losses"] == sb["losses"]
    assert sa["numpy_rng"] == sb["numpy_rng"]
    assert torch.equal(sa["torch_gen"], sb["torch_gen"])


def test_killed_run_resumes_to_the_uninterrupted_state(tmp_path, tiny_data) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    args = [str(killed), str(tiny_data), "100000", "2", json.dumps(WORLD_TINY)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.world_base_run", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(int(p.name[5:]) >= 4 for p in list_checkpoints(killed)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last = int(list_checkpoints(killed)[-1].name[5:])
    assert last >= 4 and last % 2 == 0
    target = last + 3

    resumed = _trainer(killed, tiny_data)
    report = resumed.train(target, checkpoint_seconds=1e9, checkpoint_every=2, grid=False)
    assert report.resumed_from == last and report.step == target

    fresh = _trainer(tmp_path / "fresh", tiny_data)
    report = fresh.train(target, checkpoint_seconds=1e9, checkpoint_every=2, grid=False)
    assert report.resumed_from is None
    _same_state(resumed, fresh)
    # Training did something: the loss curve is not flat and weights moved from the start.
    start = _trainer(tmp_path / "start", tiny_data)
    moved = [
        not torch.equal(v, start.unet.state_dict()[k]) for k, v in fresh.unet.state_dict().items()
    ]
    assert all(moved)
    # Only the newest two checkpoints are kept; a new config is refused in a used folder.
    assert len(list_checkpoints(killed)) == 2
    with pytest.raises(Exception, match="another config"):
        BaseTrainer(killed, np.zeros((1, 16, 16, 3), np.uint8), ["x"], BaseConfig(size=16))


def test_resumed_run_changes_training_options_and_keeps_their_history(tmp_path, tiny_data) -> None:
    out = tmp_path / "run"
    _trainer(out, tiny_data).train(2, checkpoint_seconds=1e9, grid=False)
    with np.load(tiny_data) as z:
        images, captions = z["images"], [str(c) for c in z["captions"]]
    changes = {"snr_gamma": 2.0, "learning_rate": 5e-4, "prediction_type": "epsilon"}
    tr = BaseTrainer(out, images, captions, changes=changes)
    tr.train(4, checkpoint_seconds=1e9, grid=False)
    assert (tr.cfg.snr_gamma, tr.cfg.learning_rate) == (2.0, 5e-4)
    record = json.loads((out / "world_base.json").read_text())
    assert record["history"] == [
        {
            "step": 2,
            "changed": {
                "snr_gamma": [5.0, 2.0],
                "learning_rate": [1e-3, 5e-4],
                "prediction_type": ["v_prediction", "epsilon"],
            },
        }
    ]
    assert record["config"]["snr_gamma"] == 2.0
    pipe = tr.save_pipeline(tmp_path / "pipe")
    saved = json.loads((pipe / "training.json").read_text())
    assert saved["history"] == record["history"] and saved["step"] == 4
    from genattr.world.base import describe_training

    assert describe_training(saved) == (
        "trained here from scratch for 4 steps of batch 4, v_prediction prediction, "
        "min-SNR-5 loss; from step 2: learning_rate 0.0005, snr_gamma 2.0, "
        "prediction_type epsilon"
    )
    # The saved scheduler samples with what the model now predicts.
    sched = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon" and tr.noise.config.prediction_type == "epsilon"
    # Resuming again with the run's own config changes nothing more.
    BaseTrainer(out, images, captions).train(5, checkpoint_seconds=1e9, grid=False)
    assert len(json.loads((out / "world_base.json").read_text())["history"]) == 1
    # The model's shape cannot change; unknown options are named.
    with pytest.raises(Exception, match="another config"):
        BaseTrainer(out, images, captions, changes={"text_dim": 32})
    with pytest.raises(Exception, match="unknown base-model option"):
        BaseTrainer(out, images, captions, changes={"snr": 5})
    # A run recorded before these options existed trained with the plain epsilon loss.
    del record["config"]["snr_gamma"], record["config"]["prediction_type"]
    (out / "world_base.json").write_text(json.dumps(record))
    old = BaseTrainer(out, images, captions).cfg
    assert old.snr_gamma is None and old.prediction_type == "epsilon"
    with pytest.raises(
        Exception, match="prediction_type: input should be 'epsilon' or 'v_prediction'"
    ):
        BaseTrainer(out, images, captions, changes={"prediction_type": "sample"})


def test_min_snr_weights_follow_the_noise_level() -> None:
    from genattr.world.base import make_scheduler
    from genattr.world.training import loss_weights

    sched = make_scheduler()
    t = torch.arange(0, 1000, 37)
    w = loss_weights(sched, t, 5.0)
    ab = sched.alphas_cumprod[t]
    snr = ab / (1 - ab)
    noisy = snr <= 5.0
    # High-noise steps keep full weight; low-noise ones weigh gamma / SNR, less the cleaner.
    assert noisy.any() and (~noisy).any()
    assert torch.allclose(w[noisy], torch.ones(int(noisy.sum())))
    assert torch.allclose(w[~noisy], (5.0 / snr[~noisy]).float())
    assert torch.all(w[~noisy][1:] >= w[~noisy][:-1]) and w[0] < 0.01
    assert torch.equal(loss_weights(sched, t, None), torch.ones(len(t)))
    # For v-prediction the weight is on the same image error: min(SNR, gamma) / (SNR + 1).
    wv = loss_weights(make_scheduler("v_prediction"), t, 5.0)
    assert torch.allclose(wv, (torch.clamp(snr, max=5.0) / (snr + 1)).float())


def test_image_implied_by_a_perfect_prediction_is_the_image() -> None:
    from genattr.world.base import make_scheduler
    from genattr.world.quality import predicted_image

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([10, 300, 700, 999])
    eps, v = make_scheduler("epsilon"), make_scheduler("v_prediction")
    xt = v.add_noise(x0, noise, t)
    target_v = v.get_velocity(x0, noise, t)
    assert torch.allclose(predicted_image(v, xt, target_v, t), x0, atol=1e-4)
    assert torch.allclose(predicted_image(eps, xt, noise, t), x0, atol=1e-2)  # / sqrt(4e-5)
    # At pure noise the v target is minus the image, so the model learns images, not noise.
    assert torch.allclose(target_v[3], -x0[3], atol=0.05)
    # A wrong noise prediction is amplified at high noise for epsilon, not for v.
    off = 0.01 * torch.ones_like(noise)
    err_eps = (predicted_image(eps, xt, noise + off, t) - x0).abs().amax(dim=(1, 2, 3))
    err_v = (predicted_image(v, xt, target_v + off, t) - x0).abs().amax(dim=(1, 2, 3))
    assert err_eps[3] > 1.0 and err_v[3] < 0.011


def test_checkpoint_grid_and_identity_vae(tmp_path, tiny_data) -> None:
    from genattr.world.vae import IdentityVAE

    tr = _trainer(tmp_path / "run", tiny_data)
    tr.train_step()
    ckpt = tr.checkpoint()
    grid = Image.open(ckpt / "grid.png")
    assert grid.size == (2 * 8 * 18, 2 * 1 * 18)  # 4 images in a row of 8 cells, 2x upscaled
    vae = IdentityVAE()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, x) and torch.equal(vae.decode(z).sample, x)


def test_world_pipeline_is_customized_and_sampled(tmp_path, tiny_data) -> None:
    from genattr.customize import CustomizeConfig
    from genattr.customize import customize as run_customize
    from genattr.customize.sample import SampleConfig, generate
    from genattr.world.base import sample

    tr = _trainer(tmp_path / "run", tiny_data)
    for _ in range(2):
        tr.train_step()
    base = tr.save_pipeline(tmp_path / "pipeline")
    assert json.loads((base / "model_index.json").read_text())["vae"] == [
        "genattr.world.vae",
        "IdentityVAE",
    ]
    ex = tmp_path / "ex.png"
    Image.fromarray(np.full((16, 16, 3), 30, np.uint8)).save(ex)
    cfg = CustomizeConfig(resolution=16, max_train_steps=2, train_batch_size=1, learning_rate=1e-2)
    model, stats = run_customize(
        base, [ex], "object", tmp_path / "cd", "box", config=cfg, device="cpu"
    )
    assert stats.steps == 2 and np.isfinite(stats.final_loss)
    sc = SampleConfig(steps=3, images_per_prompt=2, guidance_scale=2.0)
    paths, _ = generate(model, ["a clipart of a <new1> box"], tmp_path / "out", sc, device="cpu")
    custom = np.stack([np.asarray(Image.open(p)) for p in paths])
    assert custom.shape == (2, 16, 16, 3)
    # The base model on the same prompt text (the token unknown to it) and seeds differs.
    from genattr.customize.pipeline import load_base_pipeline

    pipe = load_base_pipeline(base, "cpu", "float32")
    plain = sample(pipe, ["a clipart of a box"] * 2, steps=3, guidance=2.0)
    assert plain.shape == custom.shape and not np.array_equal(plain, custom)
    # The one-step denoising check runs on the saved pipeline; its baseline is the mean image.
    from genattr.world.quality import denoising_error

    with np.load(tiny_data) as z:
        images, captions = z["images"], [str(c) for c in z["captions"]]
    err = denoising_error(pipe, images, captions, images.mean(0), timesteps=(100, 900))
    x = images.astype(np.float32) / 127.5 - 1
    assert set(err) == {"100", "900"}
    assert err["900"]["mean_image"] == pytest.approx(float(((x.mean(0) - x) ** 2).mean()), rel=1e-5)
    assert all(0 < e["model"] < 4 for e in err.values())
