"""Benchmark manifests meet embedding stores: look up each image's vector by its path."""

from __future__ import annotations

import os

import numpy as np
import torch

from genattr.data.benchmark import BenchmarkManifest
from genattr.data.official import TestCaseFeatures
from genattr.errors import GenattrError
from genattr.store.embedding_store import EmbeddingStore, check_same_backbone


def rows_by_path(store: EmbeddingStore) -> dict[str, list[int]]:
    """path -> its rows, view 0 first (stores extracted with --augment hold several views)."""
    meta = store.metadata()
    paths = meta.column("path").to_pylist()
    views = meta.column("view").to_pylist() if "view" in meta.column_names else [0] * len(paths)
    rows: dict[str, list[tuple[int, int]]] = {}
    for i, (p, v) in enumerate(zip(paths, views, strict=True)):
        if p:
            rows.setdefault(os.path.normpath(p), []).append((v or 0, i))
    return {p: [i for _, i in sorted(r)] for p, r in rows.items()}


def _row_lookup(store: EmbeddingStore) -> dict[str, int]:
    return {p: r[0] for p, r in rows_by_path(store).items()}


def view_tensor(store: EmbeddingStore, rows: list[list[int]]) -> torch.Tensor:
    """(V, N, D): view v of image n, where V is the most views any image has; an image with
    fewer (a view failed to decode) repeats its first."""
    n_views = max((len(r) for r in rows), default=1)
    index = np.array([[r[v] if v < len(r) else r[0] for r in rows] for v in range(n_views)])
    picked = store.vectors[index.reshape(-1)]
    return torch.from_numpy(np.asarray(picked, dtype=np.float32).reshape(n_views, len(rows), -1))


def testcase_from_stores(
    manifest: BenchmarkManifest, store_real: EmbeddingStore, store_synth: EmbeddingStore
) -> tuple[TestCaseFeatures, list[str]]:
    """Exemplar vectors from `store_real`, synthesized ones from `store_synth`, by path.

    Images absent from a store (e.g. recorded in its failed.parquet) are left out and listed
    in the returned notes; a model left without exemplars is an error.
    """
    check_same_backbone(store_real, store_synth)
    real_rows, synth_rows = _row_lookup(store_real), _row_lookup(store_synth)
    ex_rows: list[int] = []
    chunks: list[tuple[int, int]] = []
    missing: list[str] = []
    ptypes = manifest.prompt_types
    synth: dict[str, tuple[list[int], list[int]]] = {p: ([], []) for p in ptypes}
    for m, model in enumerate(manifest.models):
        start = len(ex_rows)
        for path in model.exemplars:
            row = real_rows.get(os.path.normpath(path))
            if row is None:
                missing.append(path)
            else:
                ex_rows.append(row)
        if len(ex_rows) == start:
            raise GenattrError(
                f"{store_real.path}: model {model.id!r} has none of its exemplars in the store"
            )
        chunks.append((start, len(ex_rows)))
        for p, paths in model.synth.items():
            for path in paths:
                row = synth_rows.get(os.path.normpath(path))
                if row is None:
                    missing.append(path)
                else:
                    synth[p][0].append(row)
                    synth[p][1].append(m)

    def gather(store: EmbeddingStore, rows: list[int]) -> torch.Tensor:
        picked = store.vectors[np.asarray(rows, dtype=np.int64)]
        return torch.from_numpy(np.asarray(picked, dtype=np.float32).reshape(-1, store.dim))

    real_paths, synth_paths = store_real.paths, store_synth.paths
    tc = TestCaseFeatures(
        exemplar_paths=[real_paths[r] for r in ex_rows],
        exemplar_chunks=chunks,
        exemplar_feats=gather(store_real, ex_rows),
        synth_paths={p: [synth_paths[r] for r in synth[p][0]] for p in ptypes},
        synth_ids={p: synth[p][1] for p in ptypes},
        synth_feats={p: gather(store_synth, synth[p][0]) for p in ptypes},
    )
    notes = []
    if missing:
        notes.append(f"{len(missing)} benchmark images are not in the stores (first: {missing[0]})")
    return tc, notes
