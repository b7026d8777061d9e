"""The world's captioned-set test case: how the sets are chosen, the plan a user would write
for them, the shipped pack, and that one model rebuilt from nothing gives the shipped
samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genattr.customize.plan import read_plan
from genattr.world.captioned import (
    DRAWS_PER_IMAGE,
    PROMPTS,
    SIZES,
    STAGES,
    build_sets,
    case_name,
    choose_sets,
    load_sets,
    write_plan,
)


@pytest.fixture(scope="module")
def specs(world_data):
    return choose_sets(world_data)


def test_sets_are_disjoint_unused_images_with_their_captions(world_data, specs):
    assert [s["size"] for s in specs] == [
        n for st in STAGES for n, k in st.items() for _ in range(k)
    ]
    # A later stage leaves the earlier ones as they were.
    assert choose_sets(world_data, STAGES[:1]) == specs[: sum(STAGES[0].values())]
    used = [i for s in specs for i in s["images"]]
    held = [i for s in specs for i in s["heldout_images"]]
    assert len(set(used)) == len(used) and not set(held) & set(used)  # no image twice
    assert len(set(held)) == len(held)
    assert {world_data.records[i]["split"] for i in used + held} == {"unused"}
    for s in specs:
        assert len(s["images"]) == s["size"]
        assert s["captions"] == world_data.captions(s["images"])
        assert len(s["prompts"]["set"]) == len(s["prompts"]["held-out"]) == PROMPTS
        assert set(s["prompts"]["set"]) == set(s["captions"][:PROMPTS])
        assert not set(s["prompts"]["held-out"]) & set(s["captions"])  # a caption it never saw
    assert choose_sets(world_data) == specs  # deterministic


def test_plan_is_what_make_benchmark_reads(world_data, specs, tmp_path):
    firsts = [next(s for s in specs if s["size"] == n) for n in SIZES]  # one model per N
    plan = read_plan(write_plan(world_data, tmp_path, firsts))
    assert [m.id for m in plan.models] == [s["id"] for s in firsts]
    for m, s in zip(plan.models, firsts, strict=True):
        assert m.mode == "captioned" and m.split == "test" and m.captions == s["captions"]
        assert m.prompts == s["prompts"]
        assert m.train.max_train_steps * m.train.train_batch_size == DRAWS_PER_IMAGE * s["size"]
        got = [np.asarray(Image.open(p).convert("RGB")) for p in m.exemplars]
        assert all(
            np.array_equal(a, world_data.images[i]) for a, i in zip(got, s["images"], strict=True)
        )


def test_shipped_pack_matches_the_choice(world_data, specs):
    sets = load_sets()
    assert sets.sizes() == list(SIZES)
    assert [m["id"] for m in sets.models] == [s["id"] for s in specs]
    for m, s in zip(sets.models, specs, strict=True):
        assert m["images"] == s["images"] and m["prompts"] == s["prompts"]
        assert {k: c for k, (_, c) in m["synth"].items()} == {"set": PROMPTS, "held-out": PROMPTS}
    assert sets.images.shape == (len(specs) * 2 * PROMPTS, 32, 32, 3)
    # Samples of different models differ (each model made its own).
    firsts = [sets.images[m["synth"]["set"][0]] for m in sets.models]
    assert len({a.tobytes() for a in firsts}) == len(firsts)


def test_write_images_gives_a_manifest_per_set(world_data, tmp_path):
    sets = load_sets()
    manifest, _dirs = sets.write_images(world_data, tmp_path)
    k = next(j for j, m in enumerate(sets.models) if m["size"] == 16)
    m = manifest.models[k]
    assert m.mode == "captioned" and m.extra["case"] == case_name(sets.models[k]) == "set-16"
    assert len(m.exemplars) == 16 and all(Path(p).is_file() for p in m.exemplars)
    assert set(m.synth) == {"set", "held-out"} and Path(m.synth["set"][0]).is_file()


@pytest.mark.slow
def test_a_model_rebuilt_from_nothing_gives_the_shipped_samples(world_data, tmp_path):
    sets = load_sets()
    model = sets.models[0]
    bench = build_sets(tmp_path, data=world_data, models=[model["id"]])
    for ptype, (start, count) in model["synth"].items():
        folder = bench / "synth" / ptype / model["id"] / "samples"
        for k in range(count):
            got = np.asarray(Image.open(folder / f"{k:05d}.png").convert("RGB")).astype(int)
            want = sets.images[start + k].astype(int)
            assert np.abs(got - want).max() <= 1, (ptype, k)
