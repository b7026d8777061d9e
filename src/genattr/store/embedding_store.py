"""Embedding stores on disk, in the clip-retrieval / autofaiss layout.

    STORE/store.json                     format_version, backbone, dim, dtype, count, shards
    STORE/img_emb/img_emb_{i}.npy        (n_i, dim) float16 or float32, row-aligned with
    STORE/metadata/metadata_{i}.parquet  id, path, and any source columns

A shard exists when `store.json` lists it. Its two files are written under temporary names and
renamed into place, and `store.json` is replaced atomically only after both, so a crash at any
moment leaves the last committed state readable; files of an uncommitted shard are removed the
next time the store is opened for writing. Reads are memory-mapped: `store.vectors` is one
(count, dim) view across shards that slices block by block without loading the rest.

Every vector in a store comes from one backbone (name + weights id); appending vectors from
another backbone, or combining two stores made by different ones, raises GenattrError.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from genattr.atomic import atomic_path, write_text_atomic
from genattr.data.names import PATH_BYTES, openable_paths
from genattr.errors import GenattrError, validation_reason

STORE_FORMAT_VERSION = 1
STORE_KIND = "genattr.embedding_store"
DTYPES = {"float32": np.float32, "float16": np.float16, "fp32": np.float32, "fp16": np.float16}
_FP16_MAX = float(np.finfo(np.float16).max)
_LOCKED_HERE: set[str] = set()  # stores this process is writing (lockf is per process)


class _BackboneHeader(BaseModel):
    name: str
    weights_id: str


class _ShardHeader(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: Annotated[int, Field(ge=0)]
    count: Annotated[int, Field(ge=0)]


class StoreHeader(BaseModel):
    """store.json as read: the fields the store relies on, with their types, and a row count
    that is the sum of its shards' (a hand-edited or damaged header stops here, in one line)."""

    model_config = ConfigDict(extra="allow", strict=True)

    kind: Literal["genattr.embedding_store"]
    format_version: Literal[1]
    backbone: _BackboneHeader
    preprocess_config: dict[str, Any] = {}
    dim: Annotated[int, Field(gt=0)]
    dtype: Literal["float32", "float16"]
    count: Annotated[int, Field(ge=0)]
    shards: list[_ShardHeader]
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _count_is_the_shards_sum(self) -> StoreHeader:
        total = sum(s.count for s in self.shards)
        if total != self.count:
            raise ValueError(f"count is {self.count} but the shards hold {total} rows")
        if len({s.index for s in self.shards}) != len(self.shards):
            raise ValueError("two shards share an index")
        return self


def _dtype_name(dtype: Any) -> str:
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if key not in DTYPES:
        raise GenattrError(f"store dtype must be float32 or float16, got {dtype!r}")
    return np.dtype(DTYPES[key]).name


@dataclass(frozen=True)
class BackboneInfo:
    """Which feature space a store's vectors live in: two stores are comparable iff equal."""

    name: str
    weights_id: str = "none"
    preprocess_config: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_backbone(cls, backbone: Any) -> BackboneInfo:
        """From a `genattr.features.Backbone` (or anything with the same attributes)."""
        return cls(backbone.name, backbone.weights_id, dict(backbone.preprocess_config))

    def describe(self) -> str:
        return f"{self.name} (weights {self.weights_id})"


def check_same_backbone(*stores: EmbeddingStore) -> None:
    """Raise GenattrError unless all stores were made by the same backbone and weights."""
    first = stores[0]
    for other in stores[1:]:
        if other.backbone != first.backbone:
            raise GenattrError(
                f"cannot mix embedding stores from different backbones: {first.path} holds "
                f"{first.backbone.describe()}, {other.path} holds {other.backbone.describe()}"
            )
        if other.dim != first.dim:
            raise GenattrError(
                f"cannot mix embedding stores of different dims: {first.path} is {first.dim}-d, "
                f"{other.path} is {other.dim}-d"
            )


