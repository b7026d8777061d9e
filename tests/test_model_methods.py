"""Model-based methods on a benchmark (`genattr.workflows.model_methods`): the evaluation's
assembly on planted scores, and `genattr evaluate --method gradient` end to end on a
make-benchmark folder made with the tiny SD-shaped pipeline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from genattr.cli import app
from genattr.errors import GenattrError
from genattr.evaluate import expected_random_ap
from genattr.workflows.method_runs import evaluate_method
from genattr.workflows.model_cases import Concept, ImageSet, ModelCase, select_queries
from tests.support import shape_image
from tests.tiny_sd import build_tiny_pipeline

pytestmark = pytest.mark.slow  # subprocesses, servers or a shared kit: seconds each

RES = 32


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


def _set(n: int, seed: int, tag: str) -> ImageSet:
    return ImageSet(_images(n, seed), [tag] * n, [f"{tag}{i}" for i in range(n)])


@dataclass
class Planted:
    """Own exemplars above the gallery; with favour="others", the model's other concepts'
    exemplars above those; and a query-blind control."""

    favour: str  # "own" or "others"
    name: str = "planted"
    needs_model: bool = False

    def prepare(
        self, pipe: Any, train: list, work: Path | None, progress: bool, *, model_key=None
    ) -> None:
        self.n_gallery, self.tags = len(train[0]), train[1].prompts

    def scores(self, pipe: Any, queries: ImageSet, progress: bool) -> np.ndarray:
        s = np.zeros((len(queries), self.n_gallery + len(self.tags)))
        for i, q in enumerate(queries.prompts):
            for j, t in enumerate(self.tags):
                s[i, self.n_gallery + j] = 1.0 if t == q else float(self.favour == "others") * 2
        return s

    def controls(self) -> dict[str, np.ndarray]:
        # random, not constant: the protocol counts only strictly higher scores, so a constant
        # score would rank every exemplar first
        return {"noise": np.random.default_rng(0).random(self.n_gallery + len(self.tags))}

    def storage_bytes_per_image(self) -> int:
        return 0


def _case(mid: str, tags: list[str], seed: int) -> ModelCase:
    concepts = [
        Concept(t, "object", _set(2, seed + k, t), {"a": _set(3, 50 + k, t)})
        for k, t in enumerate(tags)
    ]
    return ModelCase(mid, concepts, lambda: None)


def test_planted_scores_give_the_protocols_numbers():
    """Own exemplars first: mAP 1 in both galleries. A two-concept model's other concept
    first: mAP 1 in AbC's gallery (other concepts' exemplars are not in it) but (1/3 + 2/4) / 2
    in the model's (they are, ranked above); single-concept models are unaffected; other
    models' exemplars never count; a random control is far below."""
    gallery = _set(20, 0, "g")
    cases = [_case("m0", ["c0", "c1"], 1), _case("m1", ["c2"], 3)]
    own = evaluate_method(Planted("own"), cases, gallery, ks=(1, 2))
    for g in ("abc", "model"):
        assert own.results[g].summary()["a"]["mAP"] == pytest.approx(1.0)
    assert own.n_queries == 9
    others = evaluate_method(Planted("others"), cases, gallery, ks=(1, 2))
    assert others.results["abc"].summary()["a"]["mAP"] == pytest.approx(1.0)
    ap = others.results["model"].per_type["a"].ap
    ids = others.results["model"].per_type["a"].model_ids
    np.testing.assert_allclose(ap[ids < 2], (1 / 3 + 2 / 4) / 2)
    np.testing.assert_allclose(ap[ids == 2], 1.0)
    assert own.controls["noise"]["abc"].summary()["a"]["mAP"] < 0.5
    assert set(own.controls) == {"noise", "mean query"}
    assert own.chance["abc"] == pytest.approx(expected_random_ap(2, 22))
    model_chance = [expected_random_ap(2, 24), expected_random_ap(2, 24), expected_random_ap(2, 22)]
    assert own.chance["model"] == pytest.approx(np.mean(model_chance))


