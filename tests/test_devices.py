"""Device plumbing. On the CPU: decoded images reach vectors through the one path extraction
uses, and answers come back as CPU numpy. Tests marked `gpu` repeat each device path on CUDA
and compare it with the CPU; they run wherever torch sees a CUDA device."""

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.attribution import Attributor
from genattr.evaluate import evaluate_protocol
from genattr.features import get_backbone
from genattr.features.embedder import embed_images, model_device
from genattr.features.extract import extract
from genattr.vectors import embed
from tests.conftest import random_mappers
from tests.support import drawing
from tests.synthetic import make_synthetic_benchmark

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


@pytest.fixture(scope="module")
def drawings(tmp_path_factory):
    root = tmp_path_factory.mktemp("drawings")
    for i in range(24):
        drawing(i).save(root / f"d{i:02d}.png")
    return root


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["pixel", "world-cnn"])
def test_embed_images_is_the_extraction_path(drawings, tmp_path, name, device, one_torch_thread):
    """The same vectors from a store and from images in memory, on any device; CPU numpy out."""
    store = extract(name, drawings, tmp_path / "store", workers=0, device=device).store
    backbone = get_backbone(name, device=device)
    assert model_device(backbone.model).type == device
    images = [Image.open(drawings / p).convert("RGB") for p in store.paths]
    vectors = embed_images(backbone, images, batch_size=5)
    assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, np.asarray(store.vectors[:]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_attributor_answers_the_same_on_every_device(tiny_index, world_data, device):
    index, calibrator, rows = tiny_index
    queries = [Image.fromarray(world_data.images[r]) for r in rows[:3]]
    on_cpu = Attributor.load(index, calibrator).attribute(queries, 5)
    here = Attributor.load(index, calibrator, device=device)
    vectors = here.embed(queries)
    assert isinstance(vectors, np.ndarray)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    answers = here.attribute(queries, 5)
    for a, b in zip(on_cpu, answers, strict=True):
        assert [r.id for r in a.results] == [r.id for r in b.results]
        np.testing.assert_allclose(
            [r.influence for r in a.results], [r.influence for r in b.results], atol=1e-4
        )


def test_attributor_embeds_through_the_synth_head(tiny_index, world_data):
    """Attributor.embed = the synth head over `embed_images`, normalised."""
    index, calibrator, rows = tiny_index
    attributor = Attributor.load(index, calibrator)
    attributor.head = random_mappers("linear", attributor.backbone.dim, 3)
    images = [Image.fromarray(world_data.images[r]) for r in rows[:4]]
    raw = torch.from_numpy(embed_images(attributor.backbone, images))
    with torch.no_grad():
        want = embed(raw, attributor.head.synth).numpy()
    np.testing.assert_allclose(attributor.embed(images), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_protocol_is_the_same_on_every_device(device):
    bench = make_synthetic_benchmark(
        n_gallery=2000, dim=16, n_object_models=5, n_style_models=2, queries_per_model={"a": 3}
    )
    cpu = evaluate_protocol(bench.gallery.feats, bench.testcase, (5, 10), bench.oracle_mappers)
    here = evaluate_protocol(
        bench.gallery.feats, bench.testcase, (5, 10), bench.oracle_mappers, device=device
    )
    for p, s in cpu.summary().items():
        assert here.summary()[p]["mAP"] == pytest.approx(s["mAP"], abs=1e-6)
