"""Bad input, command by command, from one table: each case is (command line, words the one
error line must hold). Every case must exit with code 2, print no traceback and leave no
output behind. The kit is a small but sensible project (a 60-image gallery, 12 customized
models): the same commands with good options must work on it."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from genattr.cli import app
from genattr.data.benchmark import BenchmarkManifest, CustomizedModel, write_manifest
from genattr.data.official import save_gallery_pth, save_testcase_pth
from tests.support import drawing
from tests.synthetic import make_synthetic_benchmark

pytestmark = pytest.mark.slow  # subprocesses, servers or a shared kit: seconds each

runner = CliRunner()
N_GALLERY = 60


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    """Images, pixel stores, a manifest, a head, a calibrator and an index, all good."""
    d = tmp_path_factory.mktemp("kit")
    train, synth = d / "train", d / "synth"
    train.mkdir()
    synth.mkdir()
    for i in range(N_GALLERY):
        drawing(i).save(train / f"img_{i:03d}.png")
    models = []
    for m in range(12):
        paths = []
        for k in range(3):
            p = synth / f"m{m:02d}_{k}.png"
            drawing(m).rotate(5 * (k + 1)).save(p)
            paths.append(str(p))
        split = "train" if m < 6 else "val" if m < 9 else "test"
        ex = [str(train / f"img_{m:03d}.png")]
        models.append(CustomizedModel(f"m{m}", ex, {"media": paths}, "drawing", "object", split))
    write_manifest(BenchmarkManifest("drawings", models), d / "bench.json")
    for name, folder in (("train", train), ("synth", synth)):
        res = invoke("extract", "--features", "pixel", "--images", folder, "--out",
                     d / f"store_{name}", "--workers", "0", "--no-progress")  # fmt: skip
        assert res.exit_code == 0, res.output
    res = invoke("train-head", *stores(d), "--epochs", "2", "--batch-size", "8",
                 "--out", d / "head")  # fmt: skip
    assert res.exit_code == 0, res.output
    res = invoke("calibrate", *stores(d), "--head", d / "head", "--out", d / "cal.json")
    assert res.exit_code == 0, res.output  # the default --top-l 100 on a 60-image gallery
    res = invoke("index", "build", "--store", d / "store_train", "--head", d / "head",
                 "--out", d / "index", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return d


def stores(d: Path) -> list:
    return ["--bench", d / "bench.json", "--store-real", d / "store_train",
            "--store-synth", d / "store_synth", "--distractors", d / "store_train"]  # fmt: skip


def nan_store(d: Path) -> Path:
    """The gallery store with one NaN row, written into its shard after the fact (stores
    refuse NaN on append, so only a damaged or hand-made file holds one)."""
    out = d / "store_nan"
    if not out.exists():
        shutil.copytree(d / "store_train", out)
        shard = np.load(out / "img_emb" / "img_emb_0.npy", mmap_mode="r+")
        shard[7, 3] = np.nan
        shard.flush()
    return out


def text_file(d: Path, name: str, text: str = "not what you think\n") -> Path:
    p = d / "bad" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p


def pth(d: Path, name: str) -> Path:
    """The authors' feature files, good and damaged, from a small synthetic benchmark."""
    p = d / "bad" / name
    if not p.exists():
        p.parent.mkdir(exist_ok=True)
        bench = make_synthetic_benchmark()
        save_gallery_pth(bench.gallery, d / "bad" / "gallery.pth")
        save_testcase_pth(bench.testcase, d / "bad" / "test.pth")
        dim = bench.gallery.feats.shape[1]
        torch.save({"feats": torch.zeros(0, dim), "paths": []}, d / "bad" / "gallery_empty.pth")
        complex_feats = bench.gallery.feats.to(torch.complex64)
        torch.save({"feats": complex_feats, "paths": []}, d / "bad" / "gallery_complex.pth")
        tc = torch.load(d / "bad" / "test.pth", weights_only=True)
        first = next(iter(tc["synth_ids"]))
        tc["synth_ids"][first] = [i + 0.7 for i in tc["synth_ids"][first]]
        torch.save(tc, d / "bad" / "test_float_ids.pth")
    return p


def manifest(d: Path, name: str, mutate) -> Path:
    doc = json.loads((d / "bench.json").read_text())
    mutate(doc)
    p = d / "bad" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps(doc))
    return p


