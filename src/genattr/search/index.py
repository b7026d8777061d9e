"""Attribution indexes: FAISS chosen from gallery size and memory budget, exact re-ranking.

An index directory holds everything needed to answer a query the way the gallery was embedded:
    index.json        format_version, kind, factory string, count, dim, nprobe, re-rank depth,
                      the store's backbone / weights id / preprocessing, and the head, if any
    vectors.npy       head-mapped, L2-normalised gallery vectors in fp32: searched directly by
                      a flat index (loaded in RAM), memory-mapped by IVF kinds to re-rank their
                      candidates exactly, so every reported similarity is exact
    index.faiss       the FAISS IVF / IVF-PQ index over the same vectors (IVF kinds only)
    index.ivfdata     on-disk kinds: the inverted lists (faiss OnDiskInvertedLists), which
                      index.faiss refers to by name; memory-mapped at query time
    metadata.parquet  id and path of every gallery row, in row order
    head/             a copy of the head (head.safetensors + head.json), if one was used
The choice follows autofaiss: a flat (exact) index while the vectors fit the memory budget and
the gallery is up to about a million images, IVF-PQ beyond while its codes fit the budget,
and past that IVF-PQ with its inverted lists on disk. The flat search is one torch matrix
product (faster here than faiss' IndexFlatIP for single queries: see BENCHMARKS.md).

Every build streams the gallery once, block by block: the IVF quantizer is trained first on a
random sample of rows, then blocks are mapped, written to vectors.npy and added. On-disk kinds
add into a fresh copy of the trained index per `shard_rows` rows, write it to .build/, and
merge the shards' inverted lists into index.ivfdata (faiss.contrib.ondisk.merge_ondisk), so
the build holds one shard of codes in memory, never the whole index. index.json is removed
first and written last: a directory without it is an unfinished build and does not load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genattr.atomic import atomic_path, write_text_atomic
from genattr.data.names import PATH_BYTES, openable_paths, path_bytes_column
from genattr.errors import GenattrError, validation_reason
from genattr.heads.checkpoint import MapperPair, load_heads
from genattr.heads.networks import head_in_out
from genattr.progress import progress_bar
from genattr.vectors import FeatureMatrix, embed, read_block, require_finite

INDEX_FORMAT_VERSION = 1


class IndexSpecHeader(BaseModel):
    model_config = ConfigDict(extra="allow")

    kind: str


class IndexHeader(BaseModel):
    """index.json as read: the fields `load` relies on, with their types."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["genattr.index"]
    format_version: Literal[1]
    index: IndexSpecHeader
    count: Annotated[int, Field(ge=0)]


KINDS = ("auto", "flat", "ivf", "ivfpq", "ivf-ondisk", "ivfpq-ondisk")
FLAT_MAX = 1_000_000
BLOCK_ROWS = 65536
IVFDATA = "index.ivfdata"
PQ_MIN_TRAIN = 256  # 8-bit product quantizer: 256 centroids per sub-space, one point each


