"""Between embedding stores and the authors' `.pth` feature files, both ways.

A gallery `.pth` ({"feats", "paths"}) is one store, ids = paths (row numbers when paths are
missing or repeat). A test-case `.pth` is one store whose metadata says, per row, its role
("exemplar" or "synth"), its customized model (`model_index`) and, for synth rows, its
`prompt_type`; store.json's extra["testcase"] keeps the model count and the prompt-type order.
An AbC JSON extraction writes the same columns, so `to_testcase` serves both.
The `.pth` files carry no backbone: the caller names it when importing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from genattr.data.official import (
    GalleryFeatures,
    TestCaseFeatures,
    load_gallery_pth,
    load_testcase_pth,
    save_gallery_pth,
    save_testcase_pth,
)
from genattr.errors import GenattrError
from genattr.store.embedding_store import BackboneInfo, EmbeddingStore

DEFAULT_CONVERT_SHARD_SIZE = 100_000
TESTCASE_COLUMNS = ("role", "model_index", "prompt_type")


def _ids_for(paths: list[str], n: int) -> list[str]:
    if len(paths) == n and len(set(paths)) == n:
        return list(paths)
    return [str(i) for i in range(n)]


def _backbone(backbone: str | BackboneInfo, weights_id: str, preprocess_config) -> BackboneInfo:
    if isinstance(backbone, BackboneInfo):
        return backbone
    return BackboneInfo(backbone, weights_id, dict(preprocess_config or {}))


def gallery_pth_to_store(
    pth: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str | BackboneInfo,
    *,
    weights_id: str = "unknown",
    preprocess_config: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    shard_size: int = DEFAULT_CONVERT_SHARD_SIZE,
) -> EmbeddingStore:
    """Import an official gallery feature file, streaming it shard by shard (memory-mapped)."""
    gallery = load_gallery_pth(pth)
    n = gallery.feats.shape[0]
    ids = _ids_for(gallery.paths, n)
    paths = gallery.paths if len(gallery.paths) == n else [None] * n
    info = _backbone(backbone, weights_id, preprocess_config)
    store = EmbeddingStore.create(
        out, info, gallery.dim, dtype, extra={"source": {"kind": "gallery_pth", "path": str(pth)}}
    )
    with store.writing():
        for a in range(0, n, max(1, shard_size)):
            b = min(n, a + shard_size)
            store.append(gallery.feats[a:b], ids[a:b], paths[a:b], {"source_index": range(a, b)})
    return store


def store_to_gallery(store: EmbeddingStore) -> GalleryFeatures:
    """All vectors as float32 in memory, with their paths (ids where a path is missing)."""
    meta = store.metadata(["id", "path"])
    ids, paths = meta.column("id").to_pylist(), meta.column("path").to_pylist()
    feats = torch.from_numpy(np.asarray(store.vectors, dtype=np.float32))
    return GalleryFeatures(
        feats, [p if p is not None else i for p, i in zip(paths, ids, strict=True)]
    )


def store_to_gallery_pth(store: EmbeddingStore, pth: str | os.PathLike) -> None:
    """Write the official {"feats", "paths"} file (float32, as extract_feat.py writes)."""
    save_gallery_pth(store_to_gallery(store), pth)


def testcase_pth_to_store(
    pth: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str | BackboneInfo,
    *,
    weights_id: str = "unknown",
    preprocess_config: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> EmbeddingStore:
    """Import an official test-case file: exemplars first, then synth rows per prompt type."""
    tc = load_testcase_pth(pth)
    info = _backbone(backbone, weights_id, preprocess_config)
    extra = {
        "source": {"kind": "testcase_pth", "path": str(pth)},
        "testcase": {"n_models": len(tc.exemplar_chunks), "prompt_types": tc.prompt_types},
    }
    store = EmbeddingStore.create(out, info, tc.dim, dtype, extra=extra)
    with store.writing():
        n_ex = tc.exemplar_feats.shape[0]
        model_of = np.full(n_ex, -1, dtype=np.int64)
        for m, (s, e) in enumerate(tc.exemplar_chunks):
            model_of[s:e] = m
        if (model_of < 0).any():
            row = int(np.flatnonzero(model_of < 0)[0])
            raise GenattrError(f"{pth}: exemplar row {row} belongs to no model (exemplar_chunks)")
        ex_paths: Sequence[str | None] = tc.exemplar_paths or [None] * n_ex
        store.append(
            tc.exemplar_feats,
            [f"exemplar/{j}" for j in range(n_ex)],
            ex_paths,
            {
                "role": ["exemplar"] * n_ex,
                "model_index": model_of.tolist(),
                "prompt_type": [None] * n_ex,
            },
        )
        for ptype in tc.prompt_types:
            feats, models = tc.synth_feats[ptype], tc.synth_ids[ptype]
            q = feats.shape[0]
            paths: Sequence[str | None] = tc.synth_paths.get(ptype) or [None] * q
            store.append(
                feats,
                [f"synth/{ptype}/{j}" for j in range(q)],
                paths,
                {"role": ["synth"] * q, "model_index": list(models), "prompt_type": [ptype] * q},
            )
    return store


def store_to_testcase(store: EmbeddingStore) -> TestCaseFeatures:
    """Rebuild TestCaseFeatures from a store with role / model_index / prompt_type columns.

    Rows missing from the store (images that failed to decode) are left out; a model left with
    no exemplar at all is an error, since its queries could not be scored.
    """
    meta = store.metadata()
    missing = [c for c in TESTCASE_COLUMNS if c not in meta.column_names]
    if missing:
        raise GenattrError(
            f"{store.path}: not a test-case store (no {', '.join(missing)} column); extract it "
            "from an AbC JSON file or import a test-case .pth"
        )
    role = np.asarray(meta.column("role").to_pylist(), dtype=object)
    model = np.asarray(meta.column("model_index").to_pylist(), dtype=np.int64)
    ptype = meta.column("prompt_type").to_pylist()
    paths = meta.column("path").to_pylist()
    tinfo = store.extra.get("testcase", {})
    n_models = int(tinfo.get("n_models", int(model.max()) + 1 if len(model) else 0))
    ptypes = list(tinfo.get("prompt_types", dict.fromkeys(p for p in ptype if p is not None)))
    vectors = np.asarray(store.vectors, dtype=np.float32)

    ex_rows = np.flatnonzero(role == "exemplar")
    ex_rows = ex_rows[np.argsort(model[ex_rows], kind="stable")]
    counts = np.bincount(model[ex_rows], minlength=n_models)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise GenattrError(
            f"{store.path}: customized model {int(empty[0])} has no exemplar in the store "
            "(see failed.parquet); its queries cannot be evaluated"
        )
    ends = np.cumsum(counts)
    chunks = [(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True)]
    synth_paths, synth_ids, synth_feats = {}, {}, {}
    for p in ptypes:
        rows = np.flatnonzero((role == "synth") & np.array([t == p for t in ptype], dtype=bool))
        synth_paths[p] = [paths[r] or "" for r in rows]
        synth_ids[p] = model[rows].tolist()
        synth_feats[p] = torch.from_numpy(vectors[rows])
    tc = TestCaseFeatures(
        exemplar_paths=[paths[r] or "" for r in ex_rows],
        exemplar_chunks=chunks,
        exemplar_feats=torch.from_numpy(vectors[ex_rows]),
        synth_paths=synth_paths,
        synth_ids=synth_ids,
        synth_feats=synth_feats,
    )
    try:
        tc.validate()
    except ValueError as e:
        raise GenattrError(f"{store.path}: {e}") from None
    return tc


def store_to_testcase_pth(store: EmbeddingStore, pth: str | os.PathLike) -> None:
    """Write the official test-case file, readable by the authors' eval.py."""
    save_testcase_pth(store_to_testcase(store), pth)
