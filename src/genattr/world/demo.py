"""`genattr demo`: the whole evaluation path on a built-in world, end to end, on a laptop CPU.

Until the miniature image world exists, the world is the synthetic feature-space benchmark
(`genattr.world.synthetic`). The demo writes it in the authors' `.pth` formats, evaluates it
through the same file-level function as `genattr evaluate`, once on raw features and once with
the oracle synth head, and leaves every file behind for inspection.
"""

from __future__ import annotations

import os
from pathlib import Path

from genattr.data.official import save_gallery_pth, save_mapper_pth, save_testcase_pth
from genattr.evaluate import EvaluationResult, evaluate_files
from genattr.world.synthetic import make_synthetic_benchmark


def run_demo(out: str | os.PathLike, seed: int = 0) -> dict[str, EvaluationResult]:
    out = Path(out)
    bench = make_synthetic_benchmark(seed=seed)
    paths = {name: out / f"{name}.pth" for name in ("gallery", "test", "mapper")}
    save_gallery_pth(bench.gallery, paths["gallery"])
    save_testcase_pth(bench.testcase, paths["test"])
    save_mapper_pth(bench.oracle_mappers, paths["mapper"])
    return {
        "raw features": evaluate_files(paths["gallery"], paths["test"], out / "results_raw.json"),
        "with oracle head": evaluate_files(
            paths["gallery"], paths["test"], out / "results_head.json", mapper=paths["mapper"]
        ),
    }
