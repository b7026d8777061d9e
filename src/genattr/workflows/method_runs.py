"""Running a scoring method (`genattr.workflows.model_methods`): `genattr evaluate --method`
over a benchmark's models, each beside the query-blind controls that could explain its number
away, and `genattr attribute --method` on images of one customized model.

Two galleries: AbC's (pre-training images plus the query's own exemplars) and the model's
(plus every exemplar set the model was tuned on: for a multi-concept model, the fair one).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genattr.atomic import check_output
from genattr.attribution import AttributedImage, Attribution
from genattr.customize.examples import read_square
from genattr.customize.pipeline import load_base_pipeline
from genattr.data.official import TestCaseFeatures
from genattr.devices import resolve_device
from genattr.errors import GenattrError
from genattr.evaluate import (
    DEFAULT_KS,
    EvaluationResult,
    evaluate_scores,
    expected_random_ap,
    write_results,
)
from genattr.workflows.model_cases import (
    ImageSet,
    ImageSource,
    ModelCase,
    bench_resolution,
    custom_model,
    folder_gallery,
    image_prompt,
    manifest_cases,
    multiconcept_cases,
    pipeline_resolution,
    world_cases,
    world_gallery,
    world_model,
)
from genattr.workflows.model_methods import ScoringMethod, make_method

logger = logging.getLogger(__name__)

GALLERIES = ("abc", "model")


@dataclass
class MethodEvaluation:
    """A method's results on both galleries, its controls', chance and costs."""

    method: str
    results: dict[str, EvaluationResult]
    controls: dict[str, dict[str, EvaluationResult]]
    chance: dict[str, float]
    seconds: dict[str, float]
    storage_bytes_per_image: int
    n_queries: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "results": {g: r.summary() for g, r in self.results.items()},
            "controls": {
                name: {g: r.summary() for g, r in by_gallery.items()}
                for name, by_gallery in self.controls.items()
            },
            "chance": self.chance,
            "seconds": self.seconds,
            "storage_bytes_per_image": self.storage_bytes_per_image,
            "n_queries": self.n_queries,
        }


@dataclass
class _Rows:
    """Score rows, per prompt type, in the combined test case's order."""

    gallery: dict[str, list[np.ndarray]] = field(default_factory=dict)
    exemplars: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, ptype: str, g: np.ndarray, e: np.ndarray) -> None:
        self.gallery.setdefault(ptype, []).append(g)
        self.exemplars.setdefault(ptype, []).append(e)


def _testcase(cases: Sequence[ModelCase], ptypes: list[str]) -> TestCaseFeatures:
    chunks, start = [], 0
    synth_ids: dict[str, list[int]] = {p: [] for p in ptypes}
    g = 0
    for case in cases:
        for concept in case.concepts:
            chunks.append((start, start + len(concept.exemplars)))
            start += len(concept.exemplars)
            for p in ptypes:
                synth_ids[p] += [g] * len(concept.queries.get(p, ()))
            g += 1
    return TestCaseFeatures(
        [],
        chunks,
        torch.zeros(start, 1),
        {},
        synth_ids,
        {p: torch.zeros(len(ids), 1) for p, ids in synth_ids.items()},
    )


def _evaluate(rows: _Rows, tc: TestCaseFeatures, ks: Sequence[int]) -> dict[str, EvaluationResult]:
    ptypes = tc.prompt_types
    gal = np.concatenate([np.concatenate(rows.gallery[p]) for p in ptypes])
    ex = np.concatenate([np.concatenate(rows.exemplars[p]) for p in ptypes])
    finite = np.concatenate([gal.ravel(), ex[np.isfinite(ex)]])
    ex = np.where(np.isfinite(ex), ex, finite.min() - 1.0)  # other models' exemplars: never above
    return {
        "abc": evaluate_scores(gal, ex, tc, ks),
        "model": evaluate_scores(gal, ex, tc, ks, exemplars_as_distractors=True),
    }


