"""Gradient attribution parts (issue 17) against direct computations on the tiny SD pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genattr.methods.gradient import (
    GradientSpec,
    SparseProjection,
    fixed_noises,
    iter_gradients,
    loss_gradients,
    projected_gradients,
    select_parameters,
    spec_timesteps,
)

KV = re.compile(r"\.attn2\.to_[kv]\.weight$")


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def model(tiny):
    """UNet, a DDPM scheduler (as training uses), and 3 images' latents and text states."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((3, 3, 32, 32), generator=gen) * 2 - 1
    prompts = ["a red disc", "a blue box", "<new1> dog"]
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        text = pipe.text_encoder(torch.tensor(ids.input_ids))[0]
    return pipe.unet, sched, latents, text


def _reference_gradients(unet, sched, latents, text, spec, names) -> torch.Tensor:
    """Per image, the summed output over the timesteps written out step by step (forward
    process by hand, one UNet call per timestep), differentiated with plain autograd."""
    params = dict(unet.named_parameters())
    chosen = [params[n] for n in names]
    ts = spec_timesteps(spec, sched.config.num_train_timesteps)
    noises = fixed_noises(spec, tuple(latents.shape[1:]), len(ts))
    rows = []
    for x0, c in zip(latents, text, strict=True):
        total = torch.zeros(())
        for t, eps in zip(ts, noises, strict=True):
            ab = sched.alphas_cumprod[t]
            noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            pred = unet(noisy[None], torch.tensor([t]), c[None]).sample[0]
            if spec.output == "loss":
                total = total + ((pred - eps) ** 2).mean()
            else:
                total = total + (pred**2).mean()
        grads = torch.autograd.grad(total, chosen)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def test_selects_exactly_the_cross_attention_kv_weights(model):
    unet = model[0]
    chosen = select_parameters(unet)
    expected = [(n, p) for n, p in unet.named_parameters() if KV.search(n)]
    assert [n for n, _ in chosen] == [n for n, _ in expected]
    # tiny UNet: cross-attention in down block 0 (1), up block 1 (2), mid block (1) -> 4 x (k, v)
    assert len(chosen) == 8
    assert all(p is q for (_, p), (_, q) in zip(chosen, expected, strict=True))
    assert sorted(tuple(p.shape) for _, p in chosen) == [(32, 32)] * 6 + [(64, 32)] * 2
    assert sum(p.numel() for _, p in chosen) == 10240
    everything = select_parameters(unet, "all")
    assert len(everything) == len(list(unet.parameters()))


def test_selection_errors_are_clear():
    with pytest.raises(ValueError, match="unknown parameter set 'nope'"):
        select_parameters(torch.nn.Linear(2, 2), "nope")
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(torch.nn.Linear(2, 2), "cross_attn_kv")


def test_spec_is_checked():
    assert spec_timesteps(GradientSpec(), 1000) == [125, 375, 625, 875]
    assert spec_timesteps(GradientSpec(timesteps=[0, 999]), 1000) == [0, 999]
    with pytest.raises(ValueError, match="outside the schedule"):
        spec_timesteps(GradientSpec(timesteps=[1000]), 1000)
    for bad in ({"proj_dim": 0}, {"timesteps": []}, {"output": "norm"}, {"params": "kv"}):
        with pytest.raises(ValueError):
            GradientSpec(**bad)


@pytest.mark.parametrize("output", ["loss", "square_norm"])
def test_gradients_equal_plain_autograd(model, output):
    unet, sched, latents, text = model
    spec = GradientSpec(output=output, seed=5, proj_dim=256)
    names = [n for n, _ in unet.named_parameters() if KV.search(n)]
    expected = _reference_gradients(unet, sched, latents, text, spec, names)
    flags = [p.requires_grad for p in unet.parameters()]
    got = loss_gradients(unet, sched, latents, text, spec)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert got.shape == (3, 10240)
    _close(got, expected)
    # projected = plain gradient times the dense projection matrix
    proj = SparseProjection(10240, 256, seed=5, nnz=4)
    projected = projected_gradients(unet, sched, latents, text, spec)
    assert projected.dtype == np.float32 and projected.shape == (3, 256)
    _close(torch.from_numpy(projected), expected @ proj.dense())
    # the UNet comes back as it was
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert unet.training is False


