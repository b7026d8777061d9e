"""Does a text-aware feature space attribute the world's customized samples better? Image
features (`world-cnn`, `pixel`) blended with a text encoder's features (FastGDA-style):
gallery images by their captions (clipart32.json), queries by their prompts with the
modifier token removed, cos = (1-w)·cos_img + w·cos_txt (`genattr.features.text.text_aware`).

For the models of `--splits` (test by default) and each test case of `--cases`, AbC protocol
(gallery = pre-training images + the query's own exemplars; ties broken at random, see
`_scores`), every prompt type pooled: mAP and Recall@10 at each text weight w, beside
- chance: a random ranking of the same gallery (exact: `expected_random_ap`, K / gallery);
- shuffled prompts: each query gets the prompt of a query of another model of the same case
  (mean of `--shuffles` draws): what text adds when it says nothing about this query;
- category only: the query text is just the model's category word ('animals'), the rest of
  the prompt dropped (object cases; styles have none): how much of what text adds is that
  one word, which names the exemplar's kind but not the exemplar.

    nice .venv/bin/python experiments/world_text.py --out world-text.json \
        [--cases object unobserved style] [--splits test] [--text-encoder minilm]

The captioned sets (`genattr.world.captioned`) are the cases `set-4` ... `set-256`: one per
set size, every model of that size (all are test models; `--splits` does not apply); their
`set` prompts are the captions of images of the set, word for word.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genattr.data.official import TestCaseFeatures
from genattr.evaluate import EvaluationResult, evaluate_scores, expected_random_ap
from genattr.features.registry import get_backbone
from genattr.features.text import TextEncoder, clean_prompt, load_text_encoder, text_aware
from genattr.heads.checkpoint import MapperPair
from genattr.vectors import embed
from genattr.world.benchmark import load_benchmark
from genattr.world.captioned import case_name, load_sets
from genattr.world.clipart import load_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row

WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
K = 10
ImageSpace = Callable[[np.ndarray], np.ndarray]
TextSpace = Callable[[Sequence[str]], np.ndarray]


def image_space(name: str) -> ImageSpace:
    """A registry backbone as images (N, S, S, 3) uint8 -> features (N, D)."""
    backbone = get_backbone(name)

    def f(images: np.ndarray) -> np.ndarray:
        x = np.stack([backbone.preprocess(Image.fromarray(im)) for im in images])
        parts = [backbone.embed(torch.from_numpy(x[i : i + 256])) for i in range(0, len(x), 256)]
        return torch.cat(parts).numpy()

    return f


def text_space(encoder: TextEncoder) -> TextSpace:
    """The encoder with a memo: captions and prompts repeat across cases and controls."""
    memo: dict[str, np.ndarray] = {}

    def f(texts: Sequence[str]) -> np.ndarray:
        new = sorted(set(texts) - memo.keys())
        if new:
            memo.update(zip(new, encoder.encode(new), strict=True))
        return np.stack([memo[t] for t in texts]) if texts else np.zeros((0, encoder.dim))

    return f


@dataclass
class Case:
    """One test case: queries (images, prompts, owning model, prompt type), the shared
    distractor gallery, and per model its exemplars (rows `exemplar_chunks[k]`)."""

    query_images: np.ndarray
    query_prompts: list[str]
    query_model_ids: np.ndarray
    query_types: list[str]
    gallery_images: np.ndarray
    gallery_captions: list[str]
    exemplar_images: np.ndarray
    exemplar_captions: list[str]
    exemplar_chunks: list[tuple[int, int]]


def _testcase(case: Case) -> tuple[TestCaseFeatures, np.ndarray]:
    """The case's structure for `evaluate_scores` (no features: scores are computed here), and
    the query order it expects (by prompt type)."""
    types = list(dict.fromkeys(case.query_types))
    rows = {p: np.flatnonzero(np.asarray(case.query_types) == p) for p in types}
    tc = TestCaseFeatures(
        [str(i) for i in range(len(case.exemplar_images))],
        case.exemplar_chunks,
        torch.zeros(len(case.exemplar_images), 1),
        {p: [] for p in types},
        {p: case.query_model_ids[r].tolist() for p, r in rows.items()},
        {p: torch.zeros(len(r), 1) for p, r in rows.items()},
    )
    return tc, np.concatenate(list(rows.values()))


def _scores(queries: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cosines with ties broken at random: the world's captions repeat verbatim (37 of the 64
    object test exemplars share theirs with pre-training images), and the protocol's rule,
    ties go to the exemplar, would make text-only retrieval look good by construction."""
    s = np.round(queries.astype(np.float64) @ items.astype(np.float64).T, 6)
    return s + rng.random(s.shape) * 1e-7


