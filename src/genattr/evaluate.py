"""The AbC evaluation protocol (Wang et al. 2023), exact and fast.

For each synthesized query the gallery is every distractor plus that query's own model's
exemplars. Features are mapped (real head on gallery and exemplars, synth head on queries),
L2-normalised and scored by dot product. Per query:
    AP = mean over exemplars, in ranked order, of k / rank_k   (1-based ranks)
    Recall@K = (#exemplars in the top K) / |E|
averaged over queries, separately per prompt type.

AP and Recall@K depend only on the ranks of the exemplars, and an exemplar's rank is
1 + (#gallery items scoring higher) + (#exemplars ahead of it). So instead of sorting a 1M
gallery per query as the authors do, genattr streams the gallery in blocks, scores a block of
queries against it with one matrix product and counts. It never sorts the gallery and never
holds a full queries x gallery score matrix. `evaluate_reference` is the authors' per-query
argsort, kept as the oracle for tests and benchmarks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import track
from rich.table import Table

from genattr.atomic import atomic_path
from genattr.data.official import TestCaseFeatures
from genattr.errors import GenattrError
from genattr.heads.checkpoint import MapperPair
from genattr.vectors import FeatureMatrix, Transform, embed, read_block

RESULTS_FORMAT_VERSION = 1
MAX_GALLERY_BLOCK = 65_536  # gallery rows read at once, whatever the number of queries
DEFAULT_KS = (5, 10, 100)
# Pads the per-query threshold rows; above any cosine similarity (<= 1 up to rounding).
_PAD = 4.0


@dataclass
class PromptTypeResults:
    """Per-query metrics of one prompt type."""

    ap: np.ndarray  # (Q,)
    recall: np.ndarray  # (Q, len(ks))
    model_ids: np.ndarray  # (Q,)
    n_exemplars: np.ndarray  # (Q,)
    paths: list[str]

    @property
    def n_queries(self) -> int:
        return len(self.ap)


@dataclass
class EvaluationResult:
    ks: tuple[int, ...]
    per_type: dict[str, PromptTypeResults]

    def summary(self) -> dict[str, dict]:
        """{ptype: {"mAP", "recall": {"5": ...}, "n_queries"}}: the mean over queries."""
        out = {}
        for ptype, r in self.per_type.items():
            recall = r.recall.mean(axis=0) if r.n_queries else np.full(len(self.ks), np.nan)
            out[ptype] = {
                "mAP": float(r.ap.mean()) if r.n_queries else float("nan"),
                "recall": {str(k): float(v) for k, v in zip(self.ks, recall, strict=True)},
                "n_queries": r.n_queries,
            }
        return out


def expected_random_ap(n_relevant: int | np.ndarray, n_total: int | np.ndarray) -> np.ndarray:
    """The expected AP of a uniformly random ranking of `n_total` items of which `n_relevant`
    are relevant: (1/n)((e-1)/(n-1)(n - H_n) + H_n), H_n the n-th harmonic number (Bestgen,
    2015). Far above e/n for few relevant items: 1/n of the mean 1/rank is H_n/n, not 1/n."""
    e = np.asarray(n_relevant, np.float64)
    n = np.asarray(n_total, np.float64)
    h = np.vectorize(lambda k: float(np.sum(1.0 / np.arange(1, int(k) + 1))))(n)
    ratio = np.where(n > 1, (e - 1) / np.maximum(n - 1, 1), 0.0)
    return (ratio * (n - h) + h) / n


def _count_dense(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(B, G) scores, (B, E) thresholds -> (B, E) counts of scores > threshold."""
    return torch.stack(
        [(scores > thresholds[:, j : j + 1]).sum(1) for j in range(thresholds.shape[1])], 1
    )


