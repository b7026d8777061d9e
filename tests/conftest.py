from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genattr.data.official import TestCaseFeatures
from genattr.heads.checkpoint import MapperPair
from genattr.heads.networks import create_head

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_abc() -> Path:
    path = SHARED / "abc" / "json"
    if not path.is_dir():
        pytest.skip("../shared/abc is not available on this machine")
    return path


def random_mappers(kind: str, dim: int, seed: int) -> MapperPair:
    """Heads with random (not identity) parameters, BatchNorm statistics included."""
    gen = torch.Generator().manual_seed(seed)
    heads = []
    for _ in range(2):
        head = (
            create_head(kind, dim)
            if kind != "mlp"
            else create_head(kind, dim, hidden_dim=48, out_dim=24)
        )
        with torch.no_grad():
            for name, t in head.state_dict().items():
                if t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen)
                    t.copy_(t + 0.3 * noise if "var" not in name else 0.5 + noise.abs())
        heads.append(head.eval())
    return MapperPair(heads[0], heads[1], kind)


def make_fixture(
    *,
    n_gallery: int = 2000,
    dim: int = 24,
    sizes: list[int],
    queries_per_model: int = 3,
    noise: float = 1.0,
    mappers: MapperPair | None = None,
    margin: float = 1e-5,
    seed: int = 0,
):
    """Random gallery and test case whose gallery scores are never within `margin` of an
    exemplar score of the same query, so float rounding cannot reorder them ("ties aside")."""
    rng = np.random.default_rng(seed)
    chunks, start = [], 0
    for s in sizes:
        chunks.append((start, start + s))
        start += s
    exemplars = rng.standard_normal((start, dim)).astype(np.float32)
    ptypes = {"media": queries_per_model, "gpt": max(1, queries_per_model - 1)}
    synth, ids = {}, {}
    for ptype, per in ptypes.items():
        model_ids = np.repeat(np.arange(len(sizes)), per)
        anchor = exemplars[[chunks[m][0] for m in model_ids]]
        synth[ptype] = torch.from_numpy(
            (anchor + noise * rng.standard_normal(anchor.shape)).astype(np.float32)
        )
        ids[ptype] = model_ids.tolist()
    gallery = rng.standard_normal((n_gallery, dim)).astype(np.float32)

    @torch.no_grad()
    def embed(x: np.ndarray, head) -> np.ndarray:
        x = torch.from_numpy(x).double()
        if head is not None:
            x = head.double()(x)
            head.float()
        return torch.nn.functional.normalize(x, dim=-1).numpy()

    real = mappers.real if mappers else None
    syn = mappers.synth if mappers else None
    g, ex = embed(gallery, real), embed(exemplars, real)
    keep = np.ones(n_gallery, bool)
    for ptype in ptypes:
        q = embed(synth[ptype].numpy(), syn)
        for qi, m in enumerate(ids[ptype]):
            s, e = chunks[m]
            ex_scores = ex[s:e] @ q[qi]
            gal_scores = g @ q[qi]
            keep &= np.abs(gal_scores[:, None] - ex_scores[None]).min(1) > margin
    tc = TestCaseFeatures(
        exemplar_paths=[f"ex/{i}.png" for i in range(start)],
        exemplar_chunks=chunks,
        exemplar_feats=torch.from_numpy(exemplars),
        synth_paths={p: [f"synth/{p}/{i}.png" for i in range(len(v))] for p, v in ids.items()},
        synth_ids=ids,
        synth_feats=synth,
    )
    return torch.from_numpy(gallery[keep]), tc


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on two shared cores it is faster than two threads fighting, and it
    gives the same arithmetic as subprocesses started with OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SERVE_GALLERY = 40  # world images in the web service's test index


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline folder (tests/tiny_sd.py), one per test module:
    modules write models and benchmarks beside their own copy."""
    from tests.tiny_sd import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def world_data():
    """The shipped clip-art world (images and records)."""
    from genattr.world.clipart import load_data

    return load_data()


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, world_data, one_torch_thread):
    """The first world gallery images, pixel backbone, and a calibrator with a cutoff."""
    from genattr.calibrate import Calibrator, save_calibrator
    from genattr.serve.world_index import build_world_index, gallery_rows

    root = tmp_path_factory.mktemp("serve")
    rows = gallery_rows(world_data)[:SERVE_GALLERY]
    build_world_index(root / "index", "pixel", rows=rows, data=world_data)
    save_calibrator(Calibrator(inv_tau=60.0, bias=-50.0), root / "calibrator.json")
    return root / "index", root / "calibrator.json", rows