def _pooled(res: EvaluationResult) -> dict[str, float]:
    """mAP and Recall@K over every query of the case, prompt types pooled."""
    ap = np.concatenate([r.ap for r in res.per_type.values()])
    recall = np.concatenate([r.recall for r in res.per_type.values()])
    return {"mAP": float(ap.mean()), f"R@{K}": float(recall[:, res.ks.index(K)].mean())}


def chance(n_gallery: int, n_own: np.ndarray) -> dict:
    """Expected mAP and Recall@K of a random ranking, averaged over queries (which differ
    only in their exemplar count): both exact."""
    total = n_gallery + np.asarray(n_own)
    return {
        "mAP": float(expected_random_ap(n_own, total).mean()),
        f"R@{K}": float((np.minimum(K, total) / total).mean()),
    }


def shuffled(prompts: list[str], model_ids: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Each query's prompt replaced by that of a random query of another model."""
    out = []
    for m in model_ids:
        others = np.flatnonzero(model_ids != m)
        out.append(prompts[rng.choice(others)] if len(others) else prompts[0])
    return out


def evaluate_case(
    case: Case,
    embed_image: ImageSpace,
    embed_text: TextSpace,
    weights: Sequence[float] = WEIGHTS,
    query_texts: dict[str, list[list[str]]] | None = None,
    seed: int = 0,
    heads: MapperPair | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{text variant: {w: {"mAP", "R@10"}}}. Variant "prompt" uses the queries' own prompts
    (cleaned); `query_texts` adds controls, each a list of alternative query texts per draw
    (averaged over draws). Gallery and exemplar texts are always their captions. Ties are
    broken at random (seeded), not in the exemplar's favour as `evaluate_protocol` does.
    `heads`: a head pair over the text-aware features (real for gallery and exemplars,
    synth for queries), e.g. one distilled by `distill_world.py`."""

    def mapped(x: np.ndarray, side: str) -> np.ndarray:
        if heads is None:
            return x
        with torch.no_grad():
            return embed(torch.from_numpy(x), getattr(heads, side)).numpy()

    img = {
        "gallery": embed_image(case.gallery_images),
        "exemplars": embed_image(case.exemplar_images),
        "queries": embed_image(case.query_images),
    }
    txt = {
        "gallery": embed_text([clean_prompt(c) for c in case.gallery_captions]),
        "exemplars": embed_text([clean_prompt(c) for c in case.exemplar_captions]),
    }
    variants = {"prompt": [case.query_prompts], **(query_texts or {})}
    tc, order = _testcase(case)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, draws in variants.items():
        q_txts = [embed_text([clean_prompt(t) for t in d]) for d in draws]
        for w in weights:
            gallery = mapped(text_aware(img["gallery"], txt["gallery"], w), "real")
            exemplars = mapped(text_aware(img["exemplars"], txt["exemplars"], w), "real")
            runs = []
            for q_txt in q_txts:
                queries = mapped(text_aware(img["queries"], q_txt, w), "synth")[order]
                res = evaluate_scores(
                    _scores(queries, gallery, rng), _scores(queries, exemplars, rng), tc, ks=(K,)
                )
                runs.append(_pooled(res))
            out.setdefault(name, {})[str(w)] = {
                k: float(np.mean([r[k] for r in runs])) for k in runs[0]
            }
    return out


def world_cases(
    cases: Sequence[str], splits: Sequence[str]
) -> dict[str, tuple[Case, list[str | None]]]:
    """The world benchmark's test cases, and the captioned sets' (`set-N`, one per set size,
    `genattr.world.captioned`): per case, its `Case` and each query's category (None for a
    set, which has none)."""
    data, bench = load_data(), load_benchmark()
    pre = data.indices("pretrain")
    out = {}
    sets = load_sets() if any(c.startswith("set-") for c in cases) else None
    for name in cases:
        if sets is not None and name.startswith("set-"):
            models = [
                {**m, "exemplars": m["images"], "category": None}
                for m in sets.models
                if case_name(m) == name
            ]
            images = sets.images
        else:
            models = [m for m in bench.models if m["split"] in splits and m.get("case") == name]
            images = bench.images
        if not models:
            continue
        rows: list[int] = []
        chunks, q_rows, prompts, ids, types, cats = [], [], [], [], [], []
        for k, m in enumerate(models):
            chunks.append((len(rows), len(rows) + len(m["exemplars"])))
            rows += m["exemplars"]
            for ptype, (start, count) in m["synth"].items():
                per_prompt = count // len(m["prompts"][ptype])  # images i*n..(i+1)*n: prompt i
                q_rows += range(start, start + count)
                prompts += [m["prompts"][ptype][j // per_prompt] for j in range(count)]
                ids += [k] * count
                types += [ptype] * count
                cats += [m.get("category")] * count
        case = Case(
            images[np.asarray(q_rows)],
            prompts,
            np.asarray(ids),
            types,
            data.images[pre],
            [data.records[i]["caption"] for i in pre],
            data.images[np.asarray(rows)],
            [data.records[i]["caption"] for i in rows],
            chunks,
        )
        out[name] = (case, cats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["object", "unobserved", "style", "set-4", "set-16", "set-64", "set-256"],
    )
    ap.add_argument("--splits", nargs="+", default=["test"])
    ap.add_argument("--backbones", nargs="+", default=["world-cnn", "pixel"])
    ap.add_argument("--text-encoder", default="minilm")
    ap.add_argument("--shuffles", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("world-text.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    encoder = load_text_encoder(args.text_encoder)
    embed_text = text_space(encoder)
    cases = world_cases(args.cases, args.splits)
    results: dict = {
        "splits": args.splits,
        "text_encoder": {"name": encoder.name, "weights_id": encoder.weights_id},
        "weights": list(WEIGHTS),
        "cases": {},
    }
    head = " | ".join(f"w={w}" for w in WEIGHTS)
    print(f"splits {args.splits}; text encoder {encoder.name} ({encoder.weights_id})\n")
    print(f"| case (queries, models) | backbone | query text | {head} |")
    print("|---|---|---|" + "---|" * len(WEIGHTS))
    for name, (case, cats) in cases.items():
        rng = np.random.default_rng(0)
        controls = {
            "shuffled prompt": [
                shuffled(case.query_prompts, case.query_model_ids, rng)
                for _ in range(args.shuffles)
            ]
        }
        if all(c is not None for c in cats):
            controls["category only"] = [[str(c) for c in cats]]
        n_own = np.diff(np.asarray(case.exemplar_chunks), axis=1)[case.query_model_ids, 0]
        rand = chance(len(case.gallery_images), n_own)
        entry = {
            "n_queries": len(case.query_prompts),
            "n_models": len(case.exemplar_chunks),
            "chance": rand,
        }
        label = f"{name} ({entry['n_queries']}, {entry['n_models']})"
        for backbone in args.backbones:
            t1 = time.perf_counter()
            res = evaluate_case(case, image_space(backbone), embed_text, WEIGHTS, controls)
            entry[backbone] = res
            for variant, per_w in res.items():
                cells = " | ".join(
                    f"{per_w[str(w)]['mAP']:.3f} / {per_w[str(w)][f'R@{K}']:.2f}" for w in WEIGHTS
                )
                print(f"| {label} | {backbone} | {variant} | {cells} |", flush=True)
            entry.setdefault("seconds", {})[backbone] = round(time.perf_counter() - t1, 1)
        print(
            f"| {label} | - | chance (random ranking) | "
            + " | ".join([f"{rand['mAP']:.4f} / {rand[f'R@{K}']:.3f}"] * len(WEIGHTS))
            + " |",
            flush=True,
        )
        results["cases"][name] = entry
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    emit_row("world_text", **results)
    print(f"\ncells: mAP / Recall@{K}; {results['seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