def test_square_norm_differs_from_loss(model):
    unet, sched, latents, text = model
    loss = loss_gradients(unet, sched, latents[:2], text[:2], GradientSpec(output="loss"))
    square = loss_gradients(unet, sched, latents[:2], text[:2], GradientSpec(output="square_norm"))
    cos = torch.nn.functional.cosine_similarity(loss, square, dim=1)
    assert (cos.abs() < 0.99).all(), cos


def test_all_parameters_equal_plain_autograd(model):
    unet, sched, latents, text = model
    spec = GradientSpec(params="all", timesteps=[10, 600])
    names = [n for n, _ in unet.named_parameters()]
    expected = _reference_gradients(unet, sched, latents[:1], text[:1], spec, names)
    got = loss_gradients(unet, sched, latents[:1], text[:1], spec)
    assert got.shape == (1, sum(p.numel() for p in unet.parameters()))
    _close(got, expected)


def test_input_shapes_are_checked(model):
    unet, sched, latents, text = model
    with pytest.raises(ValueError, match="2 latents but 3 text"):
        loss_gradients(unet, sched, latents[:2], text, GradientSpec())
    with pytest.raises(ValueError, match=r"latents must be \(N, C, H, W\)"):
        loss_gradients(unet, sched, latents[0], text, GradientSpec())


def _fingerprint(seed: int) -> dict[str, str]:
    spec = GradientSpec(seed=seed)
    proj = SparseProjection(5000, 512, seed=seed, nnz=4)
    parts = {
        "noises": fixed_noises(spec, (4, 16, 16), 4).numpy().tobytes(),
        "timesteps": json.dumps(spec_timesteps(spec, 1000)).encode(),
        "indices": proj.indices.numpy().tobytes(),
        "signs": proj.signs.numpy().tobytes(),
    }
    return {k: hashlib.sha256(v).hexdigest() for k, v in parts.items()}


@pytest.mark.slow
def test_same_seed_same_noises_and_projection_in_a_fresh_process():
    code = (
        "import json; from tests.test_methods_gradient import _fingerprint; "
        "print(json.dumps(_fingerprint(3)))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == _fingerprint(3)
    other = _fingerprint(4)
    mine = _fingerprint(3)
    # timesteps are the spec's (spread over the schedule), the same for every seed
    assert other["timesteps"] == mine["timesteps"]
    assert all(other[k] != mine[k] for k in ("noises", "indices", "signs"))


def test_projection_structure_and_blockwise_application():
    proj = SparseProjection(1000, 64, seed=1, nnz=4, block=7)
    width = 64 // 4
    # one output coordinate in each of the nnz blocks, signs +-1, columns scaled 1/sqrt(nnz)
    assert ((proj.indices // width) == torch.arange(4)).all()
    assert set(proj.signs.unique().tolist()) == {-1, 1}
    dense = proj.dense()
    torch.testing.assert_close(dense.pow(2).sum(1), torch.ones(1000))
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(proj(x), x @ dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj(x[0]), x[0] @ dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of nnz"):
        SparseProjection(10, 30, seed=0, nnz=4)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 1000\)"):
        proj(torch.zeros(999))


def test_projection_never_builds_a_dense_matrix():
    n, dim, nnz = 1_000_000, 2048, 4
    proj = SparseProjection(n, dim, seed=0, nnz=nnz)
    held = [v for v in vars(proj).values() if isinstance(v, torch.Tensor)]
    assert sum(v.numel() for v in held) == 2 * n * nnz  # indices + signs, nothing n x dim
    assert proj.indices.dtype == torch.int32 and proj.signs.dtype == torch.int8
    with pytest.raises(ValueError, match="exceeds"):
        proj.dense()
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    y = proj(x)
    # independent reference: numpy's bincount over the same (index, sign) pairs, in float64
    weights = x.double().numpy()[:, None] * proj.signs.numpy() / np.sqrt(nnz)
    ref = np.bincount(proj.indices.numpy().ravel(), weights=weights.ravel(), minlength=dim)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-3)
    # Johnson-Lindenstrauss: the squared norm is kept (relative std ~ sqrt(2/dim) = 3%)
    assert 0.85 < float(y.pow(2).sum() / x.pow(2).sum()) < 1.15


def test_gradient_scores_equal_the_formulas_blockwise():
    from genattr.methods import gradient_scores

    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 16, generator=g).numpy()
    queries = torch.randn(5, 16, generator=g).numpy()
    cos = gradient_scores(train, queries, "cosine", block_rows=64)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, qn @ tn.T, atol=1e-5)
    trak = gradient_scores(train, queries, "trak", damping=0.01, block_rows=64)
    gram = train.astype(np.float64).T @ train
    lam = 0.01 * np.diag(gram).mean()
    want = queries @ np.linalg.inv(gram + lam * np.eye(16)) @ train.T
    np.testing.assert_allclose(trak, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="queries must be"):
        gradient_scores(train, queries[:, :8])
    with pytest.raises(ValueError, match="damping"):
        gradient_scores(train, queries, "trak", damping=float("nan"))


