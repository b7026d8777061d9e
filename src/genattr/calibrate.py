"""Soft influence scores: the authors' calibrator, fitted, applied, evaluated, saved.

On one query's similarities sorted in descending order s_1 >= s_2 >= ...:
    a_i = exp(inv_tau * s_i - max_j inv_tau * s_j),  t_i = relu(a_i + b),  p_i = t_i / sum_j t_j
with b = bias * 1e-3. With b < 0 only images whose similarity is within
log(-1/b) / inv_tau of the best match keep any mass, so influence concentrates on the few
training images that really resemble the generated one. Fitting minimises cross-entropy to a
uniform target over the query's true exemplars, with softplus(beta=100) in place of the relu
so gradients flow (the authors' `Calibrator.loss_forward`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genattr.atomic import atomic_path, write_text_atomic
from genattr.data.official import TestCaseFeatures
from genattr.errors import GenattrError, validation_reason
from genattr.heads.checkpoint import MapperPair
from genattr.search.exact import topk_exact
from genattr.vectors import FeatureMatrix, embed

CALIBRATOR_FORMAT_VERSION = 1
BIAS_GAIN = 1e-3


class CalibratorHeader(BaseModel):
    """calibrator.json as read: every number finite, the temperature positive."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    kind: Literal["genattr.calibrator"]
    format_version: Literal[1]
    inv_tau: Annotated[float, Field(gt=0)]
    bias: float
    bias_gain: float = BIAS_GAIN
    fit_report: dict[str, Any] = {}


SOFTPLUS_BETA = 100.0


@dataclass
class Calibrator:
    inv_tau: float = 1.0
    bias: float = 0.0  # the parameter; the additive threshold is bias * bias_gain
    bias_gain: float = BIAS_GAIN
    fit_report: dict = field(default_factory=dict)

    @property
    def b(self) -> float:
        return self.bias * self.bias_gain

    def probabilities(self, sorted_scores: np.ndarray | torch.Tensor) -> np.ndarray:
        """(L,) or (B, L) similarities, best first, -> influence of each, summing to 1 per row."""
        s = torch.as_tensor(np.asarray(sorted_scores), dtype=torch.float64)
        inv_tau = torch.tensor(self.inv_tau, dtype=torch.float64)
        b = torch.tensor(self.b, dtype=torch.float64)
        p = _assign(s.reshape(-1, s.shape[-1]), inv_tau, b, soft=False)
        return p.reshape(s.shape).numpy()

    def similarity_cutoff(self, best: float) -> float:
        """Below this similarity an image gets exactly zero influence (-inf if b >= 0)."""
        if self.b >= 0:
            return -math.inf
        return best + math.log(-self.b) / self.inv_tau


def _assign(scores: torch.Tensor, inv_tau: torch.Tensor, b: torch.Tensor, soft: bool):
    """The calibrated assignment over each row of `scores`; `soft` swaps relu for softplus."""
    scaled = scores * inv_tau
    a = torch.exp(scaled - scaled.max(dim=1, keepdim=True).values)
    t = torch.nn.functional.softplus(a + b, beta=SOFTPLUS_BETA) if soft else torch.relu(a + b)
    return t / t.sum(dim=1, keepdim=True)


@dataclass
class CalibrationSet:
    """Per query: L candidate similarities, the query's true exemplars marked.

    Candidates are the query's own exemplars plus its highest-scoring distractors (the
    authors' layout), so every row has the same length L and at least one true entry.
    """

    scores: np.ndarray  # (B, L)
    is_true: np.ndarray  # (B, L) bool

    def __post_init__(self):
        if self.scores.shape != self.is_true.shape or self.scores.ndim != 2:
            raise ValueError("scores and is_true must be (B, L) arrays of one shape")
        if not self.is_true.any(axis=1).all():
            raise ValueError("every query needs at least one true exemplar among its candidates")
        if not np.isfinite(self.scores).all():
            raise ValueError("calibration scores must be finite")

    def __len__(self) -> int:
        return len(self.scores)


def _nll(inv_tau: torch.Tensor, b: torch.Tensor, data: CalibrationSet, soft: bool) -> torch.Tensor:
    """Mean cross-entropy to a uniform target over each query's true exemplars."""
    s = torch.as_tensor(data.scores, dtype=torch.float64)
    mask = torch.as_tensor(data.is_true, dtype=torch.float64)
    logp = torch.log(_assign(s, inv_tau, b, soft=soft).clamp_min(1e-300))
    return -((logp * mask).sum(1) / mask.sum(1)).mean()


def calibration_report(calibrator: Calibrator, data: CalibrationSet) -> dict[str, float]:
    """Held-out quality: NLL (softplus form, as trained), mass on true exemplars (exact form)."""
    inv_tau = torch.tensor(calibrator.inv_tau, dtype=torch.float64)
    b = torch.tensor(calibrator.b, dtype=torch.float64)
    p = calibrator.probabilities(data.scores)
    return {
        "nll": float(_nll(inv_tau, b, data, soft=True)),
        "true_mass": float((p * data.is_true).sum(1).mean()),
        "n_queries": len(data),
    }


def softmax_nll(data: CalibrationSet, temperature: float = 1.0) -> float:
    """The uncalibrated baseline: a plain softmax over the candidates at a fixed temperature."""
    s = torch.as_tensor(data.scores, dtype=torch.float64) / temperature
    logp = torch.log_softmax(s, dim=1)
    mask = torch.as_tensor(data.is_true, dtype=torch.float64)
    return float(-((logp * mask).sum(1) / mask.sum(1)).mean())


