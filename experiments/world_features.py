"""Which feature space attributes the world's customized samples best: raw pixels against the
world's own encoder (`world-cnn`: trained, and the same network at random initialisation), at
several pooling layouts, on the packed world benchmark, with the controls beside each number.

For the models of `--split` (val by default: choices are made on val, reported on test), per
test case (object, unobserved, style) and prompt type: mAP with the AbC protocol (gallery =
pre-training images + the query's own exemplars), the same on the stricter gallery (every
held-out exemplar of the benchmark is a distractor too), and the query-independent control
(each gallery image scored by its mean similarity to all queries), on both galleries.

    .venv/bin/python experiments/world_features.py --weights runs/enc1/world-cnn32.safetensors \
        [--grids 1 2 4 8] [--split val] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from genattr.data.official import TestCaseFeatures
from genattr.evaluate import evaluate_protocol
from genattr.features.worldcnn import WorldCNN, load_world_cnn
from genattr.world.benchmark import load_benchmark
from genattr.world.clipart import load_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row

# the mAP columns: AbC gallery, the stricter one, and the query-independent control on each
COLUMNS = ("abc", "stricter", "query-independent", "query-independent, stricter")


def pixel_space(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)


def cnn_space(model: WorldCNN, grid: int) -> Callable[[np.ndarray], torch.Tensor]:
    pool = torch.nn.AdaptiveAvgPool2d(grid)

    def f(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            parts = [pool(model.body(x[i : i + 512])).flatten(1) for i in range(0, len(x), 512)]
            return torch.cat(parts)

    return f


def testcases(split: str) -> tuple:
    """The world data and benchmark, the gallery rows (pre-training), every held-out exemplar
    row, and per test case: its exemplar rows, their chunks per model, and per prompt type
    the synthesized images' rows and model numbers."""
    data, bench = load_data(), load_benchmark()
    out = {}
    for case in ("object", "unobserved", "style"):
        models = [
            m for m in bench.models if m["split"] == split and m.get("case", m["mode"]) == case
        ]
        if not models:
            continue
        rows, chunks, synth, ids = [], [], {}, {}
        for k, m in enumerate(models):
            chunks.append((len(rows), len(rows) + len(m["exemplars"])))
            rows += m["exemplars"]
            for ptype, (start, count) in m["synth"].items():
                synth.setdefault(ptype, []).extend(range(start, start + count))
                ids.setdefault(ptype, []).extend([k] * count)
        out[case] = (np.asarray(rows), chunks, synth, ids)
    all_exemplars = np.asarray(sorted({i for m in bench.models for i in m["exemplars"]}))
    return data, bench, data.indices("pretrain"), all_exemplars, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, nargs="*", default=[])
    ap.add_argument("--grids", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--split", default="val")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data, bench, pretrain, all_exemplars, cases = testcases(args.split)
    spaces: dict[str, Callable[[np.ndarray], torch.Tensor]] = {"pixel": pixel_space}
    torch.manual_seed(0)
    random_init = load_world_cnn(args.weights[0]) if args.weights else WorldCNN()
    random_init = WorldCNN(random_init.arch["widths"], random_init.arch["grid"]).eval()
    for g in args.grids:
        spaces[f"world-cnn random init, grid {g}"] = cnn_space(random_init, g)
    for w in args.weights:
        model = load_world_cnn(w).eval()
        for g in args.grids:
            spaces[f"world-cnn {w.parent.name}, grid {g}"] = cnn_space(model, g)

    print(f"split {args.split}; gallery {len(pretrain)} pre-training images")
    print(
        "| feature space | case | prompt type | mAP | stricter gallery | query-independent "
        "| query-independent, stricter gallery |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, space in spaces.items():
        gallery = space(data.images[pretrain])
        # The stricter gallery: every held-out exemplar that is not in this test case as well.
        for case, (rows, chunks, synth, ids) in cases.items():
            tc = TestCaseFeatures(
                [str(r) for r in rows],
                chunks,
                space(data.images[rows]),
                {p: [] for p in synth},
                ids,
                {p: space(bench.images[np.asarray(v)]) for p, v in synth.items()},
            )
            others = np.setdiff1d(all_exemplars, rows)
            strict_gallery = torch.cat([gallery, space(data.images[others])])
            plain = evaluate_protocol(gallery, tc).summary()
            strict = evaluate_protocol(strict_gallery, tc, exemplars_as_distractors=True).summary()
            control = evaluate_protocol(gallery, tc, query_independent=True).summary()
            strict_control = evaluate_protocol(
                strict_gallery, tc, exemplars_as_distractors=True, query_independent=True
            ).summary()
            for p in plain:
                cells = [plain, strict, control, strict_control]
                print(
                    f"| {name} | {case} | {p} | "
                    + " | ".join(f"{c[p]['mAP']:.4f}" for c in cells)
                    + " |",
                    flush=True,
                )
                maps = dict(zip(COLUMNS, (c[p]["mAP"] for c in cells), strict=True))
                emit_row("world_features", space=name, case=case, prompt_type=p, mAP=maps)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