def test_trak_kernel_discounts_directions_every_gradient_shares():
    """Gradients dominated by a few directions they all share (as loss gradients of one model
    are), in amounts unrelated to where they came from: cosine ranks by those and finds a
    query's source no better than chance; the kernel correction divides them out and finds
    the source first."""
    from genattr.methods import gradient_scores

    g = torch.Generator().manual_seed(1)
    n, dim = 200, 64
    common = 20 * torch.randn(dim, 3, generator=g)
    own = torch.randn(n, dim, generator=g)
    train = (torch.randn(n, 3, generator=g) @ common.T + own).numpy()
    sources = torch.arange(0, n, 20)
    mix = torch.randn(len(sources), 3, generator=g) @ common.T
    queries = mix + own[sources] + 0.3 * torch.randn(len(sources), dim, generator=g)
    hits = {}
    for kernel in ("cosine", "trak"):
        scores = gradient_scores(train, queries.numpy(), kernel)
        hits[kernel] = float((scores.argmax(1) == sources.numpy()).mean())
    # measured over seeds 0-9: trak finds 90-100 % of sources first, cosine 0 % (its mean rank
    # of the source ~100 of 200: chance)
    assert hits["trak"] >= 0.8 and hits["cosine"] <= 0.2, hits


def test_a_customized_model_takes_gradients_at_its_custom_diffusion_layers(tiny):
    """Loaded with Custom Diffusion processors (as `load_custom_diffusion` loads a customized
    model), keys and values come from the processors' own layers: those are the parameters,
    their gradients equal autograd's, and the layers' unused to_k/to_v get none."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    unet = pipe.unet
    procs = dict(unet.attn_processors)
    for name, m in unet.named_modules():
        if getattr(m, "is_cross_attention", False):
            proc = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=m.to_k.out_features,
                cross_attention_dim=m.to_k.in_features,
            )  # fmt: skip
            with torch.no_grad():  # a different model than the base: weights moved
                proc.to_k_custom_diffusion.weight.copy_(1.5 * m.to_k.weight)
                proc.to_v_custom_diffusion.weight.copy_(m.to_v.weight.flip(0))
            procs[f"{name}.processor"] = proc
    unet.set_attn_processor(procs)
    chosen = select_parameters(unet)
    assert [n.rsplit(".", 2)[-2] for n, _ in chosen][:2] == [
        "to_k_custom_diffusion",
        "to_v_custom_diffusion",
    ]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn((2, 4, 16, 16), generator=gen)
    text = torch.randn((2, 77, pipe.text_encoder.config.hidden_size), generator=gen)
    spec = GradientSpec()
    got = loss_gradients(unet, sched, latents, text, spec)
    want = _reference_gradients(unet, sched, latents, text, spec, [n for n, _ in chosen])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert got.abs().sum() > 0
    base_kv = [n for n, _ in unet.named_parameters() if KV.search(n)]
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        _reference_gradients(unet, sched, latents, text, spec, base_kv)


@pytest.mark.parametrize(
    "batch_size",
    [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(8, marks=pytest.mark.slow)],
)
def test_batched_gradients_equal_one_image_at_a_time(model, batch_size):
    """The per-sample trick (several images per pass, a partial last batch included) gives
    each image the gradient plain autograd gives it alone."""
    unet, sched, latents, text = model
    spec = GradientSpec(seed=2)
    names = [n for n, _ in select_parameters(unet)]
    expected = _reference_gradients(unet, sched, latents, text, spec, names)
    got = torch.stack(list(iter_gradients(unet, sched, latents, text, spec, batch_size=batch_size)))
    _close(got, expected)