def fit_softmax_temperature(data: CalibrationSet) -> float:
    """The plain softmax's best single temperature on `data` (a log-spaced scan, then a finer
    one around the best): the fair uncalibrated baseline, sharper than temperature 1."""
    grid = np.logspace(-4, 1, 61)
    best = grid[int(np.argmin([softmax_nll(data, t) for t in grid]))]
    fine = best * np.logspace(-0.1, 0.1, 21)
    return float(fine[int(np.argmin([softmax_nll(data, t) for t in fine]))])


def fit_calibrator(
    train: CalibrationSet,
    *,
    steps: int = 2000,
    lr: float = 0.05,
    init_inv_tau: float = 10.0,
    seed: int = 0,
) -> Calibrator:
    """Fit inv_tau and bias by full-batch Adam on the softplus cross-entropy.

    inv_tau is optimised in log space (it must stay positive and spans orders of magnitude);
    the saved parameters are the authors' (inv_tau, bias) pair.
    """
    torch.manual_seed(seed)
    log_inv_tau = torch.tensor(math.log(init_inv_tau), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_inv_tau, bias], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = _nll(log_inv_tau.exp(), bias * BIAS_GAIN, train, soft=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # b > -1 keeps the best match's mass positive
            bias.clamp_(min=-0.999 / BIAS_GAIN)
    cal = Calibrator(inv_tau=float(log_inv_tau.detach().exp()), bias=float(bias.detach()))
    cal.fit_report = {"train": calibration_report(cal, train), "steps": steps, "lr": lr}
    return cal


def save_calibrator(calibrator: Calibrator, path: str | os.PathLike) -> None:
    """genattr's calibrator.json (format_version 1)."""
    doc = {"kind": "genattr.calibrator", "format_version": CALIBRATOR_FORMAT_VERSION}
    doc.update(asdict(calibrator))
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def save_calibrator_pth(calibrator: Calibrator, path: str | os.PathLike) -> None:
    """The authors' format: the state dict of their `networks.Calibrator` (inv_tau, bias)."""
    state = {"inv_tau": torch.tensor(calibrator.inv_tau), "bias": torch.tensor(calibrator.bias)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_calibrator(path: str | os.PathLike) -> Calibrator:
    """genattr's calibrator.json or the authors' calibrator `.pth`, told apart by content."""
    if not os.path.exists(path):
        raise GenattrError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"{":
        with open(path, "rb") as f:
            text = f.read()
        try:
            doc = CalibratorHeader.model_validate_json(text)
        except ValidationError as e:
            raise GenattrError(
                f"{path}: not a genattr calibrator ({validation_reason(e)})"
            ) from None
        return Calibrator(doc.inv_tau, doc.bias, doc.bias_gain, doc.fit_report)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GenattrError(f"{path}: cannot read as a calibrator ({type(e).__name__})") from None
    if not isinstance(state, dict) or not {"inv_tau", "bias"} <= set(state):
        raise GenattrError(f"{path}: not a calibrator checkpoint (expected inv_tau and bias)")
    inv_tau, bias = float(state["inv_tau"]), float(state["bias"])
    if not (math.isfinite(inv_tau) and math.isfinite(bias) and inv_tau > 0):
        raise GenattrError(f"{path}: inv_tau must be positive and both numbers finite")
    return Calibrator(inv_tau, bias)


def calibration_set(
    gallery: FeatureMatrix,
    testcase: TestCaseFeatures,
    mappers: MapperPair | None = None,
    top_l: int = 100,
    prompt_types: list[str] | None = None,
) -> CalibrationSet:
    """Candidates per synthesized query: its exemplars plus its top (L - E) distractors."""
    real = mappers.real.eval() if mappers else None
    synth = mappers.synth.eval() if mappers else None
    ptypes = prompt_types or testcase.prompt_types
    with torch.no_grad():
        exemplars = embed(testcase.exemplar_feats.float(), real)
        queries = torch.cat([embed(testcase.synth_feats[p].float(), synth) for p in ptypes])
    ids = np.concatenate([np.asarray(testcase.synth_ids[p], dtype=np.int64) for p in ptypes])
    widest = max(e - s for s, e in testcase.exemplar_chunks)
    if top_l <= widest:
        raise GenattrError(f"top_l={top_l} must exceed the largest exemplar set ({widest})")
    narrowest = min(e - s for s, e in testcase.exemplar_chunks)
    if top_l - narrowest > len(gallery):
        raise GenattrError(
            f"top_l={top_l} needs {top_l - narrowest} distractors per query; the gallery has "
            f"{len(gallery)}"
        )
    dist_s, _ = topk_exact(gallery, queries, top_l, gallery_transform=real)
    scores = np.empty((len(ids), top_l))
    is_true = np.zeros((len(ids), top_l), dtype=bool)
    for row, m in enumerate(ids):
        start, end = testcase.exemplar_chunks[m]
        n = end - start
        ex = (exemplars[start:end] @ queries[row]).numpy()
        merged = np.concatenate([ex, dist_s[row, : top_l - n]])
        order = np.argsort(-merged, kind="stable")
        scores[row] = merged[order]
        is_true[row] = order < n
    return CalibrationSet(scores, is_true)
