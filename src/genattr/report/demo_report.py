"""`demo-out/report.html`: the miniature world's results in one self-contained page.

Tables first (what was measured), then the pictures that make the numbers believable: recall
against K, head training curves, calibration, a few attributed test queries beside their true
exemplars, and samples of the base model and of customized models.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from markupsafe import Markup

from genattr.atomic import write_text_atomic
from genattr.evaluate import expected_random_ap
from genattr.report.attribution_html import STYLE, TEMPLATES, attribution_section, img_tag

PAGE_STYLE = STYLE + (
    "<style>table{border-collapse:collapse;margin:8px 0 24px}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}"
    "th{background:#f4f4f4}td.l,th.l{text-align:left}tr.head td{font-weight:600}"
    "section.block{margin:32px 0}.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}"
    ".models figure{margin:0 12px 16px 0}</style>"
)


def _fig_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: str | os.PathLike) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(
    outcomes: dict, ptypes: Sequence[str], chance: dict, metric: str = "mAP", part: str = "abc"
) -> dict:
    """One row per feature space, head and gallery (the AbC protocol, then its two controls),
    one column per test case and prompt type: mAP, or Recall@K with metric "R@K"; of the AbC
    test cases (`part` "abc") or of the captioned sets ("sets")."""

    def row(name: str, head: str, gallery: str, summary: dict, strong: bool = False) -> dict:
        vals = [
            summary[p]["mAP"] if metric == "mAP" else summary[p]["recall"][metric[2:]]
            for p in ptypes
        ]
        return {"name": name, "head": head, "gallery": gallery, "values": vals,
                "mean": float(np.mean(vals)), "strong": strong}  # fmt: skip

    rows = []
    for name, o in outcomes.items():
        raw, head, controls = o.results(part)
        for which, res in (("raw", raw), ("head", head)):
            label = "none (raw)" if which == "raw" else f"trained {o.head_kind}"
            rows.append(row(name, label, "AbC protocol", res.summary(), which == "head"))
            if metric == "mAP":
                rows += [
                    row(name, label, k.split(", ", 1)[1], r.summary())
                    for k, r in controls.items()
                    if k.startswith(which)
                ]
    rows.append(row("chance", "", "random ranking", chance))
    return {"rows": rows}


def _chance(result: Any, gallery_size: int) -> dict:
    """Expected metrics of a random ranking of exemplars + gallery, per prompt type."""
    out = {}
    for p, r in result.per_type.items():
        e = r.n_exemplars.astype(float)
        n = e + gallery_size
        out[p] = {
            "mAP": float(np.mean(expected_random_ap(e, n))),
            "recall": {str(k): float(np.mean(np.minimum(1.0, k / n))) for k in result.ks},
        }
    return out


def _sets_plot(outcomes: dict, ptypes: Sequence[str], chance: dict) -> str:
    """A data URI of mAP against the set size N, one panel per prompt type of the captioned
    sets: raw features dashed, the head solid, the query-independent control dotted (a
    method must stay above it), chance grey."""
    plt = _pyplot()
    kinds = sorted({p.split(": ", 1)[1] for p in ptypes}, key=lambda k: k != "set")
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        cols = [p for p in ptypes if p.endswith(f": {kind}")]
        sizes = [int(p.split(":")[0].split("-")[1]) for p in cols]
        for c, (name, o) in enumerate(outcomes.items()):
            for key, ls in (("raw", "--"), ("head", "-"), ("raw, query-independent", ":")):
                summary = o.sets[key].summary()
                label = f"{name} ({key})"
                ax.plot(sizes, [summary[p]["mAP"] for p in cols], ls, color=f"C{c}", label=label)
        ax.plot(sizes, [chance[p]["mAP"] for p in cols], color="grey", lw=1, label="chance")
        ax.set(xscale="log", yscale="log", xlabel="images in the set (N)", title=kind)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mAP (set models)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _fig_uri(fig)


def _counterfactual_view(study: dict[str, Any]) -> dict[str, Any]:
    """The counterfactual section's rows (best LDS first; exemplar mAP beside), the
    leave-K-out rows and the LDS figure."""
    lds, ex = study["lds"], study["exemplar"]
    order = sorted(lds["methods"], key=lambda k: -lds["methods"][k]["lds"]["mean"])
    most = max(lds["methods"][k]["lds"]["n"] for k in order)

    def name(k: str) -> str:  # a method scored on fewer queries says so
        n = lds["methods"][k]["lds"]["n"]
        return k if n == most else f"{k} ({n} queries)"

    rows = [
        {
            "name": name(k),
            "lds": lds["methods"][k]["lds"],
            "vs_random": lds["methods"][k]["minus_random"],
            "map": ex.get("methods", {}).get(k, {}).get("map"),
            "control": k.startswith("control: ") or k in ("random", "text alone"),
        }
        for k in order
    ]
    loo = study.get("leave_k_out")
    loo_rows, fractions = [], []
    if loo:
        fractions = sorted(next(iter(loo["methods"].values())), key=float)
        loo_rows = [
            {
                "name": k,
                "cells": [by_k[f] for f in fractions],
                "control": k == loo["control"] or k == "random",
            }
            for k, by_k in loo["methods"].items()
        ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(rows) + 1.0))
    y = np.arange(len(rows))[::-1]
    for yy, r in zip(y, rows, strict=True):
        s = r["lds"]
        ax.errorbar(s["mean"], yy, xerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]],
                    fmt="o", color="grey" if r["control"] else "C0", capsize=3)  # fmt: skip
    if lds.get("ceiling"):
        ax.axvline(lds["ceiling"]["mean"], color="C3", ls="--", label="retraining-seed ceiling")
        ax.legend(fontsize=7, loc="lower right")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.set_xlabel("LDS (mean over queries, 95 % bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return {
        **study,
        "rows": rows,
        "loo_rows": loo_rows,
        "fractions": fractions,
        "plot": _fig_uri(fig),
    }


def _recall_curves(outcomes: dict, ptypes: Sequence[str]) -> str:
    """A data URI of Recall@K against K, one panel per prompt type."""
    plt = _pyplot()
    cols = min(2, len(ptypes))
    rows = -(-len(ptypes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(ptypes) :]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, ptypes, strict=False):
        for c, (name, o) in enumerate(outcomes.items()):
            ks = o.raw.ks
            for res, ls in ((o.raw, "--"), (o.head, "-")):
                r = res.per_type[p].recall.mean(axis=0)
                label = f"{name} ({'raw' if res is o.raw else 'head'})"
                ax.plot(ks, r, ls, color=f"C{c}", lw=1.4, label=label)
        ax.set(xscale="log", ylim=(0, 1.02), xlabel="K", title=p)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("Recall@K (test models)")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _fig_uri(fig)


def kept_epoch(history: Sequence[dict], best_epoch: int) -> dict | None:
    """The history entry of the epoch a head kept (entries are looked up by their "epoch":
    the first, epoch -1, is the untrained heads), or None where it has no val mAP."""
    return next((h for h in history if h["epoch"] == best_epoch and "val_mAP" in h), None)


def training_figure(outcomes: dict) -> Any:
    """The heads' loss and val mAP per epoch (epoch -1: untrained), a matplotlib figure; a
    dot on each val curve marks the epoch kept, named in the legend."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for c, (name, o) in enumerate(outcomes.items()):
        ep = [h["epoch"] for h in o.history]
        a1.plot(ep, [h["loss"] for h in o.history], color=f"C{c}", label=name)
        a2.plot(ep, [h.get("val_mAP", np.nan) for h in o.history], color=f"C{c}", label=name)
        kept = kept_epoch(o.history, o.best_epoch)
        if kept is not None:
            a2.scatter([kept["epoch"]], [kept["val_mAP"]], color=f"C{c}", zorder=3)
    galleries = sorted({o.val_gallery for o in outcomes.values()})
    a1.set(xlabel="epoch", ylabel="NT-Xent loss (train models)")
    a2.set(xlabel="epoch", ylabel=f"mAP (val models, {' / '.join(galleries)})")
    handles, _ = a2.get_legend_handles_labels()
    dot = Line2D([], [], ls="", marker="o", color="grey", label="epoch kept (best val mAP)")
    a2.legend(handles=[*handles, dot], fontsize=7)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _model_samples(models: Sequence[Any], per_type: int = 4) -> list[dict]:
    return [
        {
            "id": m.id,
            "mode": m.mode,
            "category": m.category,
            "n_exemplars": len(m.exemplars),
            "exemplars": [img_tag(p, 64, "exemplar") for p in m.exemplars[:4]],
            "samples": [
                img_tag(p, 64, "sample") for paths in m.synth.values() for p in paths[:per_type]
            ],
        }
        for m in models
    ]