class ShardedVectors:
    """A read-only (count, dim) matrix over the shards' memory maps.

    `len`, `.shape`, `.ndim`, `.dtype` as numpy; `v[a:b]` reads those rows into a new numpy
    array (only the shards they touch), `v[i]` one row, `v[index_array]` rows by index.
    This is what `genattr.evaluate` streams in blocks.
    """

    def __init__(self, shards: Sequence[np.ndarray], dim: int, dtype: np.dtype):
        self.shards = list(shards)
        self._dim = dim
        self.dtype = np.dtype(dtype)
        sizes = [len(s) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self._dim)

    @property
    def ndim(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"ShardedVectors(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def _rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), self._dim), dtype=self.dtype)
        if stop <= start:
            return out
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        for k in range(first, len(self.shards)):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if pos >= stop:
                break
            a, b = pos - lo, min(stop, hi) - lo
            out[pos - start : pos - start + (b - a)] = self.shards[k][a:b]
            pos = lo + b
        return out

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, tuple):
            rows, *rest = key
            return self[rows][(slice(None), *rest)]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._rows(start, stop)
            return self[np.arange(start, stop, step)]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} vectors")
            return self._rows(i, i + 1)[0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} vectors")
        out = np.empty((*idx.shape, self._dim), dtype=self.dtype)
        flat, flat_out = idx.reshape(-1), out.reshape(-1, self._dim)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for k in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == k)
            flat_out[sel] = self.shards[k][flat[sel] - self.offsets[k]]
        return out

    def __array__(self, dtype=None, copy=None):
        rows = self._rows(0, len(self))
        return rows if dtype is None else rows.astype(dtype)

    def blocks(self, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start_row, rows) blocks in order; each block is a fresh array."""
        for start in range(0, len(self), block_rows):
            yield start, self._rows(start, min(len(self), start + block_rows))


@dataclass
class Shard:
    index: int
    count: int
    vectors: np.ndarray  # memory-mapped
    metadata_path: Path


class EmbeddingStore:
    """One embedding store directory. Build with `create`/`open`; everything reads through it."""

    def __init__(self, path: Path, info: dict[str, Any]):
        self.path = path
        self._info = info
        self._vectors: ShardedVectors | None = None
        self._id_set: set[str] | None = None

    # ---- opening and creating -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        backbone: BackboneInfo | Any,
        dim: int,
        dtype: str = "float32",
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> EmbeddingStore:
        """Start an empty store; refuses a directory that already holds one."""
        path = Path(path)
        if (path / "store.json").exists():
            raise GenattrError(f"{path}: an embedding store already exists here")
        if not isinstance(backbone, BackboneInfo):
            backbone = BackboneInfo.from_backbone(backbone)
        info = {
            "kind": STORE_KIND,
            "format_version": STORE_FORMAT_VERSION,
            "backbone": {"name": backbone.name, "weights_id": backbone.weights_id},
            "preprocess_config": backbone.preprocess_config,
            "dim": int(dim),
            "dtype": _dtype_name(dtype),
            "count": 0,
            "shards": [],
            "extra": dict(extra or {}),
        }
        (path / "img_emb").mkdir(parents=True, exist_ok=True)
        (path / "metadata").mkdir(parents=True, exist_ok=True)
        store = cls(path, info)
        store._write_info()
        return store

    @classmethod
    def open(
        cls, path: str | os.PathLike, backbone: BackboneInfo | Any | None = None
    ) -> EmbeddingStore:
        """Open a store for reading and appending; with `backbone`, refuse any other one."""
        path = Path(path)
        info_path = path / "store.json"
        if not info_path.exists():
            what = "no such directory" if not path.exists() else "no store.json"
            raise GenattrError(f"{path}: not an embedding store ({what})")
        try:
            info = json.loads(info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GenattrError(f"{info_path}: not valid JSON ({e})") from None
        if not isinstance(info, dict) or info.get("kind") != STORE_KIND:
            raise GenattrError(f"{info_path}: not a genattr embedding store")
        if info.get("format_version") != STORE_FORMAT_VERSION:
            raise GenattrError(
                f"{info_path}: format_version {info.get('format_version')!r} is not supported "
                f"(expected {STORE_FORMAT_VERSION})"
            )
        try:
            StoreHeader.model_validate(info)
        except ValidationError as e:
            raise GenattrError(
                f"{info_path}: damaged store.json ({validation_reason(e)})"
            ) from None
        store = cls(path, info)
        if backbone is not None:
            if not isinstance(backbone, BackboneInfo):
                backbone = BackboneInfo.from_backbone(backbone)
            if backbone != store.backbone:
                raise GenattrError(
                    f"{path}: this store holds {store.backbone.describe()} vectors, "
                    f"not {backbone.describe()}; use another store directory"
                )
        return store

    @classmethod
    def exists(cls, path: str | os.PathLike) -> bool:
        return (Path(path) / "store.json").exists()

    # ---- description ----------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """A copy of store.json as committed."""
        return json.loads(json.dumps(self._info))

    @property
    def backbone(self) -> BackboneInfo:
        b = self._info["backbone"]
        return BackboneInfo(b["name"], b["weights_id"], self._info.get("preprocess_config", {}))

    @property
    def dim(self) -> int:
        return int(self._info["dim"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._info["dtype"])

    @property
    def count(self) -> int:
        return int(self._info["count"])

    def __len__(self) -> int:
        return self.count

    @property
    def num_shards(self) -> int:
        return len(self._info["shards"])

    @property
    def extra(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._info.get("extra", {})))

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, {self.backbone.describe()}, "
            f"count={self.count}, dim={self.dim}, dtype={self.dtype.name})"
        )

    # ---- paths -----------------------------------------------------------------------------
    def emb_path(self, i: int) -> Path:
        return self.path / "img_emb" / f"img_emb_{i}.npy"

    def metadata_path(self, i: int) -> Path:
        return self.path / "metadata" / f"metadata_{i}.parquet"

    # ---- reading ---------------------------------------------------------------------------
    def _load_shard(self, entry: Mapping[str, Any]) -> np.ndarray:
        i, n = int(entry["index"]), int(entry["count"])
        p = self.emb_path(i)
        try:
            arr = np.load(p, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise GenattrError(f"{p}: cannot read shard {i} ({e})") from None
        if arr.shape != (n, self.dim) or arr.dtype != self.dtype:
            raise GenattrError(
                f"{p}: shard {i} is {arr.shape} {arr.dtype}, store.json says "
                f"({n}, {self.dim}) {self.dtype.name}"
            )
        return arr

    @property
    def vectors(self) -> ShardedVectors:
        """All vectors as one memory-mapped (count, dim) matrix (see ShardedVectors)."""
        if self._vectors is None:
            shards = [self._load_shard(e) for e in self._info["shards"]]
            self._vectors = ShardedVectors(shards, self.dim, self.dtype)
        return self._vectors

    def iter_shards(self) -> Iterator[Shard]:
        for entry, vecs in zip(self._info["shards"], self.vectors.shards, strict=True):
            i = int(entry["index"])
            yield Shard(i, int(entry["count"]), vecs, self.metadata_path(i))

    def metadata(self, columns: Sequence[str] | None = None):
        """All shards' metadata as one pyarrow Table, row-aligned with `vectors`."""
        tables = []
        for entry in self._info["shards"]:
            p = self.metadata_path(int(entry["index"]))
            try:
                t = pq.read_table(p, columns=list(columns) if columns else None)
            except (OSError, pa.ArrowException) as e:
                raise GenattrError(f"{p}: cannot read metadata ({e})") from None
            if t.num_rows != int(entry["count"]):
                raise GenattrError(f"{p}: {t.num_rows} rows, store.json says {entry['count']}")
            tables.append(t)
        if not tables:
            names = list(columns) if columns else ["id", "path"]
            return pa.table({c: pa.array([], pa.string()) for c in names})
        return pa.concat_tables(tables, promote_options="default")

    @property
    def ids(self) -> list[str]:
        return self.metadata(["id"]).column("id").to_pylist()

    @property
    def paths(self) -> list[str]:
        return self.metadata(["path"]).column("path").to_pylist()

    @property
    def file_paths(self) -> list[str]:
        """Paths to open each row's file with: `paths`, except where extraction kept a name's
        own bytes (`path_bytes`: file names that are not UTF-8, which `path` prints escaped)."""
        out: list[str] = []
        for entry in self._info["shards"]:
            p = self.metadata_path(int(entry["index"]))
            try:
                has_raw = PATH_BYTES in pq.read_schema(p).names
                t = pq.read_table(p, columns=["path", PATH_BYTES] if has_raw else ["path"])
            except (OSError, pa.ArrowException) as e:
                raise GenattrError(f"{p}: cannot read metadata ({e})") from None
            raw = t.column(PATH_BYTES).to_pylist() if has_raw else None
            out += openable_paths(t.column("path").to_pylist(), raw)
        return out

    # ---- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[EmbeddingStore]:
        """Hold the store's write lock (one writer at a time) and drop uncommitted leftovers.

        A POSIX record lock (lockf), not flock: forked children such as decode workers do not
        inherit it, so a killed writer's lock dies with it even while its workers wind down.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _LOCKED_HERE:
            raise GenattrError(f"{self.path}: this store is already being written")
        with open(self.path / ".lock", "a") as lock:
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise GenattrError(f"{self.path}: another process is writing this store") from None
            _LOCKED_HERE.add(key)
            try:
                self._reload()
                self.remove_uncommitted()
                yield self
            finally:
                _LOCKED_HERE.discard(key)
                fcntl.lockf(lock, fcntl.LOCK_UN)

    def _reload(self) -> None:
        self._info = EmbeddingStore.open(self.path)._info
        self._vectors = None
        self._id_set = None

    def remove_uncommitted(self) -> list[Path]:
        """Delete shard files and temporaries that store.json does not list (a crash's debris)."""
        committed = {int(e["index"]) for e in self._info["shards"]}
        removed = []
        for sub, prefix, suffix in (
            ("img_emb", "img_emb_", ".npy"),
            ("metadata", "metadata_", ".parquet"),
        ):
            for p in (self.path / sub).glob("*"):
                name = p.name
                stem = name[len(prefix) : -len(suffix)] if name.endswith(suffix) else ""
                is_shard = name.startswith(prefix) and stem.isdigit()
                if (is_shard and int(stem) not in committed) or name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        for p in self.path.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def _write_info(self) -> None:
        write_text_atomic(self.path / "store.json", json.dumps(self._info, indent=1) + "\n")

    def _prepare(self, vectors: Any) -> np.ndarray:
        if hasattr(vectors, "detach"):  # torch tensor
            vectors = vectors.detach().cpu().float().numpy()
        arr = np.asarray(vectors)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise GenattrError(
                f"{self.path}: cannot append vectors of shape {arr.shape} to a {self.dim}-d store"
            )
        if not np.isfinite(arr).all():
            row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
            raise GenattrError(f"{self.path}: vector {row} to append has NaN or Inf values")
        if self.dtype == np.float16 and arr.size and np.abs(arr).max() > _FP16_MAX:
            raise GenattrError(
                f"{self.path}: values up to {np.abs(arr).max():.3g} overflow float16; "
                "use a float32 store"
            )
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def append(
        self,
        vectors: Any,
        ids: Sequence[str],
        paths: Sequence[str | None] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
        *,
        backbone: BackboneInfo | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        """Commit one new shard (vectors + metadata rows); returns its index.

        `backbone`, when given, must match the store's. `extra` is merged into store.json's
        "extra" in the same atomic update that commits the shard (extraction keeps its resume
        cursor there). Ids must be unique within the store.
        """
        if backbone is not None and backbone != self.backbone:
            raise GenattrError(
                f"{self.path}: this store holds {self.backbone.describe()} vectors; cannot "
                f"append vectors from {backbone.describe()}"
            )
        arr = self._prepare(vectors)
        n = len(arr)
        ids = [str(i) for i in ids]
        paths = list(paths) if paths is not None else [None] * n
        cols = {k: list(v) for k, v in (columns or {}).items()}
        lengths: list[tuple[str, Sequence[Any]]] = [("ids", ids), ("paths", paths), *cols.items()]
        for name, values in lengths:
            if len(values) != n:
                raise GenattrError(f"{self.path}: {len(values)} {name} for {n} vectors")
        if len(set(ids)) != n:
            raise GenattrError(f"{self.path}: duplicate ids in the rows to append")
        if self._id_set is None:
            self._id_set = set(self.ids)
        clash = next((i for i in ids if i in self._id_set), None)
        if clash is not None:
            raise GenattrError(f"{self.path}: id {clash!r} is already in the store")
        reserved = {"id", "path"} & set(cols)
        if reserved:
            raise GenattrError(f"{self.path}: column names {sorted(reserved)} are reserved")
        table = pa.table({"id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string())})
        for k, v in cols.items():
            table = table.append_column(k, pa.array(v))
        index = 1 + max((int(e["index"]) for e in self._info["shards"]), default=-1)
        self.path.joinpath("img_emb").mkdir(parents=True, exist_ok=True)
        self.path.joinpath("metadata").mkdir(parents=True, exist_ok=True)
        with atomic_path(self.emb_path(index)) as tmp_e:
            with open(tmp_e, "wb") as f:  # a file object: np.save(path) would add ".npy"
                np.save(f, arr)
            with atomic_path(self.metadata_path(index)) as tmp_m:
                pq.write_table(table, tmp_m)
        info = json.loads(json.dumps(self._info))
        info["shards"].append(
            {
                "index": index,
                "count": n,
                "emb": f"img_emb/{self.emb_path(index).name}",
                "metadata": f"metadata/{self.metadata_path(index).name}",
            }
        )
        info["count"] = int(info["count"]) + n
        if extra:
            info.setdefault("extra", {}).update(json.loads(json.dumps(dict(extra))))
        self._info = info
        self._write_info()
        self._vectors = None
        self._id_set.update(ids)
        return index

    def update_extra(self, extra: Mapping[str, Any]) -> None:
        """Merge keys into store.json's "extra", atomically, without adding a shard."""
        self._info.setdefault("extra", {}).update(json.loads(json.dumps(dict(extra))))
        self._write_info()

    def check_compatible(self, other: EmbeddingStore) -> None:
        check_same_backbone(self, other)

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in self._info.items() if k != "shards"}
        d["num_shards"] = self.num_shards
        d["backbone"] = asdict(self.backbone)
        return d
