"""The paper's generalization experiment on the world: does attribution learned on single
exemplars carry over to models tuned on N random captioned images? (`genattr.world.captioned`)

Reads a finished demo folder (`genattr demo --out DEMO`: the unpacked world and sets, one
embedding store per backbone and part, the heads trained on the single-exemplar train models)
and reports, per set size N and prompt type (`set`: the set's own captions; `held-out`:
captions of other images of the same kind), mAP and Recall@10 as the mean over models of each
model's mean over its queries, with the standard error across models, for:

- raw features and the head trained on single exemplars (the demo's), per backbone;
- the same on the stricter gallery (every other set's images added as distractors);
- text-aware features (`genattr.features.text`, `--text` encoder): image features blended
  with the text of captions (gallery) and prompts (queries) at weights `--weights`; weight 1
  is the prompt alone (identical captions' exact ties broken at random). Two controls: the
  same blend with each query's prompt swapped for the prompt of a query of another model of
  the same N (if the gain stays, it was not this prompt), and text alone with swapped prompts;
- chance (the exact expected AP of a random ranking, simulated) and membership (a method that
  knows which images the model was tuned on ranks the set first: mAP 1 by construction,
  which is why model-based attributors are not compared on this gallery).

And a finer question membership cannot answer: a `set` prompt is the caption of one image of
the set; does the sample rank that image first among the set's N images? (top-1 within the
set, image features raw and through the head; chance = own images / N; text alone would
score 1, since the prompt is that caption.)

    .venv/bin/python benchmarks/world_sets.py --demo demo-out [--text minilm] \
        [--weights 0.25 0.5 1.0] [--out sets.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from genattr.data.benchmark import BenchmarkManifest, read_manifest
from genattr.data.official import TestCaseFeatures
from genattr.evaluate import EvaluationResult, evaluate_protocol
from genattr.heads.checkpoint import load_heads
from genattr.store import EmbeddingStore
from genattr.store.join import testcase_from_stores
from genattr.vectors import embed
from genattr.world.captioned import load_sets
from genattr.world.clipart import load_data
from genattr.world.demo import stricter_gallery

KS = (10,)


def chance_ap(n_gallery: int, n_own: int, draws: int = 4000, seed: int = 0) -> float:
    """Expected AP when the n_own relevant items sit at random among n_gallery + n_own."""
    rng = np.random.default_rng(seed)
    aps = []
    for _ in range(draws):
        ranks = np.sort(rng.choice(n_gallery + n_own, n_own, replace=False)) + 1
        aps.append(np.mean(np.arange(1, n_own + 1) / ranks))
    return float(np.mean(aps))


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


def own_image_first(tc: TestCaseFeatures, models: list, mappers=None) -> tuple[float, float]:
    """Over the `set` queries: the share whose own image (the one trained with the caption
    the query was sampled with; every such image if captions repeat) is the most similar of
    the set's images, and the mean chance of that (own images / N)."""
    real = mappers.real.eval() if mappers is not None else None
    synth = mappers.synth.eval() if mappers is not None else None
    with torch.no_grad():
        ex = embed(tc.exemplar_feats.float(), real)
        queries = embed(tc.synth_feats["set"].float(), synth)
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


def text_of(path: str, data, prompts: dict[str, dict[str, list[str]]]) -> str:
    """The text beside an image: a world image's caption (files named by index), or the
    prompt a sample was made with (synth/{type}/{model}/{k}.png, one image per prompt)."""
    p = Path(path)
    if p.parent.parent.parent.name == "synth":
        return prompts[p.parent.name][p.parent.parent.name][int(p.stem)]
    return data.records[int(p.stem)]["caption"]


def jittered(text: np.ndarray, seed: int) -> np.ndarray:
    """Text vectors moved by about 1e-5: identical captions (clip-art titles repeat) would
    otherwise tie exactly, and the protocol gives ties to the exemplar; this breaks them at
    random, as a ranking that cannot tell them apart should."""
    return text + np.random.default_rng(seed).normal(0, 1e-5, text.shape).astype(np.float32)