def plan(d: Path, name: str, model: dict | None = None, **top) -> Path:
    """A make-benchmark plan over the kit's images, changed at the top level or in its model."""
    entry = {"id": "m0", "category": "drawing", "exemplars": [str(d / "train" / "img_000.png")]}
    doc = {"base": str(d / "no-model"), "prompt_sets": {"object": ["media"]},
           "models": [{**entry, **(model or {})}], **top}  # fmt: skip
    p = d / "bad" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps(doc))
    return p


def make_benchmark(plan_path: Path, o: Path) -> list:
    return ["make-benchmark", "--plan", plan_path, "--out", o]


# An output under /proc: its parent exists but nothing can be created there, whoever runs.
PROC_OUT = Path("/proc/genattr-out/result")

# Each case: a function of the kit folder and an output path -> (argv, words in the error).
CASES = {
    # -- train-head -----------------------------------------------------------------------
    "train-head --lr -1": lambda d, o: (
        ["train-head", *stores(d), "--lr", "-1", "--out", o], "lr"),
    "train-head --lr nan": lambda d, o: (
        ["train-head", *stores(d), "--lr", "nan", "--out", o], "lr"),
    "train-head --batch-size 0": lambda d, o: (
        ["train-head", *stores(d), "--batch-size", "0", "--out", o], "batch_size"),
    "train-head --temperature 0": lambda d, o: (
        ["train-head", *stores(d), "--temperature", "0", "--out", o], "temperature"),
    "train-head --temperature nan": lambda d, o: (
        ["train-head", *stores(d), "--temperature", "nan", "--out", o], "temperature"),
    "train-head --epochs 0": lambda d, o: (
        ["train-head", *stores(d), "--epochs", "0", "--out", o], "epochs"),
    "train-head --head cnn": lambda d, o: (
        ["train-head", *stores(d), "--head", "cnn", "--out", o], "cnn"),
    "train-head manifest synth a list": lambda d, o: (
        ["train-head", *stores(d)[2:], "--bench",
         manifest(d, "synth_list.json", lambda m: m["models"][0].update(synth=["a.png"])),
         "--out", o], "synth"),
    "train-head manifest without models": lambda d, o: (
        ["train-head", *stores(d)[2:], "--bench",
         manifest(d, "no_models.json", lambda m: m.update(models=[])), "--out", o], "models"),
    "train-head --out is a file": lambda d, o: (
        ["train-head", *stores(d), "--out", text_file(d, "a_file")], "a_file"),
    # -- calibrate ------------------------------------------------------------------------
    "calibrate --heldout-fraction 1.5": lambda d, o: (
        ["calibrate", *stores(d), "--heldout-fraction", "1.5", "--out", o], "heldout"),
    "calibrate --top-l 0": lambda d, o: (
        ["calibrate", *stores(d), "--top-l", "0", "--out", o], "top"),
    "calibrate NaN gallery row": lambda d, o: (
        ["calibrate", *stores(d)[:-1], nan_store(d), "--out", o], "NaN"),
    "calibrate --out is a folder": lambda d, o: (
        ["calibrate", *stores(d), "--out", d / "head"], "head"),
    # -- index build ----------------------------------------------------------------------
    "index --memory-budget 0": lambda d, o: (
        ["index", "build", "--store", d / "store_train", "--memory-budget", "0",
         "--out", o], "memory"),
    "index --kind ivfpq on 60 images": lambda d, o: (
        ["index", "build", "--store", d / "store_train", "--kind", "ivfpq", "--out", o],
        "ivfpq"),
    "index --kind hnsw": lambda d, o: (
        ["index", "build", "--store", d / "store_train", "--kind", "hnsw", "--out", o], "hnsw"),
    "index NaN row": lambda d, o: (
        ["index", "build", "--store", nan_store(d), "--out", o], "NaN"),
    "index mapper that is text": lambda d, o: (
        ["index", "build", "--store", d / "store_train", "--head",
         text_file(d, "mapper.pth"), "--out", o], "mapper.pth"),
    "index --out is a file": lambda d, o: (
        ["index", "build", "--store", d / "store_train", "--out", text_file(d, "b_file")],
        "b_file"),
    # -- attribute ------------------------------------------------------------------------
    "attribute --device tpu": lambda d, o: (
        ["attribute", d / "synth" / "m10_0.png", "--index", d / "index", "--device", "tpu",
         "--format", "json", "--out", o], "tpu"),
    "attribute --device cuda without CUDA": lambda d, o: (
        ["attribute", d / "synth" / "m10_0.png", "--index", d / "index", "--device", "cuda",
         "--format", "json", "--out", o], "cuda"),
    "attribute --top-k 0": lambda d, o: (
        ["attribute", d / "synth" / "m10_0.png", "--index", d / "index", "--top-k", "0",
         "--format", "json", "--out", o], "top"),
    "attribute calibrator that is text": lambda d, o: (
        ["attribute", d / "synth" / "m10_0.png", "--index", d / "index", "--calibrator",
         text_file(d, "cal.pth"), "--format", "json", "--out", o], "cal.pth"),
    # -- evaluate -------------------------------------------------------------------------
    "evaluate mapper that is text": lambda d, o: (
        ["evaluate", "--gallery-feats", d / "store_train", "--test-feats", d / "store_train",
         "--mapper", text_file(d, "m.pth"), "--out", o], "m.pth"),
    "evaluate empty gallery": lambda d, o: (
        ["evaluate", "--gallery-feats", pth(d, "gallery_empty.pth"), "--test-feats",
         pth(d, "test.pth"), "--out", o], "empty"),
    "evaluate complex features": lambda d, o: (
        ["evaluate", "--gallery-feats", pth(d, "gallery_complex.pth"), "--test-feats",
         pth(d, "test.pth"), "--out", o], "complex"),
    "evaluate float synth_ids": lambda d, o: (
        ["evaluate", "--gallery-feats", pth(d, "gallery.pth"), "--test-feats",
         pth(d, "test_float_ids.pth"), "--out", o], "integers"),
    "evaluate gallery feats that are text": lambda d, o: (
        ["evaluate", "--gallery-feats", text_file(d, "g.pth", "hello world\n"), "--test-feats",
         pth(d, "test.pth"), "--out", o], "not a torch.save file"),
    "evaluate test feats that are a table": lambda d, o: (
        ["evaluate", "--gallery-feats", pth(d, "gallery.pth"), "--test-feats",
         text_file(d, "t.pth", "a,b,c\n1,2,3\n"), "--out", o], "not a torch.save file"),
    "evaluate mapper that is a table": lambda d, o: (
        ["evaluate", "--gallery-feats", pth(d, "gallery.pth"), "--test-feats",
         pth(d, "test.pth"), "--mapper", text_file(d, "m2.pth", "a,b,c\n1,2,3\n"),
         "--out", o], "not a torch.save file"),
    "evaluate --device tpu": lambda d, o: (
        ["evaluate", "--gallery-feats", d / "store_train", "--test-feats", d / "store_train",
         "--device", "tpu", "--out", o], "tpu"),
    # -- outputs that cannot be created -----------------------------------------------------
    "evaluate --out under /proc": lambda d, o: (
        ["evaluate", "--gallery-feats", pth(d, "gallery.pth"), "--test-feats",
         pth(d, "test.pth"), "--out", PROC_OUT], "cannot create"),
    "attribute --out under /proc": lambda d, o: (
        ["attribute", d / "synth" / "m10_0.png", "--index", d / "index", "--format", "json",
         "--out", PROC_OUT], "cannot create"),
    "calibrate --out under /proc": lambda d, o: (
        ["calibrate", *stores(d), "--out", PROC_OUT], "cannot create"),
    "train-head --out under /proc": lambda d, o: (
        ["train-head", *stores(d), "--out", PROC_OUT], "cannot create"),
    "index --out under /proc": lambda d, o: (
        ["index", "build", "--store", d / "store_train", "--out", PROC_OUT], "cannot create"),
    "extract --out under /proc": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--out", PROC_OUT],
        "cannot create"),
    "make-benchmark --out under /proc": lambda d, o: (
        make_benchmark(plan(d, "good.json"), PROC_OUT), "cannot create"),
    # -- make-benchmark plans: every field typed, the base model loaded before any file ------
    "plan split fractions not numbers": lambda d, o: (
        make_benchmark(plan(d, "p1.json", split={"train": "most"}), o), "split.train"),
    "plan split a list": lambda d, o: (
        make_benchmark(plan(d, "p2.json", split=[0.5, 0.5]), o), "split"),
    "plan split fraction above 1": lambda d, o: (
        make_benchmark(plan(d, "p3.json", split={"train": 2, "val": -1}), o), "split.train"),
    "plan train section a list": lambda d, o: (
        make_benchmark(plan(d, "p4.json", train=[1]), o), "train"),
    "plan sample section a number": lambda d, o: (
        make_benchmark(plan(d, "p5.json", sample=5), o), "sample"),
    "plan prompt_sets a list": lambda d, o: (
        make_benchmark(plan(d, "p6.json", prompt_sets=["media"]), o), "prompt_sets"),
    "plan prompt_sets of an unknown mode": lambda d, o: (
        make_benchmark(plan(d, "p7.json", prompt_sets={"objects": ["media"]}), o),
        "prompt_sets"),
    "plan model train a list": lambda d, o: (
        make_benchmark(plan(d, "p8.json", {"train": [1]}), o), "model 'm0': train"),
    "plan model category a list": lambda d, o: (
        make_benchmark(plan(d, "p9.json", {"category": ["dog"]}), o), "category"),
    "plan model with a misspelt key": lambda d, o: (
        make_benchmark(plan(d, "p10.json", {"smaple": {}}), o), "smaple"),
    "plan model not a mapping": lambda d, o: (
        make_benchmark(plan(d, "p11.json", models=[5]), o), "model 0: must be a mapping"),
    "plan base model that cannot load": lambda d, o: (
        make_benchmark(plan(d, "good.json"), o), "base model"),
    # -- commands that make models, benchmarks and heads ----------------------------------
    "customize --out is a file": lambda d, o: (
        ["customize", "--base", d / "no-model", "--exemplars", d / "train" / "img_000.png",
         "--mode", "object", "--category", "x", "--out", text_file(d, "d_file")], "d_file"),
    "demo --out is a file": lambda d, o: (["demo", "--out", text_file(d, "e_file")], "e_file"),
    "head export --out is a folder": lambda d, o: (
        ["head", "export", "--head", d / "head", "--out", d / "head"], "is a folder"),
    # -- serve ----------------------------------------------------------------------------
    "serve --max-upload-mb nan": lambda d, o: (
        ["serve", "--index", d / "index", "--max-upload-mb", "nan"], "max-upload-mb"),
    "serve --threads -3": lambda d, o: (
        ["serve", "--index", d / "index", "--threads", "-3"], "--threads must be at least 1"),
    "serve --threads 0": lambda d, o: (
        ["serve", "--index", d / "index", "--threads", "0"], "--threads must be at least 1"),
    "serve --device cuda without CUDA": lambda d, o: (
        ["serve", "--index", d / "index", "--device", "cuda"], "cuda"),
    # -- extract --------------------------------------------------------------------------
    "extract --batch-size 0": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--batch-size", "0",
         "--out", o], "batch"),
    "extract --device tpu": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--device", "tpu",
         "--out", o], "tpu"),
    "extract --device cuda without CUDA": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--device", "cuda",
         "--out", o], "cuda"),
    "extract --threads -3": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--threads", "-3",
         "--out", o], "--threads must be at least 1"),
    "extract --threads 0": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--threads", "0",
         "--out", o], "--threads must be at least 1"),
    "extract --workers -2": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--workers", "-2",
         "--out", o], "--workers must be 0 or more"),
    "extract --out is a file": lambda d, o: (
        ["extract", "--features", "pixel", "--images", d / "train", "--out",
         text_file(d, "c_file")], "c_file"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(kit, tmp_path, case):
    if "without CUDA" in case and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    if "/proc" in case and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    out = tmp_path / "out"
    argv, words = CASES[case](kit, out)
    before = {p for p in kit.rglob("*")}
    res = invoke(*argv)
    assert res.exit_code == 2, (case, res.output)
    assert "Traceback" not in res.output, (case, res.output)
    assert isinstance(res.exception, SystemExit | None), (case, res.exception)
    assert words.lower() in res.output.lower(), (case, res.output)
    assert not out.exists(), (case, os.listdir(out) if out.is_dir() else out)
    new = {p for p in kit.rglob("*")} - before
    assert all(p.parent.name == "bad" or p.name == "store_nan" or "store_nan" in p.parts
               for p in new), (case, new)  # fmt: skip
    if case.endswith("is a file"):
        assert (kit / "bad" / argv[-1].name).read_text() == "not what you think\n"


def test_small_project_with_defaults_works(kit, tmp_path):
    """The kit itself: default --top-l on a 60-image gallery, an attribution and an evaluation."""
    cal = json.loads((kit / "cal.json").read_text())
    assert cal["fit_report"]["top_l"] == N_GALLERY + 1  # shrunk: every image + the exemplar
    res = invoke("attribute", kit / "synth" / "m10_0.png", "--index", kit / "index",
                 "--calibrator", kit / "cal.json", "--format", "json", "--out",
                 tmp_path / "a.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    shutil.rmtree(tmp_path)


def _raising(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def test_a_bug_is_one_line_with_exit_1_and_its_traceback_behind_debug(kit, tmp_path, monkeypatch):
    import genattr.workflows.evaluate

    monkeypatch.setattr(genattr.workflows.evaluate, "evaluate_files", _raising(ValueError("boom")))
    argv = ["evaluate", "--gallery-feats", pth(kit, "gallery.pth"), "--test-feats",
            pth(kit, "test.pth"), "--out", tmp_path / "r.json"]  # fmt: skip
    res = invoke(*argv)
    assert res.exit_code == 1, res.output
    assert "internal error" in res.output and "ValueError: boom" in res.output
    assert "--debug" in res.output and "Traceback" not in res.output
    res = invoke("--debug", *argv)
    assert isinstance(res.exception, ValueError) and str(res.exception) == "boom"
    res = invoke(*argv)  # --debug holds for its own command only
    assert res.exit_code == 1 and "internal error" in res.output


def test_a_full_disk_is_one_line_with_exit_2(kit, tmp_path, monkeypatch):
    import genattr.workflows.evaluate

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r.json"))
    monkeypatch.setattr(genattr.workflows.evaluate, "evaluate_files", _raising(full))
    res = invoke("evaluate", "--gallery-feats", pth(kit, "gallery.pth"), "--test-feats",
                 pth(kit, "test.pth"), "--out", tmp_path / "r.json")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "r.json: No space left on device" in res.output and "internal" not in res.output


def test_extract_onto_a_full_disk_is_one_line_and_resumes(kit, tmp_path, monkeypatch):
    """numpy's short write carries no errno: it was called a bug. Now one line and exit 2, and
    the store, resumed once there is room, equals one never interrupted."""
    import genattr.atomic
    import genattr.store.embedding_store as es

    real_save = es.np.save
    calls = []

    def short_write(f, arr):
        calls.append(1)
        if len(calls) > 1:  # the first shard fits, the second does not
            f.write(b"\x93NUMPY")
            raise OSError(f"{arr.nbytes} requested and 6 written")
        real_save(f, arr)

    class Full:
        f_frsize, f_bavail = 4096, 0

    out = tmp_path / "store"
    argv = ["extract", "--features", "pixel", "--images", kit / "train", "--out", out,
            "--workers", "0", "--no-progress", "--shard-size", "16"]  # fmt: skip
    monkeypatch.setattr(es.np, "save", short_write)
    monkeypatch.setattr(genattr.atomic.os, "statvfs", lambda p: Full())
    res = invoke(*argv)
    assert res.exit_code == 2, res.output
    assert "img_emb_1.npy: No space left on device" in res.output, res.output
    assert "internal" not in res.output and len(res.output.strip().splitlines()) == 1
    monkeypatch.undo()
    assert invoke(*argv).exit_code == 0
    whole = tmp_path / "whole"
    assert invoke(*argv[:-6], whole, *argv[-5:]).exit_code == 0
    a, b = es.EmbeddingStore.open(out), es.EmbeddingStore.open(whole)
    assert a.ids == b.ids and a.count == N_GALLERY
    np.testing.assert_array_equal(np.asarray(a.vectors), np.asarray(b.vectors))


@pytest.mark.parametrize(
    ("module", "extra", "argv"),
    [
        ("fastapi", "serve", ["serve", "--index", "nowhere"]),
        ("diffusers", "customize", ["world", "quality", "--pipeline", "."]),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, module, extra, argv):
    """As if the extra were not installed (the module blocked in a fresh process)."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.modules[{module!r}] = None; sys.argv = ['genattr', *{argv!r}]; "
        "from genattr.cli import app; app()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "[transformers]" not in ln]
    assert lines == [
        f"error: this needs {module}, from genattr's '{extra}' extra: "
        f"pip install 'genattr[{extra}]'"
    ], r.stderr