def evaluate_method(
    method: ScoringMethod,
    cases: Sequence[ModelCase],
    gallery: ImageSource,
    *,
    work: str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
) -> MethodEvaluation:
    """Run `method` on every model of `cases` and evaluate it, its controls beside it.

    Args:
        method: the scoring method (gradients, unlearning, features...).
        cases: the customized models and their queries.
        gallery: the training images every model shares.
        work: where methods keep what they compute per model (gradient stores, rebuilt
            models); None: a temporary folder.
        ks: the Recall@K cut-offs.
        progress: draw progress bars.
    """
    if not cases:
        raise GenattrError("no models to evaluate")
    ptypes = list(dict.fromkeys(p for c in cases for k in c.concepts for p in k.queries))
    n_ex_total = sum(len(k.exemplars) for c in cases for k in c.concepts)
    method_rows, control_rows = _Rows(), dict[str, _Rows]()
    seconds = {"load": 0.0, "prepare": 0.0, "queries": 0.0}
    offset, n_queries = 0, 0
    for case in cases:
        t0 = time.perf_counter()
        pipe: Any = None  # a feature method never rebuilds or loads a model
        key: str | None = None
        if method.needs_model:
            logger.info("model %s: loading", case.id)
            loaded = case.load()
            pipe, key = loaded.pipe, loaded.key
        t1 = time.perf_counter()
        exemplars = case.exemplars()
        folder = None if work is None else Path(work) / method.name / case.id
        method.prepare(pipe, [gallery, exemplars], folder, progress, model_key=key)
        t2 = time.perf_counter()
        per_concept = []
        for concept in case.concepts:
            per_concept.append(
                {p: method.scores(pipe, q, progress) for p, q in concept.queries.items()}
            )
        t3 = time.perf_counter()
        seconds["load"] += t1 - t0
        seconds["prepare"] += t2 - t1
        seconds["queries"] += t3 - t2
        all_rows = np.concatenate([s for d in per_concept for s in d.values()])
        n_queries += len(all_rows)
        blind = {**method.controls(), "mean query": all_rows.mean(0)}
        G = len(gallery)
        for by_type in per_concept:
            for p, s in by_type.items():
                ex = np.full((len(s), n_ex_total), np.nan)
                ex[:, offset : offset + len(exemplars)] = s[:, G:]
                method_rows.add(p, s[:, :G], ex)
                for name, c in blind.items():
                    row = np.repeat(c[None].astype(np.float64), len(s), 0)
                    ex_c = np.full((len(s), n_ex_total), np.nan)
                    ex_c[:, offset : offset + len(exemplars)] = row[:, G:]
                    control_rows.setdefault(name, _Rows()).add(p, row[:, :G], ex_c)
        offset += len(exemplars)
        del pipe
    tc = _testcase(cases, ptypes)
    results = _evaluate(method_rows, tc, ks)
    controls = {name: _evaluate(rows, tc, ks) for name, rows in control_rows.items()}
    chance = _chance(cases, len(gallery))
    seconds["per_query"] = seconds["queries"] / max(n_queries, 1)
    return MethodEvaluation(
        method.name,
        results,
        controls,
        chance,
        seconds,
        method.storage_bytes_per_image(),
        n_queries,
    )


def _chance(cases: Sequence[ModelCase], n_gallery: int) -> dict[str, float]:
    """Expected AP of a random ranking (`expected_random_ap`), averaged over concepts."""
    abc, model = [], []
    for case in cases:
        n_model = sum(len(k.exemplars) for k in case.concepts)
        for k in case.concepts:
            e = len(k.exemplars)
            abc.append(float(expected_random_ap(e, n_gallery + e)))
            model.append(float(expected_random_ap(e, n_gallery + n_model)))
    return {"abc": float(np.mean(abc)), "model": float(np.mean(model))}


def write_method_results(evaluation: MethodEvaluation, out: str | os.PathLike) -> None:
    """results.json and its per-query parquet (the AbC gallery's, as `genattr evaluate`), plus
    the model gallery, the controls, chance and costs in the same JSON."""
    doc = evaluation.to_json()
    write_results(
        evaluation.results["abc"],
        out,
        method=evaluation.method,
        settings=doc["settings"],
        model_gallery=doc["results"]["model"],
        controls=doc["controls"],
        chance=doc["chance"],
        seconds=doc["seconds"],
        storage_bytes_per_image=doc["storage_bytes_per_image"],
        n_queries=doc["n_queries"],
    )
    logger.info("results written to %s", out)


def results_lines(evaluation: MethodEvaluation) -> list[str]:
    """One line per (gallery, score): mAP per prompt type, the method's first, then controls."""
    lines = []
    for g in GALLERIES:
        kernel = evaluation.settings.get("kernel")
        label = evaluation.method + (f" ({kernel})" if evaluation.method == "gradient" else "")
        rows = [(label, evaluation.results[g])]
        rows += [(f"  control: {n}", r[g]) for n, r in evaluation.controls.items()]
        lines.append(f"{g} gallery (chance mAP {evaluation.chance[g]:.4f})")
        for name, r in rows:
            s = r.summary()
            cells = "  ".join(
                f"{p} mAP {v['mAP']:.3f} R@10 {v['recall'].get('10', float('nan')):.3f}"
                for p, v in s.items()
            )
            lines.append(f"  {name:<28} {cells}")
    return lines


