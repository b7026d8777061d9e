"""The comparison table of issue 17: raw features, tuned heads, the gradient attributor and
the unlearning attributor on the same world test queries, each beside its query-blind
controls and chance, with cost (precomputation, latency per query, storage).

    PYTHONPATH=. .venv/bin/python experiments/method_comparison.py --work DIR \
        --heads DEMO/heads --methods features heads gradient trak unlearning

Single-concept AbC models: the first `--objects` object and `--styles` style test models of
the shipped world benchmark (benchmark order), `--queries` queries each, spread evenly over
both prompt types (`select_queries`). The multi-concept models, when their pack exists,
are evaluated the same way (their fair gallery is the "model" one). One torch thread.
Results: DIR/results/{method}-{case}.json; the table: DIR/results/table.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genattr.methods.gradient import select_parameters
from genattr.methods.unlearning import UnlearningSpec, resolved_step_size
from genattr.workflows.method_runs import MethodEvaluation, evaluate_method
from genattr.workflows.model_cases import multiconcept_cases, world_cases, world_gallery
from genattr.workflows.model_methods import (
    FeatureMethod,
    GradientMethod,
    ScoringMethod,
    UnlearningMethod,
)
from genattr.world.base import load_world_base
from genattr.world.benchmark import load_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness

from harness import emit_row


def method(name: str, heads: Path | None, unlearning_steps: int, scale: float) -> ScoringMethod:
    if name == "features":
        return FeatureMethod("world-cnn")
    if name == "heads":
        if heads is None:
            raise SystemExit("--methods heads needs --heads DEMO/heads")
        return FeatureMethod("world-cnn", str(heads / "world-cnn"))
    if name == "gradient":
        return GradientMethod()
    if name == "trak":
        return GradientMethod(kernel="trak")
    if name == "unlearning":
        # AbU's 100 steps' first-order movement in fewer, larger steps (unlearning_steps.py)
        return UnlearningMethod(unlearning_spec(unlearning_steps, scale))
    raise SystemExit(f"unknown method {name}")


def unlearning_spec(steps: int, scale: float = 1.0) -> UnlearningSpec:
    """`steps` steps moving `scale` times as far (first order) as AbU's 100 at its step size
    rescaled to this model (`resolved_step_size`)."""
    unet = load_world_base().unet
    n_params = sum(p.numel() for _, p in select_parameters(unet, "cross_attn_kv"))
    eta = resolved_step_size(UnlearningSpec(), n_params)
    return UnlearningSpec(steps=steps, step_size=scale * eta * 100 / steps)


def single_concept_models(case: str, n: int) -> list[str]:
    bench = load_benchmark()
    return [m["id"] for m in bench.models if m["split"] == "test" and m["case"] == case][:n]


def multi(args: argparse.Namespace, prefix: str) -> list:
    """The multi-concept models of one mode (their prompt types differ), `--mc-models` only."""
    cases = multiconcept_cases(args.work, None, args.mc_queries)
    return [c for c in cases if c.id.startswith(prefix) and c.id in (args.mc_models or [c.id])]


def row(ev: MethodEvaluation, gallery: str) -> dict:
    def mean_map(r) -> float:
        s = r.summary()
        return sum(v["mAP"] for v in s.values()) / len(s)

    return {
        "per_type": {p: v["mAP"] for p, v in ev.results[gallery].summary().items()},
        "R@10": {p: v["recall"]["10"] for p, v in ev.results[gallery].summary().items()},
        "mAP": mean_map(ev.results[gallery]),
        "controls": {n: mean_map(r[gallery]) for n, r in ev.controls.items()},
        "chance": ev.chance[gallery],
        # every query's AP, prompt type by prompt type: the noise behind the mean
        "ap": [float(a) for r in ev.results[gallery].per_type.values() for a in r.ap],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--heads", type=Path)
    ap.add_argument("--methods", nargs="+", default=["features", "gradient"])
    ap.add_argument("--objects", type=int, default=4)
    ap.add_argument("--styles", type=int, default=3)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--mc-queries", type=int, default=2, help="per multi-concept concept")
    ap.add_argument("--mc-models", nargs="+", help="only these multi-concept models")
    ap.add_argument(
        "--cases", nargs="+", default=["object", "style", "multi-object", "multi-style"]
    )
    ap.add_argument("--results", default="results", help="folder under --work for the JSON")
    ap.add_argument("--unlearning-steps", type=int, default=10)
    ap.add_argument(
        "--unlearning-scale",
        type=float,
        default=1.0,
        help="total movement as a multiple of AbU's (see unlearning_step_size.py)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    out = args.work / args.results
    out.mkdir(parents=True, exist_ok=True)
    gallery = world_gallery()
    case_sets = {
        "object": lambda: world_cases(
            args.work, single_concept_models("object", args.objects), args.queries
        ),
        "style": lambda: world_cases(
            args.work, single_concept_models("style", args.styles), args.queries
        ),
        "multi-object": lambda: multi(args, "multi-object"),
        "multi-style": lambda: multi(args, "multi-style"),
    }
    for case in args.cases:
        cases = case_sets[case]()
        if not cases:
            logging.info("no %s cases", case)
            continue
        for name in args.methods:
            path = out / f"{name}-{case}.json"
            if path.is_file():
                continue
            t0 = time.perf_counter()
            scorer = method(name, args.heads, args.unlearning_steps, args.unlearning_scale)
            ev = evaluate_method(scorer, cases, gallery, work=args.work)
            doc = {
                "method": name,
                "case": case,
                "models": [c.id for c in cases],
                "abc": row(ev, "abc"),
                "model": row(ev, "model"),
                "seconds": ev.seconds,
                "storage_bytes_per_image": ev.storage_bytes_per_image,
                "n_queries": ev.n_queries,
                "wall_seconds": time.perf_counter() - t0,
                "full": ev.to_json(),
            }
            path.write_text(json.dumps(doc, indent=1))
            emit_row("method_comparison", **{k: v for k, v in doc.items() if k != "full"})
            logging.info("%s %s: %s", name, case, json.dumps(doc["abc"]))
    write_table(out)


METHOD_ORDER = ["features", "heads", "gradient", "trak", "unlearning"]


def _rows(out: Path) -> list[tuple[str, str, dict]]:
    """(case label, gallery, result doc) in a stable order."""
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("*-*.json"))]
    order = ["object", "style", "multi-object", "multi-style"]
    docs.sort(key=lambda d: (order.index(d["case"]), METHOD_ORDER.index(d["method"])))
    rows = []
    for d in docs:
        multi = d["case"].startswith("multi")
        for g in ("abc", "model") if multi else ("abc",):
            label = f"{d['case']} ({g} gallery)" if multi else d["case"]
            rows.append((label, g, d))
    return rows


def write_table(out: Path) -> None:
    lines = [
        "| case | method | mAP per prompt type | mean mAP (± s.e. over queries) | R@10 "
        "| best query-blind control "
        "| chance | precompute s / model (1) | s / query | bytes / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, g, d in _rows(out):
        r = d[g]
        ctl = max(r["controls"].items(), key=lambda kv: kv[1], default=("-", float("nan")))
        r10 = sum(r["R@10"].values()) / len(r["R@10"])
        per_type = " / ".join(f"{p} {v:.3f}" for p, v in r["per_type"].items())
        aps = r.get("ap")
        sem = f" ± {np.std(aps, ddof=1) / np.sqrt(len(aps)):.3f}" if aps and len(aps) > 1 else ""
        models = max(len(d["models"]), 1)
        lines.append(
            f"| {label} | {d['method']} | {per_type} | **{r['mAP']:.3f}**{sem} | {r10:.3f} | "
            f"{ctl[1]:.3f} ({ctl[0]}) | {r['chance']:.4f} | "
            f"{d['seconds']['prepare'] / models:.0f} | "
            f"{d['seconds']['per_query']:.2f} | {d['storage_bytes_per_image']} |"
        )
    lines.append(
        "\n(1) the method's own precomputation per model, one thread, on a shared 2-core machine "
        "(rebuilding a world model, 20-60 s, not counted); TRAK reuses the gradient method's "
        "gallery store, so its precomputation is the gradient row's when run alone."
    )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out)


def plot(out: Path) -> None:
    """Bars: each method's mean mAP per case; a tick for its best control; chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(out)
    cases = list(dict.fromkeys(label for label, _, _ in rows))
    methods = [m for m in METHOD_ORDER if any(d["method"] == m for _, _, d in rows)]
    fig, ax = plt.subplots(figsize=(2.2 * len(cases) + 2, 3.8))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        for i, c in enumerate(cases):
            hit = [(g, d) for label, g, d in rows if label == c and d["method"] == m]
            if not hit:
                continue
            g, d = hit[0]
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, d[g]["mAP"], width, color=f"C{j}", label=m if i == 0 else None)
            ctl = max(d[g]["controls"].values(), default=None)
            if ctl is not None:
                ax.plot([x - width / 2, x + width / 2], [ctl, ctl], color="k", lw=2)
            ax.plot([i - 0.4, i + 0.4], [d[g]["chance"]] * 2, "k--", lw=0.8)
    ax.set_xticks(range(len(cases)), cases, fontsize=8)
    ax.set_ylabel("mAP (mean over prompt types)")
    ax.set_title("same queries for every method; black tick: best query-blind control", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)


if __name__ == "__main__":
    main()