def count_scores_above(
    gallery: FeatureMatrix,
    queries: torch.Tensor,
    thresholds: torch.Tensor,
    n_valid: np.ndarray,
    *,
    gallery_transform: Transform | None = None,
    block_elements: int | None = None,
    method: str = "auto",
    progress: bool = False,
    gallery_name: str = "gallery",
) -> torch.Tensor:
    """For each query row and threshold, count gallery items whose score is strictly higher.

    queries: (Q, D) mapped and normalised; thresholds: (Q, E) sorted ascending per row, the
    first n_valid[i] real and the rest padded with a value above any cosine similarity.
    Gallery rows are mapped with `gallery_transform` and normalised block by block, so a
    memory-mapped gallery is read once and never held whole. Counting runs in a fused numba
    kernel on CPU ("kernel") and as one comparison per threshold on GPU ("dense").
    """
    if method not in ("auto", "dense", "kernel"):
        raise ValueError(f"unknown counting method {method!r}")
    device = queries.device
    if method == "auto":
        method = "kernel" if device.type == "cpu" else "dense"
    if method == "kernel":
        # deferred: numba compiles (or loads its cache) on import; only the CPU path needs it
        from genattr._kernels import count_above_sorted
    n, q = len(gallery), len(queries)
    counts = torch.zeros(thresholds.shape, dtype=torch.int64, device=device)
    q_block = max(1, min(q, 1024))
    if block_elements is None:
        # On a CPU, tiles of 2M scores (8 MB) stay in the cache between the GEMM that writes
        # them and the counting kernel that reads them: 1.1-1.3x the bare GEMM at 1M x 512
        # against 1.4x with 16M-score tiles (benchmarks/eval_speed.py). GPUs want big tiles.
        block_elements = 1 << 21 if method == "kernel" else 1 << 24
    g_block = min(MAX_GALLERY_BLOCK, max(1024, block_elements // q_block))
    scores = torch.empty((q_block, g_block), dtype=torch.float32, device=device)
    starts: Iterable[int] = range(0, n, g_block)
    if progress:
        starts = track(starts, description="scoring gallery", transient=True)
    with torch.no_grad():
        for g0 in starts:
            block = read_block(gallery, g0, g0 + g_block, device)
            # one pass gives both the finiteness check (a NaN or Inf makes its row's norm
            # NaN or Inf) and, without a head, the normalisation
            norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
            if not torch.isfinite(norms).all():  # or a norm overflowed: look at the values
                bad = (~torch.isfinite(block)).any(1).nonzero()
                if len(bad):
                    row = bad[0].item() + g0
                    raise GenattrError(f"{gallery_name}: row {row} has NaN or Inf values")
            if gallery_transform is None:
                block = block / norms.clamp_min(1e-12)  # = F.normalize, without a second pass
            else:
                block = embed(block, gallery_transform)
            for q0 in range(0, q, q_block):
                q1 = min(q, q0 + q_block)
                out = scores[: q1 - q0, : len(block)]
                torch.matmul(queries[q0:q1], block.T, out=out)
                if method == "dense":
                    counts[q0:q1] += _count_dense(out, thresholds[q0:q1])
                else:
                    count_above_sorted(
                        out.numpy(),
                        thresholds[q0:q1].numpy(),
                        n_valid[q0:q1],
                        counts[q0:q1].numpy(),
                    )
    return counts


def _padded_index(chunks: Sequence[tuple[int, int]], model_ids: np.ndarray) -> np.ndarray:
    """(Q, Emax) exemplar row indices per query, -1 where the model has fewer exemplars."""
    sizes = np.array([e - s for s, e in chunks])[model_ids]
    starts = np.array([s for s, _ in chunks])[model_ids]
    width = int(sizes.max()) if len(sizes) else 1
    cols = np.arange(width)
    return np.where(cols < sizes[:, None], starts[:, None] + cols, -1)


def metrics_from_counts(
    counts: np.ndarray, n_exemplars: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """AP and Recall@K from gallery counts above each exemplar (thresholds ascending).

    With E exemplars sorted by ascending score, the j-th (0-based) is the (E-j)-th exemplar in
    ranked order and has rank c_j + E - j, so AP = mean_j (E-j) / (c_j + E - j).
    """
    e = n_exemplars[:, None]
    j = np.arange(counts.shape[1])[None, :]
    valid = j < e
    k = e - j  # position among exemplars in ranked order, 1-based
    rank = counts + k
    ap = np.where(valid, k / np.maximum(rank, 1), 0.0).sum(1) / n_exemplars
    recall = np.stack([(valid & (rank <= kk)).sum(1) / n_exemplars for kk in ks], axis=1)
    return ap, recall


def _exemplars_above(
    queries: torch.Tensor,
    exemplars: torch.Tensor,
    index: torch.Tensor,
    thresholds: torch.Tensor,
    block: int = 1024,
) -> torch.Tensor:
    """(Q, E) counts of other models' exemplars scoring above each threshold: the stricter
    gallery's extra distractors. The query's own exemplars are taken out of the scored set
    (they count once, by their place among the exemplars)."""
    out = torch.zeros(thresholds.shape, dtype=torch.int64, device=queries.device)
    n = len(exemplars)
    for q0 in range(0, len(queries), block):
        q1 = min(len(queries), q0 + block)
        scores = torch.cat(  # a last column for the padding entries of `index` to hit
            [queries[q0:q1] @ exemplars.T, torch.zeros(q1 - q0, 1, device=queries.device)], 1
        )
        scores.scatter_(1, torch.where(index[q0:q1] >= 0, index[q0:q1], n), -torch.inf)
        ranked = scores[:, :n].sort(dim=1).values.contiguous()
        t = thresholds[q0:q1].contiguous()
        out[q0:q1] = n - torch.searchsorted(ranked, t, right=True)
    return out


def _check_dims(
    gallery: FeatureMatrix,
    testcase: TestCaseFeatures,
    mappers: MapperPair | None,
    names: tuple[str, str, str] = ("gallery", "test case", "mapper"),
):
    if gallery.ndim != 2:
        raise GenattrError(f"{names[0]}: features must be 2-D, got shape {tuple(gallery.shape)}")
    if gallery.shape[1] != testcase.dim:
        raise GenattrError(
            f"dimension mismatch: {names[0]} has {gallery.shape[1]}-d features, "
            f"{names[1]} has {testcase.dim}-d features"
        )
    if mappers is not None and mappers.in_dim != testcase.dim:
        raise GenattrError(
            f"dimension mismatch: {names[2]} is a {mappers.kind} head on {mappers.in_dim}-d "
            f"features, {names[1]} has {testcase.dim}-d features"
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if not ks or any(int(k) < 1 for k in ks):
        raise GenattrError(f"recall cut-offs must be positive integers, got {list(ks)}")
    return tuple(int(k) for k in ks)


def evaluate_protocol(
    gallery: FeatureMatrix,
    testcase: TestCaseFeatures,
    ks: Sequence[int] = DEFAULT_KS,
    mappers: MapperPair | None = None,
    *,
    device: str | torch.device = "cpu",
    block_elements: int | None = None,
    method: str = "auto",
    progress: bool = False,
    names: tuple[str, str, str] = ("gallery", "test case", "mapper"),
    exemplars_as_distractors: bool = False,
    query_independent: bool = False,
) -> EvaluationResult:
    """Evaluate one benchmark against a gallery (N, D): fp16/fp32, tensor or memory-mapped array.

    `names` (gallery, test case, mapper) are used in error messages, e.g. their file names.

    Two controls, for numbers that must mean attribution:
    - `exemplars_as_distractors`: the stricter gallery. Every exemplar of every model in the
      test case is also a distractor for every query (its own model's count once, as
      exemplars), so being held out from pre-training is not enough to rank first.
    - `query_independent`: every query is replaced by the mean of all (mapped, normalised)
      queries, so each gallery image gets one score, its mean similarity to all queries, and
      the ranking ignores which image was asked about. A method must beat this by far.
    """
    ks = _check_ks(ks)
    _check_dims(gallery, testcase, mappers, names)
    if len(gallery) == 0:  # every exemplar would rank first: mAP 1.0, meaning nothing
        raise GenattrError(f"{names[0]}: the gallery is empty")
    if torch.is_tensor(gallery) and not gallery.is_floating_point():
        raise GenattrError(f"{names[0]}: features must be real floating point, not {gallery.dtype}")
    device = torch.device(device)
    real = synth = None
    if mappers is not None:
        real, synth = mappers.real.to(device).eval(), mappers.synth.to(device).eval()
    ptypes = testcase.prompt_types
    if not any(len(testcase.synth_ids[p]) for p in ptypes):
        raise GenattrError(f"{names[1]}: has no synthesized queries")
    with torch.no_grad():
        exemplars = embed(testcase.exemplar_feats.to(device, torch.float32), real)
        queries = torch.cat(
            [embed(testcase.synth_feats[p].to(device, torch.float32), synth) for p in ptypes]
        )
        if query_independent:
            mean = torch.nn.functional.normalize(queries.mean(0, keepdim=True), dim=1)
            queries = mean.expand_as(queries).contiguous()
    model_ids = np.concatenate([np.asarray(testcase.synth_ids[p], dtype=np.int64) for p in ptypes])
    index = torch.from_numpy(_padded_index(testcase.exemplar_chunks, model_ids)).to(device)
    ex_scores = torch.einsum("qd,qed->qe", queries, exemplars[index.clamp(min=0)])
    thresholds = torch.where(index >= 0, ex_scores, torch.full_like(ex_scores, _PAD))
    thresholds = thresholds.sort(dim=1).values
    n_ex = (index >= 0).sum(1).cpu().numpy()
    counts = count_scores_above(
        gallery,
        queries,
        thresholds,
        n_ex,
        gallery_transform=real,
        block_elements=block_elements,
        method=method,
        progress=progress,
        gallery_name=names[0],
    )
    if exemplars_as_distractors:
        counts += _exemplars_above(queries, exemplars, index, thresholds)
    ap, recall = metrics_from_counts(counts.cpu().numpy(), n_ex, ks)
    return _result(testcase, ks, ap, recall, model_ids, n_ex)


def _result(
    testcase: TestCaseFeatures,
    ks: tuple[int, ...],
    ap: np.ndarray,
    recall: np.ndarray,
    model_ids: np.ndarray,
    n_ex: np.ndarray,
) -> EvaluationResult:
    """Per-query metrics (queries in prompt-type order) split back by prompt type."""
    per_type, start = {}, 0
    for p in testcase.prompt_types:
        stop = start + len(testcase.synth_ids[p])
        per_type[p] = PromptTypeResults(
            ap[start:stop],
            recall[start:stop],
            model_ids[start:stop],
            n_ex[start:stop],
            list(testcase.synth_paths.get(p, [])),
        )
        start = stop
    return EvaluationResult(ks, per_type)


def evaluate_scores(
    gallery_scores: np.ndarray | torch.Tensor,
    exemplar_scores: np.ndarray | torch.Tensor,
    testcase: TestCaseFeatures,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exemplars_as_distractors: bool = False,
) -> EvaluationResult:
    """The AbC protocol for a method that scores images instead of embedding them (gradient
    and unlearning attributors): higher means more responsible.

    gallery_scores: (Q, G), each query against every gallery image; exemplar_scores: (Q, E),
    each query against every exemplar row of the test case (all models'). Queries are in the
    test case's prompt-type order (`testcase.prompt_types`, then `synth_ids` order); only the
    test case's structure is read, not its features. Ranks, metrics and the stricter gallery
    are those of `evaluate_protocol`: the same scores give the same numbers."""
    ks = _check_ks(ks)
    g = torch.as_tensor(gallery_scores).float()
    e = torch.as_tensor(exemplar_scores).float()
    model_ids = np.concatenate(
        [np.asarray(testcase.synth_ids[p], dtype=np.int64) for p in testcase.prompt_types]
    )
    n_exemplar_rows = testcase.exemplar_chunks[-1][1] if testcase.exemplar_chunks else 0
    if g.ndim != 2 or e.shape != (len(model_ids), n_exemplar_rows) or len(g) != len(e):
        raise GenattrError(
            f"scores must be (queries, gallery) and (queries, exemplars) = (Q, G) and "
            f"({len(model_ids)}, {n_exemplar_rows}); got {tuple(g.shape)} and {tuple(e.shape)}"
        )
    if g.shape[1] == 0:
        raise GenattrError("the gallery is empty")
    for name, scores in (("gallery_scores", g), ("exemplar_scores", e)):
        if not torch.isfinite(scores).all():
            raise GenattrError(f"{name} has NaN or Inf values")
    index = torch.from_numpy(_padded_index(testcase.exemplar_chunks, model_ids))
    own = e.gather(1, index.clamp(min=0))
    thresholds = torch.where(index >= 0, own, torch.full_like(own, _PAD)).sort(dim=1).values
    n_ex = (index >= 0).sum(1).numpy()
    counts = torch.zeros(thresholds.shape, dtype=torch.int64)
    # the stricter gallery: every other model's exemplars too (a query's own count once, as
    # exemplars); padding entries of `index` hit a spare last column
    others = torch.cat([e, torch.zeros(len(e), 1)], 1)
    others.scatter_(1, torch.where(index >= 0, index, e.shape[1]), -torch.inf)
    others = others[:, :-1]
    for j in range(thresholds.shape[1]):
        counts[:, j] = (g > thresholds[:, j : j + 1]).sum(1)
        if exemplars_as_distractors:
            counts[:, j] += (others > thresholds[:, j : j + 1]).sum(1)
    ap, recall = metrics_from_counts(counts.numpy(), n_ex, ks)
    return _result(testcase, ks, ap, recall, model_ids, n_ex)


def evaluate_reference(
    gallery: FeatureMatrix,
    testcase: TestCaseFeatures,
    ks: Sequence[int] = DEFAULT_KS,
    mappers: MapperPair | None = None,
    query_limit: int | None = None,
) -> EvaluationResult:
    """The authors' protocol as they run it: one full argsort of gallery + exemplars per query."""
    ks = _check_ks(ks)
    _check_dims(gallery, testcase, mappers)
    real = mappers.real.eval() if mappers else None
    synth = mappers.synth.eval() if mappers else None
    with torch.no_grad():
        data = embed(
            gallery.float()
            if isinstance(gallery, torch.Tensor)
            else torch.from_numpy(np.asarray(gallery, dtype=np.float32)),
            real,
        )
        exemplars = embed(testcase.exemplar_feats.float(), real)
        n = len(data)
        per_type = {}
        for p in testcase.prompt_types:
            ids = np.asarray(testcase.synth_ids[p][:query_limit], dtype=np.int64)
            queries = embed(testcase.synth_feats[p][:query_limit].float(), synth)
            aps, recalls, sizes = [], [], []
            for model, query in zip(ids, queries, strict=True):
                start, end = testcase.exemplar_chunks[model]
                order = torch.argsort(-(torch.cat([data, exemplars[start:end]]) @ query))
                hits = (order >= n).numpy()
                positions = np.flatnonzero(hits) + 1
                aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
                recalls.append([hits[:k].sum() / (end - start) for k in ks])
                sizes.append(end - start)
            per_type[p] = PromptTypeResults(
                np.array(aps),
                np.array(recalls).reshape(len(ids), len(ks)),
                ids,
                np.array(sizes),
                list(testcase.synth_paths.get(p, []))[:query_limit],
            )
    return EvaluationResult(ks, per_type)


def queries_path(results_path: str | os.PathLike) -> Path:
    """Where the per-query table goes: results.json -> results.queries.parquet."""
    p = Path(results_path)
    return p.with_name(p.stem + ".queries.parquet")


def write_results(result: EvaluationResult, path: str | os.PathLike, **provenance) -> None:
    """results.json (summary, format_version 1) and results.queries.parquet, both atomically."""
    columns: dict[str, list] = {
        "prompt_type": [],
        "query_index": [],
        "query_path": [],
        "model_index": [],
        "n_exemplars": [],
        "ap": [],
    }
    columns.update({f"recall@{k}": [] for k in result.ks})
    for ptype, r in result.per_type.items():
        columns["prompt_type"] += [ptype] * r.n_queries
        columns["query_index"] += list(range(r.n_queries))
        columns["query_path"] += r.paths if len(r.paths) == r.n_queries else [None] * r.n_queries
        columns["model_index"] += r.model_ids.tolist()
        columns["n_exemplars"] += r.n_exemplars.tolist()
        columns["ap"] += r.ap.tolist()
        for i, k in enumerate(result.ks):
            columns[f"recall@{k}"] += r.recall[:, i].tolist()
    table = pa.table(columns)
    doc = {
        "format_version": RESULTS_FORMAT_VERSION,
        "results": result.summary(),
        "ks": list(result.ks),
        "queries_file": queries_path(path).name,
        **provenance,
    }
    with atomic_path(queries_path(path)) as tmp_q, atomic_path(path) as tmp_j:
        pq.write_table(table, tmp_q)
        tmp_j.write_text(json.dumps(doc, indent=2) + "\n")


def results_table(result: EvaluationResult, title: str = "AbC evaluation"):
    """A rich table: one row per prompt type, mAP and Recall@K in percent as in the paper."""
    table = Table(title=title)
    table.add_column("prompt type")
    table.add_column("queries", justify="right")
    table.add_column("mAP", justify="right")
    for k in result.ks:
        table.add_column(f"R@{k}", justify="right")
    for ptype, s in result.summary().items():
        recall = [f"{100 * v:.2f}" for v in s["recall"].values()]
        table.add_row(ptype, str(s["n_queries"]), f"{100 * s['mAP']:.2f}", *recall)
    return table
