"""Heads distilled from a slow attribution method: FastGDA's objective (Wang et al., NeurIPS
2025) on genattr's heads.

A teacher scores every (query, candidate) pair, higher = more responsible (any method's
scores, or counterfactual margins). For each query the teacher's top `cutoff` candidates are
ranked; a training pair is (query, candidate at rank position j) with target j / cutoff,
and with probability `outlier_fraction` a candidate from outside the top list with target
(cutoff - 1) / cutoff (FastGDA's outliers). A NaN score marks a candidate that is not the
query's at all (one teacher over several models' training sets: another model's images);
it is never ranked and may be drawn as an outlier. The student's similarity is the cosine of the
synth head's query and the real head's candidate, times a learned scale plus a learned bias;
minus it is the logit of a binary cross-entropy against the target, so the teacher's first
candidate is pushed to the highest similarity. Scale and bias do not change a ranking, so
the result is an ordinary `MapperPair`, saved, indexed and served as any head.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from genattr.atomic import atomic_path
from genattr.counterfactual import exemplar_ap
from genattr.errors import GenattrError
from genattr.heads.checkpoint import MapperPair
from genattr.heads.networks import create_head
from genattr.vectors import embed

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Distillation options (checked by `genattr.options.options_from_mapping`)."""

    head: Literal["linear", "channel", "mlp", "fastgda"] = "linear"
    cutoff: Annotated[int, Field(ge=2)] = 1000  # the teacher's top list per query
    outlier_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4
    batch_size: Annotated[int, Field(ge=1)] = 1024
    epochs: Annotated[int, Field(ge=1)] = 30
    init_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    shared: bool = False  # one map for queries and candidates (FastGDA's), not two
    seed: int = 0


@dataclass
class DistillResult:
    mappers: MapperPair
    history: list[dict] = field(default_factory=list)  # per epoch: mean loss


def scored_per_query(teacher: np.ndarray) -> int:
    """The fewest candidates the teacher scored for any query (NaN: not a candidate of that
    query, e.g. an image its model was not trained on when one teacher pools several
    models); checks the teacher is a (queries, candidates) matrix without infinities."""
    t = np.asarray(teacher, dtype=np.float64)
    if t.ndim != 2 or np.isinf(t).any():
        raise GenattrError(
            f"teacher scores must be a (queries, candidates) matrix, finite or NaN: {t.shape}"
        )
    return int(np.isfinite(t).sum(axis=1).min()) if len(t) else 0


def pool_teachers(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """One teacher over several models from each model's (Q_i, C_i) scores: the blocks on
    the diagonal, NaN elsewhere (a query is no candidate's but its own model's)."""
    out = np.full((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)), np.nan)
    r = c = 0
    for block in blocks:
        out[r : r + block.shape[0], c : c + block.shape[1]] = block
        r, c = r + block.shape[0], c + block.shape[1]
    return out


def teacher_ranks(teacher: np.ndarray, cutoff: int) -> np.ndarray:
    """(Q, cutoff) the candidates of each query in the teacher's order, best first (ties
    in candidate order, NaN never listed); `cutoff` at most the candidates scored."""
    scored = scored_per_query(teacher)
    if cutoff > scored:
        raise GenattrError(f"cutoff {cutoff} is more than the {scored} candidates scored")
    t = np.asarray(teacher, dtype=np.float64)
    return np.argsort(-np.where(np.isnan(t), -np.inf, t), axis=1, kind="stable")[:, :cutoff]


def rank_position_loss(
    similarity: torch.Tensor, positions: torch.Tensor, cutoff: int, scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """FastGDA's loss: binary cross-entropy of the logit -(scale x similarity + bias)
    against the rank position over the cutoff (0 for the teacher's first)."""
    logits = -(scale * similarity + bias)
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, positions.to(logits.dtype) / cutoff
    )


def teacher_map(student: np.ndarray, teacher: np.ndarray, k: int) -> np.ndarray:
    """(Q,) AP of the teacher's top-k candidates in the student's ranking (FastGDA's mAP@k
    against the teacher)."""
    top = teacher_ranks(teacher, k)
    answers = np.zeros(np.shape(teacher), dtype=bool)
    np.put_along_axis(answers, top, True, axis=1)
    return exemplar_ap(student, answers)


