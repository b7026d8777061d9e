"""`demo-out/report.html`: the miniature world's results in one self-contained page.

Tables first (what was measured), then the pictures that make the numbers believable: recall
against K, head training curves, calibration, a few attributed test queries beside their true
exemplars, and samples of the base model and of customized models.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genattr.atomic import write_text_atomic
from genattr.report.attribution_html import STYLE, attribution_section, img_tag

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


def _table(outcomes: dict, ptypes: Sequence[str], chance: dict, metric: str = "mAP") -> str:
    """One row per feature space, head and gallery (the AbC protocol, then its two controls),
    one column per test case and prompt type: mAP, or Recall@K with metric "R@K"."""
    head = "".join(f"<th>{html.escape(p)}</th>" for p in ptypes) + "<th>mean</th>"
    rows = [
        "<table><tr><th class='l'>feature space</th><th class='l'>head</th>"
        f"<th class='l'>gallery / score</th>{head}</tr>"
    ]

    def value(s: dict) -> float:
        return s["mAP"] if metric == "mAP" else s["recall"][metric[2:]]

    def cells(summary: dict) -> str:
        vals = [value(summary[p]) for p in ptypes]
        return "".join(f"<td>{v:.3f}</td>" for v in vals) + f"<td>{np.mean(vals):.3f}</td>"

    for name, o in outcomes.items():
        for which, res in (("raw", o.raw), ("head", o.head)):
            label = "none (raw)" if which == "raw" else f"trained {o.head_kind}"
            runs = [("AbC protocol", res)]
            if metric == "mAP":
                runs += [
                    (k.split(", ", 1)[1], r) for k, r in o.controls.items() if k.startswith(which)
                ]
            for gallery, r in runs:
                cls = " class='head'" if which == "head" and gallery == "AbC protocol" else ""
                rows.append(
                    f"<tr{cls}><td class='l'>{html.escape(name)}</td><td class='l'>{label}</td>"
                    f"<td class='l'>{html.escape(gallery)}</td>{cells(r.summary())}</tr>"
                )
    rows.append(
        "<tr><td class='l'>chance</td><td class='l'></td><td class='l'>random ranking</td>"
        f"{cells(chance)}</tr>"
    )
    rows.append("</table>")
    return "\n".join(rows)


def _chance(outcome: Any, gallery_size: int) -> dict:
    """Expected metrics of a random ranking of exemplars + gallery, per prompt type."""
    out = {}
    for p, r in outcome.raw.per_type.items():
        e = r.n_exemplars.astype(float)
        n = e + gallery_size
        out[p] = {
            "mAP": float(np.mean(e / n)),
            "recall": {str(k): float(np.mean(np.minimum(1.0, k / n))) for k in outcome.raw.ks},
        }
    return out


def _recall_curves(outcomes: dict, ptypes: Sequence[str]) -> str:
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
    return f"<img src='{_fig_uri(fig)}' alt='recall against K'>"


def _training_curves(outcomes: dict) -> str:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for c, (name, o) in enumerate(outcomes.items()):
        ep = [h["epoch"] for h in o.history]
        a1.plot(ep, [h["loss"] for h in o.history], color=f"C{c}", label=name)
        a2.plot(ep, [h.get("val_mAP", np.nan) for h in o.history], color=f"C{c}", label=name)
        if o.best_epoch >= 0:
            a2.scatter([o.best_epoch], [o.history[o.best_epoch]["val_mAP"]], color=f"C{c}")
    a1.set(xlabel="epoch", ylabel="NT-Xent loss (train models)")
    a2.set(xlabel="epoch", ylabel="mAP (val models)")
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return f"<img src='{_fig_uri(fig)}' alt='head training curves'>"


def _model_samples(models: Sequence[Any], per_type: int = 4) -> str:
    parts = ["<div class='models'>"]
    for m in models:
        cells = [img_tag(p, 64, "exemplar") for p in m.exemplars[:4]]
        parts.append(
            f"<figure><div class='grid'>{''.join(cells)}<span>&rarr;</span>"
            + "".join(
                img_tag(p, 64, "sample") for paths in m.synth.values() for p in paths[:per_type]
            )
            + f"</div><figcaption>{html.escape(m.id)} ({html.escape(m.mode)}"
            + (f", '{html.escape(m.category)}'" if m.category else "")
            + f", {len(m.exemplars)} exemplar(s)): exemplars, then samples of its prompt types"
            "</figcaption></figure>"
        )
    parts.append("</div>")
    return "\n".join(parts)


def write_demo_report(
    path: str | os.PathLike,
    *,
    data: Any,
    bench: Any,
    manifest: Any,
    outcomes: dict,
    best: str,
    answers: Sequence[Any],
    queries: Sequence[Any],
    base_grid: Path,
    base_training: str,
    seconds: dict[str, float],
) -> Path:
    """Write the page; every picture is embedded, so the file can be mailed or archived."""
    first = next(iter(outcomes.values()))
    ptypes = list(first.raw.per_type)
    n_gallery = len(data.indices("pretrain"))
    splits = {s: len(manifest.split(s).models) for s in ("train", "val", "test")}
    chance = _chance(first, n_gallery)
    b = outcomes[best]
    cal = {
        k: float("nan")
        for k in ("true_mass", "nll", "softmax_t1_nll", "uniform_nll", "softmax_fitted_nll")
    }
    cal.update(b.calibration.get("heldout", {}))
    parts = [
        "<!doctype html><meta charset='utf-8'><title>genattr demo: the miniature world</title>",
        PAGE_STYLE,
        "<h1>Data attribution in the miniature world</h1>",
        f"<p>A text-to-image diffusion model trained here on {n_gallery} public-domain clip-art "
        f"images (32&times;32), customized with Custom Diffusion on {len(manifest.models)} "
        f"held-out exemplar sets ({splits['train']} train / {splits['val']} val / "
        f"{splits['test']} test models), {len(bench.images)} synthesized images. "
        "Each synthesized image's true training images are its model's exemplars. Scores are "
        "on the test models; the gallery is the pre-training set, as in the AbC protocol "
        f"(Wang et al., ICCV 2023). Run time: {seconds.get('total', 0):.0f} s.</p>",
        "<section class='block'><h2>Results on held-out test models</h2>",
        "<p>mAP per test case (objects of kinds the base model was trained on, objects of "
        "kinds it never saw, artists' styles) and prompt type. Beside each result, two "
        "controls: the <b>stricter gallery</b> adds every other held-out exemplar as a "
        "distractor, so being absent from pre-training is not enough to rank first; the "
        "<b>query-independent</b> score ranks every image by its mean similarity to all "
        "queries, ignoring which image was asked about. A method that attributes must stay "
        "far above the second and near its own number on the first.</p>",
        _table(outcomes, ptypes, chance),
        "<p>Recall@10 and Recall@100, AbC protocol:</p>",
        _table(outcomes, ptypes, chance, "R@10"),
        _table(outcomes, ptypes, chance, "R@100"),
        "</section><section class='block'><h2>Recall against K</h2>",
        "<p>Dashed: raw features; solid: with the trained head.</p>",
        _recall_curves(outcomes, ptypes),
        "</section><section class='block'><h2>Head training</h2>",
        f"<p>Heads ({html.escape(', '.join(sorted({o.head_kind for o in outcomes.values()})))})"
        " trained with a multi-positive contrastive loss on the train models; the epoch with "
        "the best val mAP (dot) is kept.</p>",
        _training_curves(outcomes),
        "</section><section class='block'><h2>Calibrated influence</h2>",
        f"<p>{html.escape(best)} + head. On held-out val models the calibrator puts "
        f"{100 * cal['true_mass']:.1f} % of the influence on true exemplars; held-out NLL "
        f"{cal['nll']:.3f} against {cal['uniform_nll']:.3f} for a uniform spread over the "
        f"candidates (ln L) and {cal['softmax_fitted_nll']:.3f} for a plain softmax at its best "
        "temperature.</p>",
    ]
    if b.reliability_plot is not None:
        parts.append(f"<img src='{_file_uri(b.reliability_plot)}' alt='reliability plot'>")
    parts.append(
        "</section><section class='block'><h2>Attributed test queries</h2>"
        f"<p>Top-10 training images by {html.escape(best)} + head, sized by calibrated "
        "influence; true exemplars outlined in green. Left of each row, the model's exemplars.</p>"
    )

    def describe(r: Any) -> str:
        """The training image's caption (its file is named by its index in the world data)."""
        stem = Path(r.path).stem
        return data.records[int(stem)]["caption"] if stem.isdigit() else r.id

    for a, m in zip(answers, queries, strict=True):
        truth = "".join(img_tag(p, 64, "exemplar") for p in m.exemplars[:6])
        what = html.escape(m.mode) + (f", {html.escape(m.category)}" if m.category else "")
        parts.append(
            f"<h3>{html.escape(m.id)} ({what})</h3><div class='row'><figure>"
            f"<div class='grid'>{truth}</div>"
            "<figcaption>true exemplars</figcaption></figure></div>"
        )
        parts.append(attribution_section(a, set(m.exemplars), caption=describe))
    sample_models = [m for m in manifest.models if m.split == "test"][:6]
    parts += [
        "</section><section class='block'><h2>The world's models</h2>",
        f"<p>Base model ({html.escape(base_training)}): a real training image of each curated "
        "group (top row), then two rows of samples for the same captions.</p>",
        f"<img src='{_file_uri(base_grid)}' alt='base model samples'>",
        "<p>Customized models (test split): exemplars, then samples.</p>",
        _model_samples(sample_models),
        "</section><section class='block'><h2>Time per stage</h2><table>",
        *(
            f"<tr><td class='l'>{html.escape(k)}</td><td>{v:.1f} s</td></tr>"
            for k, v in seconds.items()
        ),
        "</table></section>",
    ]
    path = Path(path)
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path
