"""`genattr calibrate`: stores, manifest and head in; calibrator.json and its reliability plot
out."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from genattr.atomic import check_output
from genattr.calibrate import (
    Calibrator,
    calibration_report,
    calibration_set,
    fit_calibrator,
    fit_softmax_temperature,
    save_calibrator,
    softmax_nll,
)
from genattr.data.benchmark import read_benchmark
from genattr.errors import GenattrError
from genattr.report.plots import reliability_plot
from genattr.store import EmbeddingStore, check_same_backbone
from genattr.store.join import testcase_from_stores
from genattr.workflows.artifacts import open_head_for

log = logging.getLogger(__name__)


def calibrate_from_stores(
    bench: str | os.PathLike,
    store_real: str | os.PathLike,
    store_synth: str | os.PathLike,
    distractors: str | os.PathLike,
    out: str | os.PathLike,
    *,
    head: str | os.PathLike | None = None,
    top_l: int = 100,
    heldout_fraction: float = 0.3,
    seed: int = 0,
) -> Calibrator:
    """`genattr calibrate`: fit on the manifest's val models, report on a held-out share of
    them (split by model), write calibrator.json and a reliability plot beside it.

    Args:
        bench: the benchmark manifest (its val models are used).
        store_real, store_synth, distractors: embedding stores of the exemplars, the
            synthesized images and the distractor training images.
        out: calibrator.json to write.
        head: a head folder from `train-head` (None: raw features).
        top_l: candidates per query (shrunk to the gallery when it is smaller).
        heldout_fraction: share of the val models held out for the report.
        seed: the held-out split's seed.
    """
    if top_l < 2:
        raise GenattrError(
            f"--top-l must be at least 2 (an exemplar and a distractor), not {top_l}"
        )
    if not 0 <= heldout_fraction < 1:
        raise GenattrError(f"--heldout-fraction must be in [0, 1), not {heldout_fraction}")
    check_output(out, "file")
    manifest = read_benchmark(bench)
    models = [i for i, m in enumerate(manifest.models) if m.split == "val"]
    if not models:
        models = list(range(len(manifest.models)))  # an all-test manifest: use what there is
    real, synth, dist = (EmbeddingStore.open(p) for p in (store_real, store_synth, distractors))
    check_same_backbone(real, dist)
    tc, _ = testcase_from_stores(manifest, real, synth)
    narrowest = min(e - s for s, e in tc.exemplar_chunks)
    if top_l - narrowest > len(dist):  # a small gallery: every distractor is a candidate
        log.warning(
            "--top-l %d is more than the gallery's %d images and the smallest exemplar set; "
            "using %d candidates per query",
            top_l, len(dist), len(dist) + narrowest,
        )  # fmt: skip
        top_l = len(dist) + narrowest
    mappers = open_head_for(head, real)[0] if head is not None else None
    rng = np.random.default_rng(seed)
    rng.shuffle(models)
    n_held = round(heldout_fraction * len(models)) if len(models) > 1 else 0
    held, fit = set(models[:n_held]), set(models[n_held:])
    fit_set = calibration_set(dist.vectors, tc.select_models(fit), mappers, top_l)
    cal = fit_calibrator(fit_set)
    if held:
        held_set = calibration_set(dist.vectors, tc.select_models(held), mappers, top_l)
        report = calibration_report(cal, held_set)
        report["softmax_t1_nll"] = softmax_nll(held_set, 1.0)
        # What the calibrator must beat: a uniform spread (ln L) and the best plain softmax.
        report["uniform_nll"] = math.log(top_l)
        temperature = fit_softmax_temperature(fit_set)
        report["softmax_fitted_temperature"] = temperature
        report["softmax_fitted_nll"] = softmax_nll(held_set, temperature)
        plot = Path(out).with_suffix(".reliability.png")
        reliability_plot(cal.probabilities(held_set.scores), held_set.is_true, plot)
        cal.fit_report["heldout"] = report
        cal.fit_report["reliability_plot"] = plot.name
    cal.fit_report.update(
        {"bench": str(bench), "top_l": top_l, "head": None if head is None else str(head)}
    )
    save_calibrator(cal, out)
    return cal