def _pairs(ranks: np.ndarray, n_candidates: int, config: DistillConfig, rng: np.random.Generator):
    """One epoch's (query, candidate, position) triples, shuffled, outliers mixed in."""
    q, c = ranks.shape
    query = np.repeat(np.arange(q), c)
    position = np.tile(np.arange(c), q)
    candidate = ranks.reshape(-1).copy()
    todo = np.flatnonzero(rng.random(len(query)) < config.outlier_fraction)
    if c < n_candidates:
        # (query, candidate) keys of every top-list pair, sorted: membership by bisection,
        # memory O(Q x cutoff) whatever the number of candidates
        top = np.sort((np.arange(q)[:, None] * n_candidates + ranks).reshape(-1))
        position[todo] = c - 1
        while len(todo):  # draw outside the query's top list (rejection: inside is rarer)
            candidate[todo] = rng.integers(n_candidates, size=len(todo))
            keys = query[todo] * n_candidates + candidate[todo]
            at = np.minimum(np.searchsorted(top, keys), len(top) - 1)
            todo = todo[top[at] == keys]
    order = rng.permutation(len(query))
    return query[order], candidate[order], position[order]


def distill_heads(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    teacher: np.ndarray,
    config: DistillConfig | None = None,
) -> DistillResult:
    """Train a head pair on features (queries (Q, D) through the synth head, candidates
    (C, D) through the real head) to reproduce the teacher's ranking (Q, C)."""
    config = config or DistillConfig()
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise GenattrError(f"features {tuple(queries.shape)} and {tuple(candidates.shape)}")
    if np.shape(teacher) != (len(queries), len(candidates)):
        raise GenattrError(
            f"teacher {np.shape(teacher)}, expected ({len(queries)}, {len(candidates)})"
        )
    cutoff = min(config.cutoff, scored_per_query(teacher))
    ranks = teacher_ranks(teacher, cutoff)
    torch.manual_seed(config.seed)
    dim = queries.shape[1]
    real = create_head(config.head, dim)
    synth = real if config.shared else create_head(config.head, dim)
    scale = torch.nn.Parameter(torch.tensor(float(config.init_scale)))
    bias = torch.nn.Parameter(torch.tensor(0.0))
    maps = [real] if config.shared else [real, synth]
    params = [*(p for m in maps for p in m.parameters()), scale, bias]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    result = DistillResult(MapperPair(real, synth, config.head))
    for epoch in range(config.epochs):
        q, c, pos = (torch.from_numpy(a) for a in _pairs(ranks, len(candidates), config, rng))
        losses = []
        for s in range(0, len(q), config.batch_size):
            rows = slice(s, s + config.batch_size)
            sim = (embed(queries[q[rows]], synth) * embed(candidates[c[rows]], real)).sum(-1)
            loss = rank_position_loss(sim, pos[rows], cutoff, scale, bias)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        result.history.append({"epoch": epoch, "loss": float(np.mean(losses))})
        logger.info(f"distill epoch {epoch}: loss {result.history[-1]['loss']:.4f}")
    real.eval()
    synth.eval()
    return result


TEACHER_KIND = "genattr.teacher"
TEACHER_FORMAT_VERSION = 1


@dataclass
class Teacher:
    """What a head is distilled from: a method's scores (Q, C), higher = more responsible,
    of query images against candidate training images, both named by the path their
    embedding stores record. Written as one .npz (`write_teacher`), so any slow method's
    output can be handed to `genattr train-head --objective distill`."""

    query_paths: list[str]
    candidate_paths: list[str]
    scores: np.ndarray
    method: str = ""

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.query_paths), len(self.candidate_paths)):
            raise GenattrError(
                f"teacher scores {self.scores.shape} for {len(self.query_paths)} queries and "
                f"{len(self.candidate_paths)} candidates"
            )


def write_teacher(teacher: Teacher, path: str | os.PathLike) -> Path:
    """`scores` float32 (Q, C), `query_paths` and `candidate_paths` (text), `meta` (JSON)."""
    meta = {
        "kind": TEACHER_KIND,
        "format_version": TEACHER_FORMAT_VERSION,
        "method": teacher.method,
    }
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            scores=np.asarray(teacher.scores, dtype=np.float32),
            query_paths=np.array(teacher.query_paths, dtype=str),
            candidate_paths=np.array(teacher.candidate_paths, dtype=str),
            meta=np.array(json.dumps(meta)),
        )
    return path


def read_teacher(path: str | os.PathLike) -> Teacher:
    try:
        with np.load(path, allow_pickle=False) as got:
            meta = json.loads(str(got["meta"]))
            if meta.get("kind") != TEACHER_KIND or meta.get("format_version") != 1:
                raise GenattrError(f"{path}: not a genattr teacher file (version 1)")
            return Teacher(
                [str(p) for p in got["query_paths"]],
                [str(p) for p in got["candidate_paths"]],
                np.asarray(got["scores"], dtype=np.float32),
                str(meta.get("method", "")),
            )
    except (OSError, ValueError, KeyError) as e:
        raise GenattrError(f"{path}: not a readable teacher file ({e})") from None