def evaluate_benchmark(
    method: str,
    bench: str | os.PathLike,
    out: str | os.PathLike,
    *,
    gallery: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    work: str | os.PathLike | None = None,
    models: Sequence[str] | None = None,
    queries: int | None = None,
    device: str = "cpu",
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
    options: dict[str, Any] | None = None,
) -> MethodEvaluation:
    """`genattr evaluate --method M --bench B`: `B` is `world` (the built-in world's test
    models, rebuilt on demand into `work`), `world-multiconcept` (its multi-concept models:
    read the "model" gallery) or a make-benchmark `manifest.json` with a gallery folder and
    its captions. Writes `out` (results.json) and returns the evaluation."""
    resolve_device(device)
    check_output(out, "file")
    scorer = make_method(method, **dict(options or {}))
    work = Path(work) if work is not None else Path(out).parent / "work"
    source: ImageSource
    if str(bench) in ("world", "world-multiconcept"):
        if device != "cpu":
            raise GenattrError("the built-in world runs on the CPU; drop --device")
        if gallery is not None:
            raise GenattrError("--gallery is the world's own pre-training set; drop it")
        source = world_gallery()
        if str(bench) == "world":
            cases = world_cases(work, models, queries)
        else:
            cases = multiconcept_cases(work, models, queries)
    else:
        if gallery is None or captions is None:
            raise GenattrError("--bench MANIFEST needs --gallery DIR and --captions FILE|TEXT")
        cases = manifest_cases(bench, models, queries, device=device, split="test")
        source = folder_gallery(gallery, captions, bench_resolution(bench))
    evaluation = evaluate_method(scorer, cases, source, work=work, ks=ks, progress=progress)
    evaluation.settings = {
        "bench": str(bench),
        "models": [c.id for c in cases],
        "queries_per_model": queries,
        **{k: v for k, v in (options or {}).items()},
    }
    write_method_results(evaluation, out)
    return evaluation


def _query_set(images: Sequence[str | os.PathLike], prompt: str | None, side: int) -> ImageSet:
    """Query files at the model's resolution, each with `prompt` or the prompt genattr's
    sampler recorded in it."""
    prompts = []
    for p in images:
        text = prompt if prompt is not None else image_prompt(p)
        if text is None:
            raise GenattrError(f"{p}: no prompt recorded in the image; give --prompt")
        prompts.append(text)
    arrays = np.stack([read_square(p, side) for p in images])
    return ImageSet(arrays, prompts, [str(p) for p in images])


def attribute_with_model(
    method: str,
    images: Sequence[str | os.PathLike],
    model: str,
    *,
    base: str | None = None,
    gallery: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    prompt: str | None = None,
    work: str | os.PathLike = "genattr-work",
    top_k: int = 20,
    device: str = "cpu",
    progress: bool = False,
    options: dict[str, Any] | None = None,
) -> list[Attribution]:
    """`genattr attribute --method gradient`: score a training set (`gallery` with its
    captions) for each image under the customized model that made it (`model`: a Custom
    Diffusion folder on `base`, or `world:ID` for a world model with the world's pre-training
    set as default gallery). The precomputation is cached under `work`, per model."""
    resolve_device(device)
    if top_k < 1:
        raise GenattrError(f"--top-k must be at least 1, not {top_k}")
    scorer = make_method(method, **dict(options or {}))
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:  # before any model is loaded or rebuilt
        raise GenattrError(f"{missing[0]}: no such image file")
    if model.startswith("world:"):
        if device != "cpu":
            raise GenattrError("the built-in world runs on the CPU; drop --device")
        loaded = world_model(model.removeprefix("world:"), Path(work))
    else:
        if base is None or gallery is None or captions is None:
            raise GenattrError("--model DIR needs --base, --gallery and --captions")
        loaded = custom_model(load_base_pipeline(base, device), model)
    side = pipeline_resolution(loaded.pipe)
    source: ImageSource = (  # only a world model has a default gallery, its pre-training set
        world_gallery() if gallery is None else folder_gallery(gallery, captions or "", side)
    )
    queries = _query_set(images, prompt, side)
    folder = Path(work) / scorer.name / loaded.key
    scorer.prepare(loaded.pipe, [source], folder, progress, model_key=loaded.key)
    scores = scorer.scores(loaded.pipe, queries, progress)
    paths = getattr(source, "paths", None)
    answers = []
    for q, row in zip(queries.ids, scores, strict=True):
        top = np.argsort(-row, kind="stable")[:top_k]
        results = [
            AttributedImage(
                r + 1,
                source.ids[i],
                str(paths[i]) if paths is not None else source.ids[i],
                float(row[i]),
                None,
            )
            for r, i in enumerate(top)
        ]
        note = f"{scorer.name} scores under {model} (not calibrated: no influence shares)"
        answers.append(Attribution(q, results, None, True, [note]))
    return answers
