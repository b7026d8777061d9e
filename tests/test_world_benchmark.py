"""The world's benchmark: planned from the hold-out, built with genattr.customize's
make-benchmark on a (tiny) world pipeline, packed into npz + json, unpacked to the same pixels,
and resumed without redoing finished models."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from genattr.customize.prompts import load_prompt_set
from genattr.world.base import BaseConfig
from genattr.world.benchmark import (
    WORLD_PROMPT_SETS,
    build_benchmark,
    load_benchmark,
    object_category,
    pack_benchmark,
)
from genattr.world.clipart import ClipartData
from genattr.world.training import BaseTrainer
from tests.support import WORLD_TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


def tiny_world() -> ClipartData:
    """Ten 16 px images: six pre-training, two single-image objects, one two-image style."""
    rng = np.random.default_rng(1)
    images = np.full((10, 16, 16, 3), 255, np.uint8)
    records = []
    layout = ["pretrain"] * 6 + ["object-exemplar"] * 2 + ["style-exemplar"] * 2
    model = [None] * 6 + ["object-000", "object-001", "style-000", "style-000"]
    folders = ["shapes", "food/fruit"] * 5
    for i in range(10):
        images[i, 3:13, 3:13] = rng.integers(0, 220, 3)
        records.append(
            {
                "split": layout[i],
                "model_id": model[i],
                "folder": folders[i],
                "group": folders[i],
                "caption": f"a clipart of a box, {folders[i]}",
            }
        )
    return ClipartData(images, records, {})


def test_world_benchmark_is_built_packed_and_resumed(tmp_path) -> None:
    data = tiny_world()
    pre = data.indices("pretrain")
    cfg = BaseConfig.from_dict(WORLD_TINY)
    trainer = BaseTrainer(tmp_path / "run", data.images[pre], data.captions(pre), cfg)
    trainer.train_step()
    base = trainer.save_pipeline(tmp_path / "base")
    work = tmp_path / "work"
    train = {"resolution": 16, "max_train_steps": 1, "train_batch_size": 1}
    sample = {"steps": 1, "images_per_prompt": 2}
    manifest = build_benchmark(base, work, data, train=train, sample=sample)

    assert [m.id for m in manifest.models] == ["object-000", "object-001", "style-000"]
    by_id = {m.id: m for m in manifest.models}
    assert by_id["object-001"].category == object_category("food/fruit") == "fruit"
    assert by_id["style-000"].mode == "style" and by_id["style-000"].category is None
    assert sorted(by_id["style-000"].synth) == ["gpt", "object"]
    assert sorted(by_id["object-000"].synth) == ["gpt", "media"]
    for m in manifest.models:
        for paths in m.synth.values():
            assert len(paths) == 5 * 2  # five prompts, two images each

    states = sorted((work / "bench" / "state").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in states}
    build_benchmark(base, work, data, train=train, sample=sample)
    assert {p: p.stat().st_mtime_ns for p in states} == before  # finished models skipped

    pack_benchmark(work, tmp_path / "packed", size=16)
    packed = load_benchmark(tmp_path / "packed", size=16)
    assert packed.images.shape == (3 * 2 * 10, 16, 16, 3)
    recs = {m["id"]: m for m in packed.models}
    assert recs["style-000"]["exemplars"] == [8, 9] and recs["object-000"]["exemplars"] == [6]
    prompt = recs["object-001"]["prompts"]["media"][0]
    assert prompt == "a clipart of a red <new1> fruit"

    unpacked, dirs = packed.write_images(data, tmp_path / "unpacked")
    assert len(list(dirs["pretrain"].glob("*.png"))) == 6
    for built, m in zip(manifest.models, unpacked.models, strict=True):
        assert (m.id, m.mode, m.split) == (built.id, built.mode, built.split)
        for ptype, paths in m.synth.items():
            for ours, theirs in zip(paths, built.synth[ptype], strict=True):
                a = np.asarray(Image.open(ours))
                b = np.asarray(Image.open(work / theirs).convert("RGB"))
                assert np.array_equal(a, b)
        for p in m.exemplars:
            i = int(p.rsplit("/", 1)[-1].split(".")[0])
            assert np.array_equal(np.asarray(Image.open(p)), data.images[i])


def test_world_benchmark_refuses_a_broken_pack(tmp_path) -> None:
    from genattr.errors import GenattrError

    with pytest.raises(GenattrError, match="no world benchmark"):
        load_benchmark(tmp_path)
    np.savez_compressed(tmp_path / "world_bench32.npz", images=np.zeros((3, 32, 32, 3), np.uint8))
    meta = {"format_version": 1, "models": [{"id": "a", "synth": {"media": [0, 4]}}]}
    (tmp_path / "world_bench32.json").write_text(json.dumps(meta))
    with pytest.raises(GenattrError, match="3 images but the models name 4"):
        load_benchmark(tmp_path)


def test_world_prompt_sets_render_five_prompts_with_the_token() -> None:
    for mode, names in WORLD_PROMPT_SETS.items():
        for name in names:
            ps = load_prompt_set(name)
            assert ps.mode == mode
            prompts = ps.render("fruit" if mode == "object" else None)
            assert len(prompts) == 5 and all("<new1>" in p for p in prompts)


def test_world_prompts_use_the_base_models_words() -> None:
    """Every subject word of the shipped world's prompts (object categories, slot words) is one
    token of the shipped base model's tokenizer: a word the base model saw in its captions,
    not one it must spell. (The fixed phrase "in the style of" is the authors' wording.)"""
    from transformers import CLIPTokenizer

    from genattr.world.base import base_model_dir
    from genattr.world.clipart import load_data

    vocab = CLIPTokenizer.from_pretrained(str(base_model_dir() / "tokenizer")).get_vocab()
    data = load_data()
    words = {
        object_category(data.records[ix[0]]["group"])
        for k, ix in data.models().items()
        if k.startswith("object-")
    }
    for names in WORLD_PROMPT_SETS.values():
        for name in names:
            for values in load_prompt_set(name).slots.values():
                words |= {w for v in values for w in re.findall(r"[a-z]+", v)}
    assert len(words) > 20
    assert sorted(w for w in words if w + "</w>" not in vocab) == []
