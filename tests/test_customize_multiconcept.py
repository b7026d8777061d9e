"""Multi-concept Custom Diffusion on the tiny SD-shaped pipeline (one model, one modifier token
per concept, examples drawn from the union), single-concept training unchanged byte for byte,
and the world's packed multi-concept test case."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genattr.errors import GenattrError
from tests.support import (
    DRIFT_TOLERANCE,
    RECORDED_SINGLE,
    customize_config,
    render,
    shape_images,
    single_concept_drift,
    tensors_in,
    train_single_models,
)

pytestmark = pytest.mark.slow
_config = customize_config


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> list[Path]:
    return shape_images(tmp_path_factory.mktemp("shapes"))


WEIGHTS = "pytorch_custom_diffusion_weights.bin"


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.bin")}


@pytest.fixture(scope="module")
def multi(tiny, shapes, tmp_path_factory):
    """A three-concept model (two objects, one style) and the pipeline it was trained in."""
    from genattr.customize.config import Concept
    from genattr.customize.pipeline import load_base_pipeline
    from genattr.customize.train import Customizer

    pipe = load_base_pipeline(tiny, "cpu", "float32")
    cz = Customizer(pipe)
    concepts = [
        Concept([shapes[0]], "object", "dog"),
        Concept([shapes[1]], "object", "cat", initializer="cat"),
        Concept(shapes[2:], "style"),
    ]
    stats = cz.train_concepts(concepts, _config(max_train_steps=8))
    out = tmp_path_factory.mktemp("multi") / "m"
    cz.save(out, extra={"base": str(tiny)})
    return {"pipe": pipe, "cz": cz, "dir": out, "stats": stats}


def _text_states(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor(ids.input_ids))[0]


def test_single_concept_bytes_unchanged(tiny, shapes, tmp_path):
    """`train` is `train_concepts` with one concept, draw for draw: the same weight bytes on
    this machine, and the weights of the code before it existed (within the drift between CPU
    kernel families)."""
    train_single_models(tiny, shapes, tmp_path / "train")
    train_single_models(tiny, shapes, tmp_path / "concepts", concepts=True)
    for name in ("obj", "sty"):
        got = _hashes(tmp_path / "train" / name)
        assert got == _hashes(tmp_path / "concepts" / name), name
        assert set(got) == {"<new1>.bin", "pytorch_custom_diffusion_weights.bin"}
    info = json.loads((tmp_path / "train" / "obj" / "genattr_customize.json").read_text())
    assert info["modifier_token"] == "<new1>" and "concepts" not in info  # the old record
    drift = single_concept_drift(tmp_path / "train")
    assert len(drift) == 2 * (1 + len(tensors_in(RECORDED_SINGLE / "obj" / WEIGHTS)))
    worst = max(drift, key=lambda k: drift[k]["rel"])
    assert drift[worst]["rel"] <= DRIFT_TOLERANCE, (worst, drift[worst])


def test_multi_concept_saves_every_token_in_diffusers_format(multi):
    out = multi["dir"]
    assert {p.name for p in out.iterdir()} == {
        "<new1>.bin",
        "<new2>.bin",
        "<new3>.bin",
        "pytorch_custom_diffusion_weights.bin",
        "genattr_customize.json",
    }
    for k in (1, 2, 3):
        emb = torch.load(out / f"<new{k}>.bin", weights_only=True)
        assert list(emb) == [f"<new{k}>"] and emb[f"<new{k}>"].shape == (32,)
    info = json.loads((out / "genattr_customize.json").read_text())
    assert info["modifier_tokens"] == ["<new1>", "<new2>", "<new3>"]
    concepts = info["concepts"]
    assert [c["train_prompt"] for c in concepts] == [
        "<new1> dog",
        "<new2> cat",
        "A picture in the style of <new3> art",
    ]
    assert [c["initializer_token"] for c in concepts] == ["dog", "cat", "dog"]
    assert [len(c["exemplars"]) for c in concepts] == [1, 1, 2]
    from genattr.customize.train import model_concepts

    assert model_concepts(info) == concepts
    assert multi["cz"].tokens == info["modifier_tokens"]


def test_draws_cover_every_concept(multi):
    draws = multi["stats"].draws
    # 8 steps x batch 2 = 16 draws from the union of 4 images in shuffled passes: 4 each.
    assert draws == [4, 4, 8] and all(c["draws"] for c in _info(multi)["concepts"])


def _info(multi) -> dict:
    return json.loads((multi["dir"] / "genattr_customize.json").read_text())


def test_each_token_moves_only_its_own_prompts(multi, tiny):
    from genattr.customize.pipeline import load_base_pipeline

    pipe = multi["pipe"]
    prompts = [f"a photo of <new{k}> dog" for k in (1, 2, 3)] + ["a photo of a dog"]
    states = _text_states(pipe, prompts)
    for i in range(3):  # every concept's prompt reads differently
        for j in range(i + 1, 4):
            assert (states[i] - states[j]).abs().max() > 1e-4, (i, j)
    base = load_base_pipeline(tiny, "cpu", "float32")
    torch.testing.assert_close(states[3], _text_states(base, prompts[3:])[0])  # no token: base
    # Move one token's row: only the prompt with that token changes.
    weight = pipe.text_encoder.get_input_embeddings().weight
    tid = pipe.tokenizer.convert_tokens_to_ids("<new2>")
    saved = weight[tid].detach().clone()
    try:
        with torch.no_grad():
            weight[tid] += 1.0
        moved = _text_states(pipe, prompts)
    finally:
        with torch.no_grad():
            weight[tid] = saved
    changed = [bool((moved[i] - states[i]).abs().max() > 1e-6) for i in range(4)]
    assert changed == [False, True, False, False]


def test_multi_concept_loads_every_token(multi, tiny):
    from genattr.customize.loading import load_custom_diffusion
    from genattr.customize.pipeline import load_base_pipeline

    base = load_base_pipeline(tiny, "cpu", "float32")
    report = load_custom_diffusion(base, multi["dir"])
    assert report.tokens == ["<new1>", "<new2>", "<new3>"]
    for k in (1, 2, 3):
        prompt = f"a photo of <new{k}> dog"
        np.testing.assert_allclose(render(base, prompt), render(multi["pipe"], prompt), atol=1e-5)


def test_tokens_load_in_number_order_and_from_safetensors_bytes(multi, tiny, tmp_path):
    """Ten tokens load as `<new1>` ... `<new10>` (not name order), and a `.bin` holding
    safetensors bytes (what diffusers' training script writes by default) loads too."""
    import safetensors.torch

    from genattr.customize.loading import load_custom_diffusion
    from genattr.customize.pipeline import load_base_pipeline

    folder = tmp_path / "m"
    folder.mkdir()
    name = "pytorch_custom_diffusion_weights.bin"
    (folder / name).write_bytes((multi["dir"] / name).read_bytes())
    for k in range(1, 11):
        emb = {f"<new{k}>": torch.full((32,), float(k))}
        if k % 2:
            torch.save(emb, folder / f"<new{k}>.bin")
        else:
            safetensors.torch.save_file(emb, str(folder / f"<new{k}>.bin"))
    base = load_base_pipeline(tiny, "cpu", "float32")
    report = load_custom_diffusion(base, folder)
    assert report.tokens == [f"<new{k}>" for k in range(1, 11)]
    weight = base.text_encoder.get_input_embeddings().weight
    for k in range(1, 11):
        assert torch.equal(
            weight[base.tokenizer.convert_tokens_to_ids(f"<new{k}>")][:1], k * torch.ones(1)
        )


def test_multi_concept_errors_and_reuse(tiny, shapes, tmp_path):
    from genattr.customize.config import Concept
    from genattr.customize.pipeline import load_base_pipeline
    from genattr.customize.prompts import with_token
    from genattr.customize.train import Customizer

    cz = Customizer(load_base_pipeline(tiny, "cpu", "float32"))
    with pytest.raises(GenattrError, match="no concepts"):
        cz.train_concepts([], _config())
    with pytest.raises(GenattrError, match=r"concept 2 \(<new2>\).*category"):
        cz.train_concepts([Concept([shapes[0]], "style"), Concept([shapes[1]], "object")])
    with pytest.raises(GenattrError, match="its own modifier token"):
        cz.train_concepts(
            [Concept([shapes[0]], "style", token="<a>"), Concept([shapes[1]], "style", token="<a>")]
        )
    # One Customizer, model after model: a single-concept model, then a two-concept one.
    cz.train([shapes[0]], "object", "dog", _config(max_train_steps=2))
    cz.train_concepts(
        [Concept([shapes[0]], "style"), Concept([shapes[1]], "style")], _config(max_train_steps=2)
    )
    cz.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").glob("<*")) == ["<new1>.bin", "<new2>.bin"]
    assert with_token(["a clipart of <new1> animals"], "<new3>") == ["a clipart of <new3> animals"]
    with pytest.raises(GenattrError, match="lacks"):
        with_token(["no token"], "<new2>")


def test_world_multiconcept_pack_is_consistent():
    """The shipped multi-concept test case: small, its record matches the world benchmark and
    the documented deterministic choice, every image is named exactly once."""
    from genattr.customize.prompts import with_token
    from genattr.world.benchmark import load_benchmark
    from genattr.world.clipart import DEFAULT_DATA_DIR
    from genattr.world.multiconcept import (
        IMAGES_PER_PROMPT,
        LAYOUT,
        MC_IMAGES,
        MC_META,
        K,
        choose_models,
        load_multiconcept,
        train_options,
    )

    size = sum((DEFAULT_DATA_DIR / n.format(size=32)).stat().st_size for n in (MC_IMAGES, MC_META))
    assert size < 1_000_000
    mc = load_multiconcept()
    bench = load_benchmark()
    by_id = {m["id"]: m for m in bench.models}
    assert mc.info["k"] == K and mc.info["train"] == train_options(K)
    assert mc.info["train"]["max_train_steps"] == K * bench.info["train"]["max_train_steps"]
    chosen = choose_models(bench)
    assert [m["id"] for m in mc.models] == [m["id"] for m in chosen]
    assert len(mc.models) == sum(LAYOUT.values())
    used: list[str] = []
    covered = np.zeros(len(mc.images), int)
    for m, spec in zip(mc.models, chosen, strict=True):
        assert [c["token"] for c in m["concepts"]] == [f"<new{k}>" for k in range(1, K + 1)]
        assert m["train_steps"] == mc.info["train"]["max_train_steps"]
        assert sum(c["draws"] for c in m["concepts"]) == 2 * m["train_steps"]  # batch size 2
        for c, want in zip(m["concepts"], spec["concepts"], strict=True):
            single = by_id[c["test_model"]]
            assert c["test_model"] == want["test_model"] and single["split"] == "test"
            assert single.get("case", single["mode"]) == m["mode"] == c["mode"]
            assert c["exemplars"] == single["exemplars"]
            assert c["prompts"] == {
                p: with_token(v, c["token"]) for p, v in single["prompts"].items()
            }
            assert c["token"] in c["train_prompt"] and c["draws"] > 0
            for ptype, (start, count) in c["synth"].items():
                assert count == IMAGES_PER_PROMPT * len(c["prompts"][ptype])
                covered[start : start + count] += 1
            used.append(c["test_model"])
    assert len(set(used)) == len(used)  # no exemplar set in two models
    assert (covered == 1).all()
    assert mc.images.dtype == np.uint8 and mc.images.shape[1:] == (32, 32, 3)
    assert mc.images.std() > 10  # images, not blanks