def test_select_queries_spreads_evenly():
    qs = {"a": _set(10, 0, "a"), "b": _set(10, 1, "b")}
    got = select_queries(qs, 5)
    assert [len(v) for v in got.values()] == [3, 2]
    assert got["a"].ids == ["a0", "a4", "a9"]
    assert select_queries(qs, None) is qs


# -- end to end on a make-benchmark folder ---------------------------------------------------


def _run(args: list[str]):
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    from genattr.customize.driver import make_benchmark

    root = tmp_path_factory.mktemp("mm")
    tiny = build_tiny_pipeline(root / "sd")
    ex = root / "ex"
    shape_image(ex / "disc.png", "disc", (200, 40, 30))
    shape_image(ex / "box.png", "box", (20, 160, 60))
    (root / "captions.json").write_text(json.dumps({"*": ["A <new1> {category} at dawn"]}))
    plan = {
        "name": "mini",
        "base": str(tiny),
        "device": "cpu",
        "dtype": "float32",
        "train": {"max_train_steps": 3, "resolution": RES, "initializer_token": "x"},
        "sample": {"steps": 2, "images_per_prompt": 2, "height": RES, "width": RES},
        "prompt_sets": {"object": ["captions"]},
        "captions": "captions.json",
        "models": [
            {"id": "disc0", "mode": "object", "category": "ball", "exemplars": ["ex/disc.png"],
             "split": "test"},
            {"id": "box0", "mode": "object", "category": "box", "exemplars": ["ex/box.png"],
             "split": "test"},
        ],
    }  # fmt: skip
    (root / "plan.json").write_text(json.dumps(plan))
    make_benchmark(root / "plan.json", root / "bench")
    gallery = root / "gallery"
    gallery.mkdir()
    colours = [(10, 10, 10), (250, 250, 0), (0, 200, 200), (120, 120, 120)]
    for i, c in enumerate(colours):
        shape_image(gallery / f"{i}.png", "box" if i % 2 else "disc", c)
    (root / "captions.txt").write_text("\n".join(f"a shape number {i}" for i in range(4)))
    return {"manifest": root / "bench" / "manifest.json", "gallery": gallery,
            "captions": root / "captions.txt", "root": root}  # fmt: skip


def _evaluate(bench: dict[str, Path], out: Path, *extra: str):
    return _run(
        ["evaluate", "--method", "gradient", "--bench", str(bench["manifest"]),
         "--gallery", str(bench["gallery"]), "--captions", str(bench["captions"]),
         "--out", str(out), "--proj-dim", "64", "--ks", "1", "2", *extra]
    )  # fmt: skip


@pytest.mark.slow
def test_evaluate_gradient_on_a_make_benchmark_folder(bench, tmp_path):
    out = tmp_path / "results.json"
    r = _evaluate(bench, out, "--work", str(tmp_path / "work"))
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["method"] == "gradient" and doc["n_queries"] == 4
    assert set(doc["controls"]) == {
        "smallest gradient",
        "self-influence",
        "lowest self-influence",
        "mean query",
    }
    assert set(doc["model_gallery"]) == set(doc["results"])
    assert doc["chance"]["abc"] == pytest.approx(expected_random_ap(1, 5))
    assert doc["storage_bytes_per_image"] == 256
    assert pq.read_table(tmp_path / doc["queries_file"]).num_rows == 4
    (ptype,) = doc["results"]  # the plan's one prompt set
    assert 0.0 < doc["results"][ptype]["mAP"] <= 1.0
    # one gradient store per model, complete; a second run reuses it, same numbers
    stores = sorted((tmp_path / "work" / "gradient").glob("*/gallery/store.json"))
    assert len(stores) == 2
    assert all(json.loads(s.read_text())["count"] == 4 for s in stores)
    mtimes = [os.stat(s).st_mtime_ns for s in stores]
    r = _evaluate(bench, tmp_path / "again.json", "--work", str(tmp_path / "work"))
    assert r.exit_code == 0, r.output
    assert [os.stat(s).st_mtime_ns for s in stores] == mtimes
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["results"] == doc["results"] and again["controls"] == doc["controls"]


