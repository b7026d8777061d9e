"""A synthetic AbC benchmark in feature space, with a planted real -> synth distortion.

A world with a known answer for the tests of heads, calibration and evaluation (the demo runs
on the clip-art world): a clustered gallery (a mixture of
Gaussians, like real embeddings, not i.i.d. noise), object models with one exemplar and style
models with several, and queries that are a fixed linear distortion of a noisy exemplar.
The distortion is known, so the ideal synth mapper (its inverse) is known too: evaluation
with and without it shows what a learned head is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genattr.data.official import GalleryFeatures, TestCaseFeatures
from genattr.heads.checkpoint import MapperPair
from genattr.heads.networks import LinearHead


@dataclass
class SyntheticBenchmark:
    gallery: GalleryFeatures
    testcase: TestCaseFeatures
    oracle_mappers: MapperPair  # identity on real images, the distortion's inverse on synth


def make_synthetic_benchmark(
    n_gallery: int = 20_000,
    dim: int = 64,
    n_object_models: int = 30,
    n_style_models: int = 10,
    style_exemplars: tuple[int, int] = (4, 12),
    queries_per_model: dict[str, int] | None = None,
    noise: float = 0.6,
    distortion: float = 0.8,
    n_clusters: int = 50,
    seed: int = 0,
) -> SyntheticBenchmark:
    """Build gallery and test-case features in the authors' layout (see `genattr.data`)."""
    rng = np.random.default_rng(seed)
    queries_per_model = queries_per_model or {"media": 8, "gpt": 8}
    centers = rng.standard_normal((n_clusters, dim))

    def sample(n: int, spread: float = 0.5) -> np.ndarray:
        return centers[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim))

    gallery = sample(n_gallery)
    sizes = [1] * n_object_models + list(
        rng.integers(style_exemplars[0], style_exemplars[1] + 1, n_style_models)
    )
    exemplars, chunks, start = [], [], 0
    for m, size in enumerate(sizes):
        if m < n_object_models:
            exemplars.append(sample(1))
        else:  # a style: several images around one shared look
            look = sample(1)
            exemplars.append(look + 0.4 * rng.standard_normal((size, dim)))
        chunks.append((start, start + int(size)))
        start += int(size)
    exemplar_feats = np.concatenate(exemplars)
    mix = np.eye(dim) + distortion * rng.standard_normal((dim, dim)) / np.sqrt(dim)

    synth_feats, synth_ids, synth_paths = {}, {}, {}
    for ptype, per_model in queries_per_model.items():
        ids = np.repeat(np.arange(len(sizes)), per_model)
        src = np.array([rng.integers(chunks[i][0], chunks[i][1]) for i in ids])
        clean = exemplar_feats[src] + noise * rng.standard_normal((len(ids), dim))
        synth_feats[ptype] = torch.from_numpy((clean @ mix.T).astype(np.float32))
        synth_ids[ptype] = ids.tolist()
        synth_paths[ptype] = [f"synth/{ptype}/model_{i:03d}/{j:05d}.png" for j, i in enumerate(ids)]

    testcase = TestCaseFeatures(
        exemplar_paths=[f"exemplar/{i:05d}.png" for i in range(len(exemplar_feats))],
        exemplar_chunks=chunks,
        exemplar_feats=torch.from_numpy(exemplar_feats.astype(np.float32)),
        synth_paths=synth_paths,
        synth_ids=synth_ids,
        synth_feats=synth_feats,
    )
    gallery_feats = GalleryFeatures(
        torch.from_numpy(gallery.astype(np.float32)),
        [f"gallery/{i:07d}.jpg" for i in range(n_gallery)],
    )
    real, synth = LinearHead(dim), LinearHead(dim)
    with torch.no_grad():
        synth.weight.copy_(torch.from_numpy(np.linalg.inv(mix).astype(np.float32)))
    return SyntheticBenchmark(
        gallery_feats, testcase, MapperPair(real.eval(), synth.eval(), "linear")
    )
