"""`genattr world build`: the whole miniature world from Debian's openclipart-png, resumably.

Stages, each cached in WORK and skipped when done: render and split the data (the exemplars
are held out before anything is trained), train the base model (resumed from its last
checkpoint), export it into the package, customize and sample one model per exemplar set
(resumed model by model), pack the benchmark into the package. The benchmark folder is named
after the base model's weights, so re-training the base never reuses stale samples.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from genattr.world.base import BaseConfig, base_model_dir
from genattr.world.benchmark import build_benchmark, pack_benchmark
from genattr.world.clipart import DEFAULT_DATA_DIR, ClipartData, build_data, load_data
from genattr.world.training import export_base, train_base

logger = logging.getLogger(__name__)


def weights_digest(folder: str | os.PathLike) -> str:
    """sha256 over a saved pipeline's weight files (names and bytes), 12 hex digits."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*.safetensors")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def build_world(
    source: str | os.PathLike,
    work: str | os.PathLike,
    out: str | os.PathLike = DEFAULT_DATA_DIR,
    base_steps: int = 20000,
    base_minutes: float | None = None,
    *,
    config: BaseConfig | None = None,
    engine: str = "local",
) -> bool:
    """Run (or resume) every stage; False when the base model stopped before `base_steps`
    (rerun to go on), True when the benchmark is packed into `out`."""
    work, out = Path(work), Path(out)
    size = (config or BaseConfig()).size
    logger.info("stage 1/4: data")
    build_data(source, out, size=size, cache_dir=work / "render-cache")
    data = load_data(out, size)

    logger.info("stage 2/4: base model")
    report = train_base(
        work / "base",
        out,
        base_steps,
        config,
        max_seconds=None if base_minutes is None else base_minutes * 60,
    )
    if report.step < base_steps:
        logger.info(f"base model at step {report.step} of {base_steps}; run again to continue")
        return False
    base = export_base(work / "base", out / base_model_dir(size).name, out)

    logger.info("stage 3/4: benchmark (one Custom Diffusion model per exemplar set)")
    build_world_benchmark(work, out, base, data, engine)
    logger.info(f"world written to {out}")
    return True


def build_world_benchmark(
    work: str | os.PathLike,
    out: str | os.PathLike = DEFAULT_DATA_DIR,
    base: str | os.PathLike | None = None,
    data: ClipartData | None = None,
    engine: str = "local",
) -> Path:
    """Customize and sample every held-out set of `data` on `base` (default: the base model
    shipped in `out`), resumably in `work/benchmark-<base digest>`, then pack it into `out`."""
    out = Path(out)
    data = data or load_data(out)
    base = Path(base) if base is not None else out / base_model_dir(data.images.shape[1]).name
    bench_work = Path(work) / f"benchmark-{weights_digest(base)}"
    build_benchmark(base, bench_work, data, engine=engine)
    logger.info("packing")
    return pack_benchmark(bench_work, out, data.images.shape[1])