@pytest.mark.slow
def test_stored_gradients_are_the_models_gradients(bench, tmp_path):
    """The cached store holds exactly `projected_gradients` of the gallery under the model."""
    from diffusers import DDPMScheduler

    from genattr.methods import GradientSpec, projected_gradients
    from genattr.store import EmbeddingStore
    from genattr.workflows.model_cases import encode, folder_gallery, manifest_cases, model_key
    from genattr.workflows.model_methods import GradientMethod, gradient_store

    case = manifest_cases(bench["manifest"], ["box0"])[0]
    model = case.load()
    assert model.key == model_key(bench["root"] / "bench" / "models" / "box0")
    pipe = model.pipe
    source = folder_gallery(bench["gallery"], bench["captions"], RES)
    spec = GradientSpec(proj_dim=32)
    store = gradient_store(
        pipe, source, spec, tmp_path / "g", model_key=model.key, batch=3, shard_size=2
    )
    assert store.num_shards == 2 and store.ids == source.ids
    latents, text = encode(pipe, *source.block(0, len(source)))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    want = projected_gradients(pipe.unet, sched, latents, text, spec)
    np.testing.assert_allclose(np.asarray(store.vectors), want, rtol=1e-5, atol=1e-7)
    # another spec, or another model, is refused
    with pytest.raises(Exception, match="holds"):
        gradient_store(
            pipe, source, GradientSpec(proj_dim=32, seed=1), tmp_path / "g", model_key=model.key
        )
    with pytest.raises(Exception, match="holds"):
        gradient_store(pipe, source, spec, tmp_path / "g", model_key="another-model")
    assert EmbeddingStore.open(tmp_path / "g").count == 4
    with pytest.raises(GenattrError, match="model's key"):  # nothing is kept unkeyed
        GradientMethod(spec).prepare(pipe, [source], tmp_path / "h", False)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "gradient"], "needs --bench"),
        (["--method", "gradient", "--bench", "x.json"], "needs --gallery"),
        (["--method", "telepathy", "--bench", "world"], "--method must be one of"),
        (["--method", "gradient", "--bench", "world", "--kernel", "rbf"], "--kernel must be"),
        (["--method", "gradient", "--bench", "world", "--proj-dim", "0"], "proj_dim"),
        (["--method", "gradient", "--bench", "world", "--queries", "0"], "--queries"),
        (["--method", "gradient", "--bench", "world", "--models", "nope"], "no world model"),
        (["--method", "gradient", "--bench", "world-multiconcept", "--models", "x"], "no multi"),
        ([], "needs --gallery-feats"),
    ],
)
def test_bad_method_options_are_one_line(args, words, tmp_path):
    r = _run(["evaluate", "--out", str(tmp_path / "r.json"), *args])
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_attribute_with_gradients_under_the_model(bench, tmp_path):
    """`genattr attribute --method gradient`: the prompt read from the image, the gallery
    ranked by score under the model, the gradient store cached for the next call."""
    root = bench["root"]
    query = sorted((root / "bench" / "synth").rglob("disc0/samples/*.png"))[0]
    args = [
        "attribute", str(query), "--method", "gradient", "--model",
        str(root / "bench" / "models" / "disc0"), "--base", str(root / "sd"),
        "--gallery", str(bench["gallery"]), "--captions", str(bench["captions"]),
        "--work", str(tmp_path / "work"), "--proj-dim", "64", "--top-k", "3",
        "--format", "json", "--out", str(tmp_path / "a.json"),
    ]  # fmt: skip
    r = _run(args)
    assert r.exit_code == 0, r.output
    (answer,) = json.loads((tmp_path / "a.json").read_text())
    scores = [x["similarity"] for x in answer["results"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert {x["id"] for x in answer["results"]} <= {f"{i}.png" for i in range(4)}
    assert "gradient" in answer["notes"][0]
    from genattr.workflows.model_cases import model_key

    key = model_key(root / "bench" / "models" / "disc0")  # the cache is named by the model
    store = tmp_path / "work" / "gradient" / key / "gallery" / "store.json"
    assert json.loads(store.read_text())["preprocess_config"]["model_key"] == key
    before = os.stat(store).st_mtime_ns
    assert _run([*args[:-1], str(tmp_path / "b.json")]).exit_code == 0
    assert os.stat(store).st_mtime_ns == before
    assert json.loads((tmp_path / "b.json").read_text())[0]["results"] == answer["results"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "gradient"], "needs --model"),
        (["--method", "gradient", "--model", "m"], "needs --base, --gallery and --captions"),
        (["--method", "gradient", "--model", "world:object-000", "--device", "tpu"], "tpu"),
        (["--method", "gradient", "--model", "world:nope"], "no world model"),
        ([], "needs --index"),
        (["--method", "gradient", "--model", "world:object-000"], "q.png: no such image"),
    ],
)
def test_bad_attribute_method_options_are_one_line(args, words, tmp_path):
    if "no such image" not in words:  # a real query, so the option is what is refused
        shape_image(tmp_path / "q.png", "disc", (1, 2, 3))
    r = _run(["attribute", str(tmp_path / "q.png"), *args])
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_evaluate_unlearning_on_a_make_benchmark_folder(bench, tmp_path):
    out = tmp_path / "results.json"
    r = _run(
        ["evaluate", "--method", "unlearning", "--bench", str(bench["manifest"]),
         "--gallery", str(bench["gallery"]), "--captions", str(bench["captions"]),
         "--out", str(out), "--steps", "2", "--queries", "1", "--ks", "1", "2"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["method"] == "unlearning" and doc["n_queries"] == 2
    assert set(doc["controls"]) == {"lowest loss", "mean query"}
    assert doc["settings"]["steps"] == 2


@pytest.mark.slow
def test_unlearning_flip_max_is_the_larger_of_both_views(bench):
    """With flips every score is the larger loss change of an image and its mirror: never
    below the plain score, above it somewhere."""
    from genattr.methods.unlearning import UnlearningSpec
    from genattr.workflows.model_cases import folder_gallery, manifest_cases
    from genattr.workflows.model_methods import UnlearningMethod

    case = manifest_cases(bench["manifest"], ["disc0"], queries=1)[0]
    pipe = case.load().pipe
    source = folder_gallery(bench["gallery"], bench["captions"], RES)
    (queries,) = case.concepts[0].queries.values()
    got = {}
    for flip in (False, True):
        m = UnlearningMethod(UnlearningSpec(steps=2, samples_per_step=2, flip=flip))
        m.prepare(pipe, [source, case.exemplars()], None, False)
        got[flip] = m.scores(pipe, queries, False)
    assert got[True].shape == got[False].shape == (1, 5)
    assert (got[True] >= got[False] - 1e-12).all()
    assert (got[True] > got[False]).any()


def test_multiconcept_cases_read_the_pack():
    """Each multi-concept model: its K concepts, each with its own exemplars and queries under
    its own token, queries shared evenly over prompt types."""
    from genattr.workflows.model_cases import multiconcept_cases

    cases = multiconcept_cases("unused", queries=2)
    assert len(cases) == 4 and all(len(c.concepts) == 4 for c in cases)
    for case in cases:
        tokens = set()
        for k in case.concepts:
            assert [len(q) for q in k.queries.values()] == [1, 1]
            (token,) = {w for w in k.exemplars.prompts[0].split() if w.startswith("<new")}
            assert all(token in p for q in k.queries.values() for p in q.prompts)
            tokens.add(token)
        assert len(tokens) == 4
        assert len(case.exemplars()) == sum(len(k.exemplars) for k in case.concepts)


@pytest.mark.slow
def test_attribute_by_unlearning_ranks_the_training_folder(bench, tmp_path):
    root = bench["root"]
    query = sorted((root / "bench" / "synth").rglob("box0/samples/*.png"))[0]
    r = _run(
        ["attribute", str(query), "--method", "unlearning", "--steps", "2", "--model",
         str(root / "bench" / "models" / "box0"), "--base", str(root / "sd"),
         "--gallery", str(bench["gallery"]), "--captions", str(bench["captions"]),
         "--work", str(tmp_path / "work"), "--top-k", "4", "--format", "json",
         "--out", str(tmp_path / "a.json")]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (answer,) = json.loads((tmp_path / "a.json").read_text())
    scores = [x["similarity"] for x in answer["results"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert "unlearning" in answer["notes"][0]