def blend(tc: TestCaseFeatures, gallery, texts, weight: float, shuffle: int | None = None):
    """The test case and gallery in the text-aware space; `shuffle`: each query gets the
    text of a query of another model (a seeded derangement by model)."""
    from genattr.features.text import text_aware

    ex = text_aware(tc.exemplar_feats, jittered(texts["exemplars"], 1), weight)
    synth = {}
    for p, feats in tc.synth_feats.items():
        t = texts["synth"][p]
        if shuffle is not None:
            ids = np.asarray(tc.synth_ids[p])
            rng = np.random.default_rng(shuffle)
            order = rng.permutation(len(ids))
            while (ids[order] == ids).any():  # never a query of the same model
                order = rng.permutation(len(ids))
            t = t[order]
        synth[p] = torch.from_numpy(text_aware(feats, t, weight))
    case = dataclasses.replace(tc, exemplar_feats=torch.from_numpy(ex), synth_feats=synth)
    return case, torch.from_numpy(text_aware(gallery, jittered(texts["gallery"], 2), weight))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--backbones", nargs="*", default=["pixel", "world-cnn"])
    ap.add_argument("--text", default="minilm", help="text encoder; '' to skip text rows")
    ap.add_argument("--weights", nargs="*", type=float, default=[0.25, 0.5, 1.0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data, sets = load_data(), load_sets()
    manifest = read_manifest(args.demo / "world" / "sets" / "manifest.json")
    prompts = {m["id"]: m["prompts"] for m in sets.models}
    by_size: dict[int, list] = {}
    for m in manifest.models:
        by_size.setdefault(len(m.exemplars), []).append(m)
    n_gallery = len(data.indices("pretrain"))
    rows: dict[str, dict[int, dict]] = {}
    within: dict[str, dict[int, float]] = {}
    rows["chance"] = {
        n: {p: {"mAP": chance_ap(n_gallery, n), "R@10": float("nan")} for p in ("set", "held-out")}
        for n in by_size
    }
    rows["membership (the model's own training set first)"] = {
        n: {p: {"mAP": 1.0, "R@10": min(1.0, 10 / n)} for p in ("set", "held-out")} for n in by_size
    }
    encoder = None
    if args.text:
        from genattr.features.text import load_text_encoder

        encoder = load_text_encoder(args.text)
    for name in args.backbones:
        stores = args.demo / "stores" / name
        gallery_store = EmbeddingStore.open(stores / "pretrain")
        gallery = torch.from_numpy(np.asarray(gallery_store.vectors, np.float32))
        real = EmbeddingStore.open(stores / "set-exemplars")
        synth = EmbeddingStore.open(stores / "set-synth")
        mappers = load_heads(args.demo / "heads" / name)[0]
        gallery_text = None
        if encoder is not None:
            gallery_text = encoder.encode([text_of(p, data, prompts) for p in gallery_store.paths])
        for n, models in sorted(by_size.items()):
            tc = testcase_from_stores(BenchmarkManifest(f"set-{n}", models), real, synth)[0]
            strict = stricter_gallery(gallery, real, tc)
            runs = {
                f"{name} raw": (gallery, tc, None, False),
                f"{name} + head (single exemplars)": (gallery, tc, mappers, False),
                f"{name} raw, stricter gallery": (strict, tc, None, True),
                f"{name} + head, stricter gallery": (strict, tc, mappers, True),
            }
            if encoder is not None:
                texts = {
                    "gallery": gallery_text,
                    "exemplars": encoder.encode(
                        [text_of(p, data, prompts) for p in tc.exemplar_paths]
                    ),
                    "synth": {
                        p: encoder.encode([text_of(q, data, prompts) for q in paths])
                        for p, paths in tc.synth_paths.items()
                    },
                }
                for w in args.weights:
                    case, g = blend(tc, gallery, texts, w)
                    label = (
                        "text only (prompt vs captions)" if w == 1.0 else f"{name} raw + text w={w}"
                    )
                    if w == 1.0 and name != args.backbones[0]:
                        continue  # the same ranking for every backbone
                    runs[label] = (g, case, None, False)
                    case, g = blend(tc, gallery, texts, w, shuffle=n)
                    runs[label + ", prompts swapped across models"] = (g, case, None, False)
            for label, (g, case, mp, stricter) in runs.items():
                res = evaluate_protocol(g, case, KS, mappers=mp, exemplars_as_distractors=stricter)
                rows.setdefault(label, {})[n] = per_model(res)
            for label, mp in ((f"{name} raw", None), (f"{name} + head", mappers)):
                top1, chance = own_image_first(tc, models, mp)
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
    if args.out:
        doc = {"rows": rows, "own_image_first": within, "models_per_size": models_per}
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
