"""Extraction's writer side: results in source order -> committed shards of an embedding store,
with failures in failed.parquet, so a killed run resumes where its last commit left it; the
entries the listing skipped go to skipped.parquet and, counted, into the extraction state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genattr.atomic import atomic_path
from genattr.errors import GenattrError
from genattr.store import BackboneInfo, EmbeddingStore

FAILED_FILE = "failed.parquet"
SKIPPED_FILE = "skipped.parquet"


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """skipped.parquet: one row (path, reason) per entry of the source that is not an item."""
    table = pa.table(
        {
            "path": pa.array([p for p, _ in skipped], pa.string()),
            "reason": pa.array([r for _, r in skipped], pa.string()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class _FailureLog:
    """Failures so far; written with each commit, filtered to the committed cursor."""

    def __init__(self, path: Path, cursor: int):
        self.path = path
        self.rows: list[tuple[int, str, str, str]] = []
        if path.exists():
            t = pq.read_table(path).to_pylist()
            self.rows = [
                (r["source_index"], r["id"], r["path"], r["reason"])
                for r in t
                if r["source_index"] < cursor
            ]

    def add(self, i: int, source, reason: str) -> None:
        self.rows.append((i, source.ids[i], source.paths[i], reason))

    def write(self, cursor: int) -> int:
        rows = [r for r in self.rows if r[0] < cursor]
        table = pa.table(
            {
                "source_index": pa.array([r[0] for r in rows], pa.int64()),
                "id": pa.array([r[1] for r in rows], pa.string()),
                "path": pa.array([r[2] for r in rows], pa.string()),
                "reason": pa.array([r[3] for r in rows], pa.string()),
            }
        )
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
        return len(rows)


class ShardWriter:
    """Turns results in source order into committed shards of exactly `shard_size` vectors.

    Each commit writes failed.parquet, then the shard and the new cursor in one store.json
    update. Failures must be reported before the vectors that follow them (`fail` before
    `add` for the same batch is enough): a commit records every failure below its cursor.
    """

    def __init__(self, store, source, settings: dict[str, Any]):
        self.store, self.source, self.settings = store, source, settings
        self.state = store.extra["extraction"]
        self.start = int(self.state["cursor"])
        self.total = len(source)
        self.failures = _FailureLog(store.path / FAILED_FILE, self.start)
        self.failed_before = len(self.failures.rows)
        self.listing = source.listing()
        write_skipped(store.path / SKIPPED_FILE, source.skipped)
        self.extracted = 0
        self._vecs: list[np.ndarray] = []
        self._rows: list[int] = []

    @property
    def room(self) -> int:
        """Vectors the open shard still takes."""
        return self.settings["shard_size"] - len(self._rows)

    def fail(self, i: int, reason: str) -> None:
        self.failures.add(i, self.source, reason)

    def add(self, rows: Sequence[int], vectors: np.ndarray) -> None:
        """Vectors of source items `rows` (increasing); commits each shard as it fills."""
        k = 0
        while k < len(rows):
            take = min(self.room, len(rows) - k)
            self._vecs.append(vectors[k : k + take])
            self._rows.extend(int(r) for r in rows[k : k + take])
            k += take
            if self.room == 0:
                self._commit(self._rows[-1] + 1)

    def finish(self) -> None:
        self._commit(self.total)

    @property
    def failed_total(self) -> int:
        return len([r for r in self.failures.rows if r[0] < self.total])

    def _commit(self, cursor: int) -> None:
        source = self.source
        n_fail = self.failures.write(cursor)
        new_state = {**self.state, **self.settings, "cursor": cursor, "failed": n_fail}
        new_state["listing"] = self.listing
        new_state["complete"] = cursor >= self.total
        if self._rows:
            rows = self._rows
            cols = {k: [v[i] for i in rows] for k, v in source.columns.items()}
            cols["source_index"] = list(rows)
            self.store.append(
                np.concatenate(self._vecs),
                [source.ids[i] for i in rows],
                [source.paths[i] for i in rows],
                cols,
                extra={"extraction": new_state},
            )
            self.extracted += len(rows)
        else:
            self.store.update_extra({"extraction": new_state})
        self._vecs, self._rows = [], []


def open_store(out: Path, backbone, source, settings: dict[str, Any], store_dtype: str):
    info = BackboneInfo.from_backbone(backbone)
    src = source.describe()
    if not EmbeddingStore.exists(out):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise GenattrError(f"{out}: exists and is not an embedding store; choose a new --out")
        initial = {"source": src, **settings, "cursor": 0, "complete": False, "failed": 0}
        # where the weights came from, so an index over this store can load them again
        extra = {"extraction": initial, "weights_path": backbone.weights_path, **source.extra}
        return EmbeddingStore.create(out, info, backbone.dim, store_dtype, extra=extra)
    store = EmbeddingStore.open(out, backbone=info)
    state = store.extra.get("extraction")
    if state is None:
        raise GenattrError(f"{out}: this store was not made by `genattr extract`; use a new --out")
    if state["source"]["fingerprint"] != src["fingerprint"]:
        raise GenattrError(
            f"{out}: this store was extracted from {state['source']['location']} "
            f"({state['source']['count']} images), which differs from {src['location']} "
            f"({src['count']} images); use a new --out to extract another collection"
        )
    for key in ("shard_size", "dtype", "augment", "views", "augment_seed"):
        if state.get(key) != settings[key]:
            raise GenattrError(
                f"{out}: cannot resume with {key}={settings[key]!r}; the store was started "
                f"with {key}={state.get(key)!r}"
            )
    if store.dtype != np.dtype(
        {"fp32": "float32", "fp16": "float16"}.get(store_dtype, store_dtype)
    ):
        raise GenattrError(f"{out}: the store holds {store.dtype.name} vectors, not {store_dtype}")
    return store
