"""The paper's generalization experiment on the world: does attribution learned on single
exemplars carry over to models tuned on N random captioned images? (`genattr.world.captioned`)

Reads a finished demo folder (`genattr demo --out DEMO`: the unpacked world and sets, one
embedding store per backbone and part, the heads trained on the single-exemplar train models)
and reports, per set size N and prompt type (`set`: the set's own captions; `held-out`:
captions of other images of the same kind), mAP and Recall@10 as the mean over models of each
model's mean over its queries, with the standard error across models, for:

- raw features and the head trained on single exemplars (the demo's), per backbone;
- the same on the stricter gallery (every other set's images added as distractors), and the
  query-independent control (every query replaced by the mean query: a ranking that ignores
  which sample was asked about) on both galleries;
- chance (the exact expected AP of a random ranking: `expected_random_ap`) and membership (a
  method that knows which images the model was tuned on ranks the set first: mAP 1 by
  construction, which is why model-based attributors are not compared on this gallery).

And a finer question membership cannot answer: a `set` prompt is the caption of one image of
the set; does the sample rank that image first among the set's N images? (top-1 within the
set, image features raw and through the head; chance = own images / N; text alone would
score 1, since the prompt is that caption.)

Text-aware features on the same sets: `experiments/world_text.py --cases set-4 set-16 ...`.

    .venv/bin/python experiments/world_sets.py --demo demo-out [--out sets.json] \
        [--figure docs/world/sets-vs-n.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genattr.data.benchmark import BenchmarkManifest, read_manifest
from genattr.data.official import TestCaseFeatures
from genattr.evaluate import EvaluationResult, evaluate_protocol, expected_random_ap
from genattr.heads.checkpoint import load_heads
from genattr.store import EmbeddingStore
from genattr.store.join import testcase_from_stores
from genattr.vectors import embed
from genattr.workflows.demo import stricter_gallery
from genattr.world.clipart import load_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row

KS = (10,)


def per_model(result: EvaluationResult) -> dict[str, dict[str, float]]:
    """Per prompt type: mean over models of each model's mean AP and Recall@10, and their
    standard errors across models."""
    out = {}
    for p, r in result.per_type.items():
        models = np.unique(r.model_ids)
        ap = np.array([r.ap[r.model_ids == m].mean() for m in models])
        rec = np.array([r.recall[r.model_ids == m, 0].mean() for m in models])
        se = np.sqrt(len(models))
        out[p] = {
            "mAP": float(ap.mean()),
            "mAP_se": float(ap.std(ddof=1) / se) if len(models) > 1 else float("nan"),
            "R@10": float(rec.mean()),
            "R@10_se": float(rec.std(ddof=1) / se) if len(models) > 1 else float("nan"),
            "models": len(models),
        }
    return out


def own_image_first(
    tc: TestCaseFeatures, models: list, mappers=None, query_independent: bool = False
) -> tuple[float, float]:
    """Over the `set` queries: the share whose own image (the one trained with the caption
    the query was sampled with; every such image if captions repeat) is the most similar of
    the set's images, and the mean chance of that (own images / N). `query_independent`:
    every query replaced by the mean of its model's `set` queries (the control)."""
    real = mappers.real.eval() if mappers is not None else None
    synth = mappers.synth.eval() if mappers is not None else None
    with torch.no_grad():
        ex = embed(tc.exemplar_feats.float(), real)
        queries = embed(tc.synth_feats["set"].float(), synth)
    if query_independent:
        ids = torch.as_tensor(tc.synth_ids["set"])
        for mid in ids.unique():
            rows = ids == mid
            queries[rows] = torch.nn.functional.normalize(queries[rows].mean(0), dim=0)
    hits, chance = [], []
    for q, (mid, path) in enumerate(zip(tc.synth_ids["set"], tc.synth_paths["set"], strict=True)):
        model = models[mid]
        prompt = model.extra["prompts"]["set"][int(Path(path).stem)]
        own = np.array([c == prompt for c in model.extra["captions"]])
        start, stop = tc.exemplar_chunks[mid]
        sims = (ex[start:stop] @ queries[q]).numpy()
        hits.append(sims[own].max() >= sims[~own].max() if (~own).any() else True)
        chance.append(own.mean())
    return float(np.mean(hits)), float(np.mean(chance))