def parse_size(text: str | int) -> int:
    """'4GB', '512MB', '1.5G' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    num = s.rstrip("KMGT")
    try:
        return int(float(num) * units[s[len(num) :]])
    except (ValueError, KeyError):
        raise GenattrError(f"cannot read memory size {text!r} (e.g. 4GB, 512MB)") from None


@dataclass
class IndexSpec:
    kind: str
    factory: str
    nlist: int = 0
    nprobe: int = 0
    rerank: int = 0  # candidates re-scored exactly per requested result (IVF kinds)

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    @property
    def on_disk(self) -> bool:
        return self.kind.endswith("-ondisk")


def choose_index(n: int, dim: int, memory_budget: int, kind: str = "auto") -> IndexSpec:
    """Pick the index type and its parameters from the gallery size and the RAM budget."""
    if kind not in KINDS:
        raise GenattrError(f"unknown index kind {kind!r}; choose from {KINDS}")
    if memory_budget <= 0:
        raise GenattrError(f"the memory budget must be positive, not {memory_budget} bytes")
    if kind.startswith("ivfpq") and n < PQ_MIN_TRAIN:
        raise GenattrError(
            f"--kind {kind} needs at least {PQ_MIN_TRAIN} vectors to train its 8-bit codes; "
            f"this gallery has {n}: use flat (exact, and the fastest at this size)"
        )
    # PQ with 8-bit codes: m sub-quantizers, m | dim
    m_options = [m for m in (dim // 8, dim // 16, dim // 32) if m >= 1 and dim % m == 0] or [1]
    if kind == "auto":
        if n <= FLAT_MAX and n * dim * 4 <= memory_budget:
            kind = "flat"
        else:  # in memory while the smallest PQ codes fit, else the lists go to disk
            kind = "ivfpq" if n * m_options[-1] <= memory_budget else "ivfpq-ondisk"
    if kind == "flat":
        return IndexSpec("flat", "Flat")
    # ~sqrt(n) lists (1,024 at 1M): k-means on a laptop stays in minutes; faiss wants about
    # 39 training points per centroid. Probing 1/64 of the lists (at least 8), then exact
    # re-ranking, keeps recall@100 high on clustered embeddings.
    nlist = int(2 ** round(math.log2(max(16.0, math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 or 1))
    nprobe = min(nlist, max(8, nlist // 64))
    if kind in ("ivf", "ivf-ondisk"):
        return IndexSpec(kind, f"IVF{nlist},Flat", nlist, nprobe, rerank=1)
    # in memory the largest m whose codes fit the budget; on disk the largest
    m = next((m for m in m_options if n * m <= memory_budget), m_options[-1])
    if kind == "ivfpq-ondisk":
        m = m_options[0]
    # "np": no polysemous training, which costs minutes and serves only Hamming filtering
    return IndexSpec(kind, f"IVF{nlist},PQ{m}np", nlist, nprobe, rerank=10)


def _mapped_blocks(vectors: FeatureMatrix, head: MapperPair | None, block: int = BLOCK_ROWS):
    real = head.real.eval() if head is not None else None
    with torch.no_grad():
        for start in range(0, len(vectors), block):
            raw = read_block(vectors, start, start + block, torch.device("cpu"))
            require_finite(raw, start, "the gallery")
            yield start, embed(raw, real).numpy()


def _mapped_rows(vectors: FeatureMatrix, rows: np.ndarray, head: MapperPair | None) -> np.ndarray:
    """Head-mapped, normalised rows by index (the training sample), read in sorted order."""
    x = vectors[rows]
    x = x.float() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x, dtype=np.float32))
    with torch.no_grad():
        return embed(x, head.real.eval() if head is not None else None).numpy()


class _OnDiskAdder:
    """Adds blocks into a fresh copy of the trained index per `shard_rows` rows, each written
    to .build/; `merge` joins their inverted lists into index.ivfdata."""

    def __init__(self, trained, build_dir: Path, shard_rows: int):
        import faiss

        self.trained, self.dir, self.shard_rows = trained, build_dir, shard_rows
        self.files: list[str] = []
        self.shard: faiss.Index | None = None
        self.faiss = faiss

    def add(self, start: int, block: np.ndarray) -> None:
        if self.shard is None:
            self.shard = self.faiss.clone_index(self.trained)
        self.shard.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
        if self.shard.ntotal >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if self.shard is not None and self.shard.ntotal:
            self.files.append(str(self.dir / f"shard_{len(self.files)}.index"))
            self.faiss.write_index(self.shard, self.files[-1])
        self.shard = None

    def merge(self, ivfdata: Path):
        from faiss.contrib.ondisk import merge_ondisk

        self._flush()
        merge_ondisk(self.trained, self.files, str(ivfdata))
        return self.trained


def _default_shard_rows(memory_budget: int, code_size: int) -> int:
    """Rows per on-disk build shard: its codes and ids take at most half the budget."""
    return max(BLOCK_ROWS, memory_budget // (2 * (code_size + 8)))


def build_index(
    vectors: FeatureMatrix,
    out_dir: str | os.PathLike,
    *,
    kind: str = "auto",
    memory_budget: str | int = "4GB",
    head: MapperPair | None = None,
    head_dir: str | os.PathLike | None = None,
    ids: list[str] | None = None,
    paths: list[str] | None = None,
    files: list[str] | None = None,
    provenance: dict | None = None,
    train_size: int | None = None,
    seed: int = 0,
    shard_rows: int | None = None,
    progress: bool = False,
) -> AttributionIndex:
    """Map (head), normalise and index the gallery in one streaming pass; see the module doc.

    train_size: rows the quantizer trains on, by default 100,000 or 40 per list if more (faiss
    wants about 39 per centroid). shard_rows: on-disk kinds, rows per build shard (default
    from the memory budget)."""

    n, dim = len(vectors), vectors.shape[1]
    if n == 0:
        raise GenattrError("cannot index an empty gallery")
    budget = parse_size(memory_budget)
    out_dim = dim if head is None else _head_out_dim(head)
    spec = choose_index(n, out_dim, budget, kind)  # refuses bad options before any file
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _build(vectors, out, spec, out_dim, head, head_dir, ids, paths, files,
                      provenance, train_size, seed, shard_rows or 0, budget, progress)  # fmt: skip
    except BaseException:
        if created:  # a failed first build leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _build(
    vectors: FeatureMatrix,
    out: Path,
    spec: IndexSpec,
    out_dim: int,
    head: MapperPair | None,
    head_dir: str | os.PathLike | None,
    ids: list[str] | None,
    paths: list[str] | None,
    files: list[str] | None,
    provenance: dict | None,
    train_size: int | None,
    seed: int,
    shard_rows: int,
    budget: int,
    progress: bool,
) -> AttributionIndex:
    """The build itself, into an `out` that exists; `build_index` checked the options."""
    import faiss

    n, dim = len(vectors), vectors.shape[1]
    (out / "index.json").unlink(missing_ok=True)
    (out / IVFDATA).unlink(missing_ok=True)  # an earlier on-disk build's lists
    build_dir = out / ".build"
    shutil.rmtree(build_dir, ignore_errors=True)
    index = adder = None
    if spec.kind != "flat":
        index = faiss.index_factory(out_dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train_size = train_size or max(100_000, 40 * spec.nlist)
        sample = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
        index.train(_mapped_rows(vectors, sample, head))
    if spec.on_disk:
        assert index is not None  # on-disk kinds are IVF kinds, never flat
        build_dir.mkdir()
        code_size = faiss.extract_index_ivf(index).code_size
        adder = _OnDiskAdder(index, build_dir, shard_rows or _default_shard_rows(budget, code_size))
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, out_dim)}
    # written with plain file writes, not a memory map: the build's memory stays one block
    with atomic_path(out / "vectors.npy") as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        with progress_bar("index", n, unit="rows", enabled=progress) as advance:
            for start, block in _mapped_blocks(vectors, head):
                f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
                if adder is not None:
                    adder.add(start, block)
                elif index is not None:
                    index.add(block)
                advance(len(block))
    if adder is not None:
        index = adder.merge(out / IVFDATA)
    if index is not None:
        with atomic_path(out / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
    shutil.rmtree(build_dir, ignore_errors=True)
    if head_dir is not None:
        shutil.copytree(head_dir, out / "head", dirs_exist_ok=True)
    _write_metadata(out / "metadata.parquet", n, ids, paths, files)
    doc = {
        "kind": "genattr.index",
        "format_version": INDEX_FORMAT_VERSION,
        "index": spec.__dict__,
        "count": n,
        "dim": out_dim,
        "input_dim": dim,
        "head": None if head is None else head.kind,
        **(provenance or {}),
    }
    write_text_atomic(out / "index.json", json.dumps(doc, indent=2) + "\n")
    return AttributionIndex.load(out)


def _write_metadata(
    path: Path, n: int, ids: list[str] | None, paths: list[str] | None, files: list[str] | None
) -> None:
    """ids and printable paths; where `files` (what to open) holds a name that is not UTF-8,
    its bytes too (`path_bytes`)."""
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    paths = [""] * n if paths is None else [str(p) for p in paths]
    if len(ids) != n or len(paths) != n or (files is not None and len(files) != n):
        raise GenattrError(f"{len(ids)} ids and {len(paths)} paths for {n} gallery vectors")
    table = pa.table({"id": ids, "path": paths})
    raw = None if files is None else path_bytes_column(files)
    if raw is not None:
        table = table.append_column(PATH_BYTES, pa.array(raw, pa.binary()))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _head_out_dim(head: MapperPair) -> int:
    return head_in_out(head.real)[1]


class AttributionIndex:
    """A built index: search head-mapped, normalised queries; similarities are exact."""

    def __init__(self, path: Path, meta: dict, index, exact_vectors: np.ndarray):
        self.path, self.meta, self.index, self.exact_vectors = path, meta, index, exact_vectors
        self.spec = IndexSpec(**meta["index"])
        if self.spec.nprobe:
            import faiss

            faiss.extract_index_ivf(index).nprobe = self.spec.nprobe

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttributionIndex:
        """Flat: vectors read into RAM. IVF: the index and the vectors memory-mapped."""
        path = Path(path)
        try:
            meta = json.loads((path / "index.json").read_text())
        except (OSError, ValueError):
            if (path / "vectors.npy").exists() or (path / ".build").exists():
                raise GenattrError(
                    f"{path}: an unfinished index build (no index.json); build it again"
                ) from None
            raise GenattrError(f"{path}: not a genattr index (no readable index.json)") from None
        try:
            IndexHeader.model_validate(meta)
        except ValidationError as e:
            raise GenattrError(
                f"{path}/index.json: not a genattr index ({validation_reason(e)})"
            ) from None
        if not (path / "vectors.npy").is_file():
            raise GenattrError(f"{path}: vectors.npy is missing; build the index again")
        if meta["index"]["kind"] == "flat":
            return cls(path, meta, None, np.load(path / "vectors.npy"))
        import faiss

        on_disk = IndexSpec(**meta["index"]).on_disk
        if on_disk and not (path / IVFDATA).is_file():
            raise GenattrError(f"{path}: {IVFDATA} is missing; build the index again")
        flags = faiss.IO_FLAG_SKIP_IVF_DATA if on_disk else faiss.IO_FLAG_MMAP
        index = faiss.read_index(str(path / "index.faiss"), flags)
        if on_disk:  # the lists are the file beside index.faiss, wherever it was built
            invlists = faiss.extract_index_ivf(index).invlists
            lists = None if invlists is None else faiss.downcast_InvertedLists(invlists)
            if not isinstance(lists, faiss.OnDiskInvertedLists):
                raise GenattrError(f"{path}: index.faiss has no on-disk inverted lists")
            lists.filename, lists.read_only = str(path / IVFDATA), True
            # faiss starts 32 threads per search to prefetch lists: ~1 ms a query here, for
            # lists the page cache already holds (cold multi-GB lists may want them back)
            lists.prefetch_nthread = 0
            lists.do_mmap()
        if index.ntotal != meta["count"]:
            raise GenattrError(
                f"{path}: index.faiss holds {index.ntotal} vectors, index.json says "
                f"{meta['count']}; build the index again"
            )
        return cls(path, meta, index, np.load(path / "vectors.npy", mmap_mode="r"))

    @property
    def count(self) -> int:
        return self.meta["count"]

    def metadata(self) -> tuple[list[str], list[str]]:
        """Gallery ids and paths, in row order."""
        table = pq.read_table(self.path / "metadata.parquet", columns=["id", "path"])
        return table.column("id").to_pylist(), table.column("path").to_pylist()

    def file_paths(self) -> list[str]:
        """Paths to open each gallery image with (names that are not UTF-8 by their bytes)."""
        table = pq.read_table(self.path / "metadata.parquet")
        raw = table.column(PATH_BYTES).to_pylist() if PATH_BYTES in table.column_names else None
        return openable_paths(table.column("path").to_pylist(), raw)

    def head(self) -> MapperPair | None:
        """The head the gallery was mapped with (queries go through its synth side)."""
        if self.meta.get("head") is None:
            return None
        return load_heads(self.path / "head")[0]

    def set_nprobe(self, nprobe: int) -> None:
        import faiss

        if self.spec.nprobe:
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) exact similarities, best first, and gallery row ids (-1 past the gallery)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.count)
        if self.spec.exact:
            scores = torch.from_numpy(queries) @ torch.from_numpy(self.exact_vectors).T
            top_sims, top_ids = scores.topk(k, dim=1)
            return top_sims.numpy(), top_ids.numpy()
        depth = min(self.count, max(k * self.spec.rerank, k))
        _, cand = self.index.search(queries, depth)
        sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, c in enumerate(cand):
            c = np.sort(c[c >= 0])  # sorted rows read the memory map in order
            s = self.exact_vectors[c] @ queries[row]
            top = np.argsort(-s, kind="stable")[:k]
            sims[row, : len(top)], ids[row, : len(top)] = s[top], c[top]
        return sims, ids
