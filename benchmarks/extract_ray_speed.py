"""Images/s of `extract --engine ray` against the local engine, on the same images.

    .venv/bin/python benchmarks/extract_ray_speed.py [--n 192] [--rounds 2] [--arch auto]

Same images, backbone and batch size as benchmarks/extract_speed.py (efficientnet-lite0 with
its packaged weights by default, real openclipart PNGs). Both engines use the same CPU split
on this machine: the local engine one decode worker and one model thread; Ray one model actor
with one thread, decode tasks on the other core. Rounds alternate the engines; Ray runs on a
local Ray started once, so its per-call cost (actor start, model shipped) is in its rate and
the start of Ray itself is reported apart. Each pair of stores is checked to agree.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from extract_speed import clipart_folder, folder_of_one, make_backbone, pick_images
from harness import emit_row


def run(backbone, folder: Path, out: Path, batch_size: int, **kw) -> tuple[float, object]:
    from genattr.features.extract import extract

    t0 = time.perf_counter()
    r = extract(backbone, folder, out, batch_size=batch_size, **kw)
    assert r.failed_total == 0
    return r.store.count / (time.perf_counter() - t0), r.store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--arch", default="auto")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    backbone = make_backbone(args.arch)
    print(
        f"backbone {backbone.name}, {args.n} images x {args.rounds} rounds, {os.cpu_count()} cpus"
    )
    t0 = time.perf_counter()
    ray.init(object_store_memory=1 << 30, include_dashboard=False, logging_level="WARNING")
    print(f"ray.init (local): {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        paths = pick_images(clipart_folder(), args.n, tmp / "images", 0)
        one = folder_of_one(paths[0], tmp)
        for engine in ("local", "ray"):
            t0 = time.perf_counter()
            run(backbone, one, tmp / f"one-{engine}", args.batch_size, engine=engine)
            print(
                f"fixed cost of one {engine} extract() call (1 image): "
                f"{time.perf_counter() - t0:.1f} s"
            )
        rates: dict[str, list[float]] = {"local": [], "ray": []}
        for r in range(args.rounds):
            stores = {}
            for engine in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
                rate, stores[engine] = run(
                    backbone, tmp / "images", tmp / f"{engine}{r}", args.batch_size, engine=engine
                )
                rates[engine].append(rate)
            diff = np.abs(np.asarray(stores["local"].vectors) - np.asarray(stores["ray"].vectors))
            assert stores["local"].ids == stores["ray"].ids
            print(
                f"round {r + 1}: local {rates['local'][-1]:.2f} img/s, ray {rates['ray'][-1]:.2f} "
                f"img/s, ratio {rates['ray'][-1] / rates['local'][-1]:.2f}, "
                f"max |vector difference| {diff.max():.2e}"
            )
    ratio = np.median(np.array(rates["ray"]) / np.array(rates["local"]))
    print(
        f"median: local {np.median(rates['local']):.2f} img/s, ray {np.median(rates['ray']):.2f} "
        f"img/s, ray / local {ratio:.2f}"
    )
    emit_row("extract_ray_speed", backbone=backbone.name, n=args.n, images_per_s=rates, ratio=ratio)
    ray.shutdown()


if __name__ == "__main__":
    main()