def figure(
    rows: dict, within: dict, sizes: list[int], backbones: list[str], strict_n: int, path: Path
) -> None:
    """mAP against N on both galleries (`set` prompts; each method beside its query-independent
    control and chance) and the within-set question, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("AbC gallery", ""), ("stricter gallery", ", stricter gallery"))
    for ax, (title, suffix) in zip(axes[:2], panels, strict=True):
        for c, name in enumerate(backbones):
            styles = (("raw", "--"), ("+ head", "-"), ("raw, query-independent", ":"))
            for what, ls in styles:
                key = f"{name} {what}{suffix}"
                ys = [rows[key][n]["set"]["mAP"] for n in sizes]
                ax.plot(sizes, ys, ls, color=f"C{c}", label=f"{name} {what}")
        chance = (
            [float(expected_random_ap(n, strict_n)) for n in sizes]
            if suffix
            else [rows["chance"][n]["set"]["mAP"] for n in sizes]
        )
        ax.plot(sizes, chance, color="grey", lw=1, label="chance")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="images in the set (N)",
            ylabel="mAP",
            title=f"{title}, set prompts",
        )
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    for c, name in enumerate(backbones):
        for what, ls in (("raw", "--"), ("+ head", "-"), ("raw, query-independent", ":")):
            ax.plot(
                sizes,
                [within[f"{name} {what}"][n] for n in sizes],
                ls,
                color=f"C{c}",
                label=f"{name} {what}",
            )
    ax.plot(sizes, [within["chance"][n] for n in sizes], color="grey", lw=1, label="chance")
    ax.set(
        xscale="log",
        xlabel="images in the set (N)",
        ylim=(0, 1),
        ylabel="own image first",
        title="which image of the set",
    )
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--backbones", nargs="*", default=["pixel", "world-cnn"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--figure", type=Path, help="PNG: mAP against N beside the controls")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load_data()
    manifest = read_manifest(args.demo / "world" / "sets" / "manifest.json")
    by_size: dict[int, list] = {}
    for m in manifest.models:
        by_size.setdefault(len(m.exemplars), []).append(m)
    n_gallery = len(data.indices("pretrain"))
    rows: dict[str, dict[int, dict]] = {}
    within: dict[str, dict[int, float]] = {}
    rows["chance"] = {
        n: {
            p: {"mAP": float(expected_random_ap(n, n_gallery + n)), "R@10": float("nan")}
            for p in ("set", "held-out")
        }
        for n in by_size
    }
    rows["membership oracle (the set first, by construction)"] = {
        n: {p: {"mAP": 1.0, "R@10": min(1.0, 10 / n)} for p in ("set", "held-out")} for n in by_size
    }
    for name in args.backbones:
        stores = args.demo / "stores" / name
        gallery = torch.from_numpy(
            np.asarray(EmbeddingStore.open(stores / "pretrain").vectors, np.float32)
        )
        real = EmbeddingStore.open(stores / "set-exemplars")
        synth = EmbeddingStore.open(stores / "set-synth")
        mappers = load_heads(args.demo / "heads" / name)[0]
        for n, models in sorted(by_size.items()):
            tc = testcase_from_stores(BenchmarkManifest(f"set-{n}", models), real, synth)[0]
            strict = stricter_gallery(gallery, real, tc)
            runs = {  # gallery, mappers, stricter gallery, query-independent
                f"{name} raw": (gallery, None, False, False),
                f"{name} + head": (gallery, mappers, False, False),
                f"{name} raw, stricter gallery": (strict, None, True, False),
                f"{name} + head, stricter gallery": (strict, mappers, True, False),
                f"{name} raw, query-independent": (gallery, None, False, True),
                f"{name} raw, query-independent, stricter gallery": (strict, None, True, True),
            }
            for label, (g, mp, stricter, qi) in runs.items():
                res = evaluate_protocol(
                    g, tc, KS, mappers=mp, exemplars_as_distractors=stricter, query_independent=qi
                )
                rows.setdefault(label, {})[n] = per_model(res)
            for label, mp, qi in (
                (f"{name} raw", None, False),
                (f"{name} + head", mappers, False),
                (f"{name} raw, query-independent", None, True),
            ):
                top1, chance = own_image_first(tc, models, mp, qi)
                within.setdefault(label, {})[n] = top1
                within.setdefault("chance", {})[n] = chance
    sizes = sorted(by_size)
    for metric in ("mAP", "R@10"):
        for ptype in ("set", "held-out"):
            print(f"\n{metric}, prompts: {ptype} (mean over models ± s.e. across models)\n")
            print("| method | " + " | ".join(f"N={n}" for n in sizes) + " |")
            print("|---|" + "---|" * len(sizes))
            for label, per_n in rows.items():
                cells = []
                for n in sizes:
                    v = per_n[n][ptype]
                    se = v.get(f"{metric}_se")
                    cell = "-" if np.isnan(v[metric]) else f"{v[metric]:.3f}"
                    cells.append(
                        cell + (f" ± {se:.3f}" if se is not None and np.isfinite(se) else "")
                    )
                print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nA `set` sample's own image first among its set's images (share of queries)\n")
    print("| method | " + " | ".join(f"N={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for label, per_n in within.items():
        print(f"| {label} | " + " | ".join(f"{per_n[n]:.3f}" for n in sizes) + " |")
    models_per = {n: len(m) for n, m in by_size.items()}
    print(
        f"\nmodels per N: {models_per}; 8 queries per prompt type per model; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    if args.figure:
        strict_n = n_gallery + sum(len(m.exemplars) for m in manifest.models)
        figure(rows, within, sizes, args.backbones, strict_n, args.figure)
    doc = {"rows": rows, "own_image_first": within, "models_per_size": models_per}
    emit_row("world_sets", **doc)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
