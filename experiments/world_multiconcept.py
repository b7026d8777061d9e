"""The world's multi-concept test case as an instrument: how far raw features attribute each
concept's samples, against (a) the AbC gallery (pre-training images + that concept's
exemplars) and (b) the multi-concept gallery (pre-training images + the exemplars of ALL K
concepts the model was tuned on; ground truth the concept's own), beside three controls:

- chance: the expected AP of a random ranking of the same gallery;
- membership only: what a method that knows only which exemplar sets the model was tuned on
  scores (all of them ranked first, in random order among themselves): 1.0 on (a), by
  construction of AbC; on (b) the chance of finding one's own set among the K;
- the same test models' single-concept samples (the world benchmark's, tuned on one set
  only) on the same two galleries: is a concept of a multi-concept model as attributable?

Also a PNG grid per model (row per concept: exemplars | samples) and, with `--verify`, a
rebuild of one model from nothing that must reproduce its packed samples within one grey
level.

    .venv/bin/python experiments/world_multiconcept.py [--out DIR] [--verify multi-object-0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genattr.data.official import TestCaseFeatures
from genattr.evaluate import evaluate_protocol, expected_random_ap
from genattr.features.registry import get_backbone
from genattr.world.benchmark import load_benchmark
from genattr.world.clipart import load_data
from genattr.world.multiconcept import load_multiconcept, verify_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def embedder(name: str):
    backbone = get_backbone(name)

    def f(images: np.ndarray) -> torch.Tensor:
        x = np.stack([backbone.preprocess(Image.fromarray(im)) for im in images])
        parts = [backbone.embed(torch.from_numpy(x[i : i + 256])) for i in range(0, len(x), 256)]
        return torch.cat(parts)

    return f


def testcase(space, data, concepts, synth_images) -> TestCaseFeatures:
    """One 'model' per concept: its exemplars, and its samples (both prompt types pooled into
    the two prompt types)."""
    rows, chunks, synth, ids = [], [], {}, {}
    for k, (c, images_of) in enumerate(zip(concepts, synth_images, strict=True)):
        chunks.append((len(rows), len(rows) + len(c["exemplars"])))
        rows += c["exemplars"]
        for ptype, ims in images_of.items():
            synth.setdefault(ptype, []).append(ims)
            ids.setdefault(ptype, []).extend([k] * len(ims))
    return TestCaseFeatures(
        [str(r) for r in rows],
        chunks,
        space(data.images[np.asarray(rows)]),
        {p: [] for p in synth},
        ids,
        {p: space(np.concatenate(v)) for p, v in synth.items()},
    )


def per_concept_map(res, n: int) -> list[float]:
    """mAP of each concept (model number in the test case) over both prompt types."""
    ap = np.concatenate([r.ap for r in res.per_type.values()])
    ids = np.concatenate([r.model_ids for r in res.per_type.values()])
    return [float(ap[ids == k].mean()) for k in range(n)]


def own_set_first(tc: TestCaseFeatures) -> list[float]:
    """Per concept: how often a query's nearest exemplar among the K sets is its own set's
    (does the model keep its concepts apart, as the features see it?); chance about 1/K."""
    ex = torch.nn.functional.normalize(tc.exemplar_feats.float(), dim=1)
    owner = np.concatenate([[k] * (b - a) for k, (a, b) in enumerate(tc.exemplar_chunks)])
    hits: dict[int, list[bool]] = {}
    for p, feats in tc.synth_feats.items():
        q = torch.nn.functional.normalize(feats.float(), dim=1)
        best = owner[(q @ ex.T).argmax(1).numpy()]
        for k, b in zip(tc.synth_ids[p], best, strict=True):
            hits.setdefault(k, []).append(bool(b == k))
    return [float(np.mean(hits[k])) for k in range(len(tc.exemplar_chunks))]


def grid(data, mc, out: Path, n_ex: int = 4, n_synth: int = 10, scale: int = 3) -> Path:
    """A row per concept: up to n_ex exemplars, a gap, n_synth samples."""
    s = mc.images.shape[1]
    rows = []
    for _, c in mc.concepts():
        ex = [data.images[i] for i in c["exemplars"][:n_ex]]
        ex += [np.full((s, s, 3), 255, np.uint8)] * (n_ex - len(ex) + 1)
        syn = []
        for start, count in c["synth"].values():
            syn += [mc.images[start + i] for i in range(count)]
        picks = np.linspace(0, len(syn) - 1, n_synth).astype(int)
        rows.append(np.concatenate([*ex, *(syn[i] for i in picks)], axis=1))
    sep = np.full((2, rows[0].shape[1], 3), 128, np.uint8)
    body = []
    for i, r in enumerate(rows):
        if i and i % mc.info["k"] == 0:
            body += [sep, sep]
        body.append(r)
    img = Image.fromarray(np.concatenate(body)).resize(
        (rows[0].shape[1] * scale, sum(b.shape[0] for b in body) * scale), Image.Resampling.NEAREST
    )
    img.save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("world-multiconcept"))
    ap.add_argument("--backbones", nargs="+", default=["pixel", "world-cnn"])
    ap.add_argument("--verify", nargs="*", default=[], help="model ids to rebuild and compare")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, bench, mc = load_data(), load_benchmark(), load_multiconcept()
    single = {m["id"]: m for m in bench.models}
    pre = data.indices("pretrain")
    print(f"grid: {grid(data, mc, args.out / 'multiconcept_grid.png')}")
    k = mc.info["k"]
    results: dict = {"models": {}, "summary": {}}
    for name in args.backbones:
        space = embedder(name)
        gallery = space(data.images[pre])
        rows: dict[str, list[float]] = {}
        for m in mc.models:
            cs = m["concepts"]
            multi_imgs = [{p: mc.images[s : s + n] for p, (s, n) in c["synth"].items()} for c in cs]
            single_imgs = [
                {
                    p: bench.images[s : s + n]
                    for p, (s, n) in single[c["test_model"]]["synth"].items()
                }
                for c in cs
            ]
            for which, imgs in (("multi", multi_imgs), ("single", single_imgs)):
                tc = testcase(space, data, cs, imgs)
                a = per_concept_map(evaluate_protocol(gallery, tc), k)
                b = per_concept_map(
                    evaluate_protocol(gallery, tc, exemplars_as_distractors=True), k
                )
                rows.setdefault(f"{which} (a)", []).extend(a)
                rows.setdefault(f"{which} (b)", []).extend(b)
                rows.setdefault(f"{which} own set first", []).extend(own_set_first(tc))
                results["models"].setdefault(m["id"], {})[f"{name} {which}"] = {"a": a, "b": b}
            n_all = sum(len(c["exemplars"]) for c in cs)
            for c in cs:
                n = len(c["exemplars"])
                # the expected AP of the n own exemplars ranked at random among: gallery (a),
                # gallery (b), and the K sets alone (membership known, order random)
                chance = expected_random_ap(n, [len(pre) + n, len(pre) + n_all, n_all])
                rows.setdefault("chance (a)", []).append(float(chance[0]))
                rows.setdefault("chance (b)", []).append(float(chance[1]))
                rows.setdefault("membership only (a)", []).append(1.0)
                rows.setdefault("membership only (b)", []).append(float(chance[2]))
            rows.setdefault("draws", []).extend(c["draws"] for c in cs)
        results["summary"][name] = rows
        modes = [m["mode"] for m in mc.models for _ in m["concepts"]]
        print(f"\n{name}: mAP per concept, mean by mode (object | style)")
        print("| scores | gallery (a) AbC | gallery (b) multi-concept |")
        print("|---|---|---|")
        for label in ("multi", "single", "chance", "membership only"):
            cells = []
            for g in ("a", "b"):
                v = np.asarray(rows[f"{label} ({g})"])
                per = [v[[md == mode for md in modes]].mean() for mode in ("object", "style")]
                cells.append(f"{v.mean():.3f} ({per[0]:.3f} / {per[1]:.3f})")
            print(f"| {label} | {cells[0]} | {cells[1]} |")
        means = {label: float(np.mean(v)) for label, v in rows.items() if label != "draws"}
        emit_row("world_multiconcept", backbone=name, k=k, mean_map_per_concept=means)
        for which in ("multi", "single"):
            v = np.asarray(rows[f"{which} own set first"])
            per = [v[[md == mode for md in modes]].mean() for mode in ("object", "style")]
            print(
                f"nearest exemplar among the K sets is the concept's own ({which}): "
                f"{v.mean():.3f} ({per[0]:.3f} / {per[1]:.3f}), chance about {1 / k:.2f}"
            )
        print("per concept (test model, draws, multi (a), multi (b), single (b), own first):")
        i = 0
        for m in mc.models:
            line = []
            for c in m["concepts"]:
                line.append(
                    f"{c['test_model']} {c['draws']:3d} {rows['multi (a)'][i]:.2f} "
                    f"{rows['multi (b)'][i]:.2f} {rows['single (b)'][i]:.2f} "
                    f"{rows['multi own set first'][i]:.2f}"
                )
                i += 1
            print(f"  {m['id']}: " + "; ".join(line))
    for mid in args.verify:
        with tempfile.TemporaryDirectory() as tmp:
            worst = verify_model(mid, tmp, mc)
        print(f"\n{mid}: rebuilt from nothing, samples within {worst} grey level(s) of the pack")
        results.setdefault("verified", {})[mid] = worst
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
