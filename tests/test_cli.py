import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from genattr.cli import app
from genattr.data.official import save_gallery_pth, save_testcase_pth
from genattr.evaluate import evaluate_reference
from genattr.heads.checkpoint import save_mapper_pth, write_head_folder
from genattr.store import convert
from tests.synthetic import make_synthetic_benchmark

runner = CliRunner()


@pytest.fixture
def bench_files(tmp_path):
    bench = make_synthetic_benchmark(
        n_gallery=3000,
        dim=16,
        n_object_models=6,
        n_style_models=3,
        queries_per_model={"media": 4, "gpt": 2},
    )
    save_gallery_pth(bench.gallery, tmp_path / "gallery.pth")
    save_testcase_pth(bench.testcase, tmp_path / "test.pth")
    save_mapper_pth(bench.oracle_mappers, tmp_path / "mapper.pth")
    return bench, tmp_path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_evaluate_writes_results(bench_files):
    bench, d = bench_files
    out = d / "res" / "results.json"
    res = run(
        "evaluate",
        "--gallery-feats",
        d / "gallery.pth",
        "--test-feats",
        d / "test.pth",
        "--mapper",
        d / "mapper.pth",
        "--head",
        "linear",
        "--ks",
        5,
        10,
        100,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["format_version"] == 1
    ref = evaluate_reference(bench.gallery.feats, bench.testcase, mappers=bench.oracle_mappers)
    for ptype, summary in ref.summary().items():
        got = doc["results"][ptype]
        assert got["n_queries"] == summary["n_queries"]
        assert got["mAP"] == pytest.approx(summary["mAP"], abs=1e-9)
        assert set(got["recall"]) == {"5", "10", "100"}
        for k, v in summary["recall"].items():
            assert got["recall"][k] == pytest.approx(v, abs=1e-9)
    table = pq.read_table(d / "res" / "results.queries.parquet").to_pydict()
    media = [i for i, p in enumerate(table["prompt_type"]) if p == "media"]
    assert len(media) == ref.per_type["media"].n_queries
    np.testing.assert_allclose([table["ap"][i] for i in media], ref.per_type["media"].ap, atol=1e-9)
    assert table["query_path"][0] == bench.testcase.synth_paths["media"][0]
    assert "mAP" in res.output and "media" in res.output


def test_ks_repeated_or_space_separated_and_default_head(bench_files):
    _, d = bench_files
    out = d / "r.json"
    res = run(
        "evaluate",
        "--gallery-feats",
        d / "gallery.pth",
        "--test-feats",
        d / "test.pth",
        "--mapper",
        d / "mapper.pth",
        "--ks",
        1,
        "--ks",
        3,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["ks"] == [1, 3]
    assert json.loads(out.read_text())["head"] == "linear"
    res = evaluate_cli(d, out.name, "--ks", "2", "4", "--ks", "6", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["ks"] == [2, 4, 6]
    res = evaluate_cli(d, out.name, "--ks", "2", "--no-such-option")
    assert res.exit_code == 2 and "no-such-option" in res.output


def _bad_input_cases(d):
    """Each case: (what is written, extra CLI args, text the error must contain)."""
    tc = torch.load(d / "test.pth", weights_only=True)
    cases = {}

    def variant(name, mutate):
        obj = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tc.items()}
        mutate(obj)
        torch.save(obj, d / f"{name}.pth")
        return d / f"{name}.pth"

    def nan(o):
        t = o["synth_tensors"]["media"].clone()
        t[2, 3] = float("nan")
        o["synth_tensors"]["media"] = t

    def empty_model(o):
        chunks = list(o["exemplar_chunks"])
        chunks[1] = (chunks[1][0], chunks[1][0])
        o["exemplar_chunks"] = chunks

    def bad_id(o):
        o["synth_ids"]["gpt"] = [*o["synth_ids"]["gpt"][:-1], 999]

    def wrong_dim(o):
        o["exemplar_tensors"] = o["exemplar_tensors"][:, :8]
        o["synth_tensors"] = {k: v[:, :8] for k, v in o["synth_tensors"].items()}

    cases["nan"] = (variant("nan", nan), "NaN or Inf")
    cases["empty"] = (variant("empty", empty_model), "model 1 has no exemplars")
    cases["bad_id"] = (variant("bad_id", bad_id), "refers to model 999")
    cases["dim"] = (variant("dim", wrong_dim), "dimension mismatch")
    raw = (d / "test.pth").read_bytes()
    (d / "cut.pth").write_bytes(raw[: len(raw) // 3])
    cases["truncated"] = (d / "cut.pth", "cannot read")
    return cases


@pytest.mark.parametrize("case", ["nan", "empty", "bad_id", "dim", "truncated"])
def test_bad_test_case_files(bench_files, case):
    _, d = bench_files
    path, message = _bad_input_cases(d)[case]
    out = d / "out" / "results.json"
    res = run("evaluate", "--gallery-feats", d / "gallery.pth", "--test-feats", path, "--out", out)
    assert res.exit_code == 2
    assert message in res.output and path.name in res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not (d / "out" / "results.queries.parquet").exists()


def test_bad_gallery_and_mapper(bench_files):
    bench, d = bench_files
    feats = bench.gallery.feats.clone()
    feats[1234, 0] = float("inf")
    torch.save({"feats": feats, "paths": bench.gallery.paths}, d / "inf.pth")
    out = d / "o.json"
    res = run(
        "evaluate", "--gallery-feats", d / "inf.pth", "--test-feats", d / "test.pth", "--out", out
    )
    assert res.exit_code == 2 and "inf.pth" in res.output and "row 1234" in res.output
    torch.save(
        {
            "real_mapper": {"weights": torch.ones(1, 32)},
            "synth_mapper": {"weights": torch.ones(1, 32)},
        },
        d / "m32.pth",
    )
    res = run(
        "evaluate",
        "--gallery-feats",
        d / "gallery.pth",
        "--test-feats",
        d / "test.pth",
        "--mapper",
        d / "m32.pth",
        "--out",
        out,
    )
    assert res.exit_code == 2 and "m32.pth" in res.output and "32-d" in res.output
    assert not out.exists()


@pytest.mark.slow
def test_real_process_exit_code(bench_files):
    _, d = bench_files
    (d / "junk.pth").write_bytes(b"not a torch file at all")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "genattr.cli",
            "evaluate",
            "--gallery-feats",
            d / "junk.pth",
            "--test-feats",
            d / "test.pth",
            "--out",
            d / "r.json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "junk.pth" in proc.stderr and "Traceback" not in proc.stderr
    assert not (d / "r.json").exists()


def test_evaluate_on_stores_equals_pth(bench_files):

    _, d = bench_files
    convert.gallery_pth_to_store(d / "gallery.pth", d / "gstore", "synthetic", shard_size=1000)
    convert.testcase_pth_to_store(d / "test.pth", d / "tstore", "synthetic")
    for gallery, test, out in [
        ("gallery.pth", "test.pth", "a.json"),
        ("gstore", "tstore", "b.json"),
    ]:
        res = run(
            "evaluate",
            "--gallery-feats",
            d / gallery,
            "--test-feats",
            d / test,
            "--mapper",
            d / "mapper.pth",
            "--out",
            d / out,
        )
        assert res.exit_code == 0, res.output
    a, b = (json.loads((d / f).read_text())["results"] for f in ("a.json", "b.json"))
    assert a == b
    convert.testcase_pth_to_store(d / "test.pth", d / "other", "another-backbone")
    res = run(
        "evaluate",
        "--gallery-feats",
        d / "gstore",
        "--test-feats",
        d / "other",
        "--out",
        d / "c.json",
    )
    assert res.exit_code == 2 and "another-backbone" in res.output


def evaluate_cli(d, out, *extra):
    """`genattr evaluate` on the fixture's gallery and test-case files."""
    return run(
        "evaluate", "--gallery-feats", d / "gallery.pth", "--test-feats", d / "test.pth",
        *extra, "--out", d / out,
    )  # fmt: skip


def test_evaluate_takes_a_head_folder_as_the_mapper(bench_files):
    """`--mapper` accepts genattr's head folder as well as the authors' `.pth`: same results."""
    bench, d = bench_files
    write_head_folder(bench.oracle_mappers, d / "head", backbone="synthetic")
    for mapper, out in (
        (d / "mapper.pth", "pth.json"),
        (d / "head", "folder.json"),
        (None, "raw.json"),
    ):
        res = evaluate_cli(d, out, *([] if mapper is None else ["--mapper", mapper]))
        assert res.exit_code == 0, res.output
    a, b, raw = (
        json.loads((d / f).read_text())["results"] for f in ("pth.json", "folder.json", "raw.json")
    )
    assert a == b and a != raw  # the folder's head was applied, exactly as the .pth's
    res = evaluate_cli(d, "x.json", "--mapper", d / "head", "--head", "mlp")
    assert res.exit_code == 2 and "not mlp" in res.output


def test_demo_refuses_an_unknown_head_before_any_work(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--head", "conv"])
    assert res.exit_code == 2
    assert "unknown head 'conv'" in res.output and "channel" in res.output
    assert not (tmp_path / "d").exists()