def _percent(p: float | None) -> str:
    """An influence as the report writes it: percent with two decimals, "< 0.01 %" above 0."""
    if p is None:
        return "none (no calibrator)"
    if 0 < p < 5e-5:
        return "< 0.01 %"
    return f"{100 * p:.2f} %"


def _shown_query(q: Any, top_k: int, describe: Any) -> dict:
    """One attributed test query (`genattr.workflows.demo_queries.ShownQuery`) as the page
    shows it."""
    m = q.model
    return {
        "id": m.id,
        "what": m.mode + (f", {m.category}" if m.category else ""),
        "prompt_type": q.prompt_type,
        "truth": [img_tag(p, 64, "exemplar") for p in m.exemplars[:6]],
        "section": attribution_section(q.answer, set(m.exemplars), caption=describe),
        "rank": q.rank,
        "influence": _percent(q.influence),
        "hit": q.hit,
        "n_exemplars": len(m.exemplars),
        "in_top": sum(r <= top_k for r in q.exemplar_ranks),
        "ranks": sorted(q.exemplar_ranks),
    }


def write_demo_report(
    path: str | os.PathLike,
    *,
    data: Any,
    bench: Any,
    manifest: Any,
    outcomes: dict,
    best: str,
    shown: Sequence[Any],
    shown_stats: dict[str, Any],
    base_grid: Path,
    base_training: str,
    seconds: dict[str, float],
    sets_manifest: Any,
    sets_info: dict[str, Any],
    counterfactual: dict[str, Any] | None = None,
) -> Path:
    """Write the page; every picture is embedded, so the file can be mailed or archived.

    `shown`: the attributed test queries (`genattr.workflows.demo_queries.ShownQuery`), and
    `shown_stats` their hit rate beside the evaluation's
    (`genattr.workflows.demo_queries.shown_summary`); `counterfactual`: the packed study's
    summary (`genattr.workflows.demo.counterfactual_summary`), its section left out if None.
    """
    first = next(iter(outcomes.values()))
    ptypes = list(first.raw.per_type)
    n_gallery = len(data.indices("pretrain"))
    splits = {s: len(manifest.split(s).models) for s in ("train", "val", "test")}
    chance = _chance(first.raw, n_gallery)
    set_ptypes = list(first.sets["raw"].per_type)
    set_chance = _chance(first.sets["raw"], n_gallery)
    b = outcomes[best]
    cal = {
        k: float("nan")
        for k in ("true_mass", "nll", "softmax_t1_nll", "uniform_nll", "softmax_fitted_nll")
    }
    cal.update(b.calibration.get("heldout", {}))

    def describe(r: Any) -> str:
        """The training image's caption (its file is named by its index in the world data)."""
        stem = Path(r.path).stem
        return data.records[int(stem)]["caption"] if stem.isdigit() else r.id

    page = TEMPLATES.get_template("demo_report.html.j2").render(
        style=Markup(PAGE_STYLE),
        n_gallery=n_gallery,
        n_models=len(manifest.models),
        splits=splits,
        n_images=len(bench.images),
        seconds=seconds,
        ptypes=ptypes,
        tables={m: _table(outcomes, ptypes, chance, m) for m in ("mAP", "R@10", "R@100")},
        set_ptypes=set_ptypes,
        set_tables={
            m: _table(outcomes, set_ptypes, set_chance, m, "sets") for m in ("mAP", "R@10")
        },
        sets_plot=_sets_plot(outcomes, set_ptypes, set_chance),
        sets_info=sets_info,
        recall_plot=_recall_curves(outcomes, ptypes),
        head_kinds=", ".join(sorted({o.head_kind for o in outcomes.values()})),
        training_plot=_fig_uri(training_figure(outcomes)),
        best=best,
        cal=cal,
        reliability_plot=None if b.reliability_plot is None else _file_uri(b.reliability_plot),
        queries=[_shown_query(q, shown_stats["top_k"], describe) for q in shown],
        shown_stats=shown_stats,
        base_training=base_training,
        base_grid=_file_uri(base_grid),
        counterfactual=None if counterfactual is None else _counterfactual_view(counterfactual),
        models=_model_samples(
            [m for m in manifest.models if m.split == "test"][:6]
            + [next(m for m in sets_manifest.models if len(m.exemplars) == n) for n in (4, 16)]
        ),
    )
    path = Path(path)
    write_text_atomic(path, page)
    return path
