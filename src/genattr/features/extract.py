"""Batched, resumable feature extraction from image collections into an embedding store.

Decoding runs in worker processes (a torch DataLoader) while the main process runs the model,
so on a CPU the cores go to the forward pass and decoding hides behind it. Images that cannot
be decoded are recorded in STORE/failed.parquet (source_index, id, path, reason) and skipped.
With engine="ray" the same items are decoded by Ray tasks and embedded by Ray actors holding
the model (genattr.features.extract_ray); either way this process writes the store, through
the same `ShardWriter`, so both engines write the same shards.

Resuming: store.json's extra["extraction"]["cursor"] is the number of source items fully
accounted for (embedded in a committed shard, or failed). Shards close after exactly
`shard_size` vectors, and the local engine's batches never straddle a shard, so a run killed
at any moment and started again recomputes the same batches and ends with the same store (ids
and vectors) as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genattr.errors import GenattrError
from genattr.progress import progress_bar

DEFAULT_BATCH_SIZE = 32
DEFAULT_SHARD_SIZE = 10_000
COMPUTE_DTYPES = ("fp32", "fp16", "bf16")
ENGINES = ("local", "ray")
FAILED_FILE = "failed.parquet"


def default_workers() -> int:
    """One decode worker per spare core, at least one: the model gets the threads."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass
class ExtractResult:
    """What one call did: `extracted` and `failed_now` count this run only."""

    store: Any  # EmbeddingStore
    total: int  # items in the source
    resumed_from: int  # items already done before this run
    extracted: int
    failed_now: int
    failed_total: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        done = self.extracted + self.failed_now
        return done / self.seconds if self.seconds > 0 else float("nan")


class ItemDecoder:
    """Source item i -> (i, float32 array | None, failure reason | None).

    Picklable (a columnar source and frozen dataclasses), so it runs in DataLoader workers and
    in Ray tasks alike.
    """

    def __init__(self, source, preprocess, max_pixels: int | None, shape, augment=None):
        self.source, self.preprocess = source, preprocess
        self.max_pixels, self.shape, self.augment = max_pixels, tuple(shape), augment
        self.views = source.columns.get("view")

    def __call__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        from genattr.data.images import ImageDecodeError, load_rgb

        if i in self.source.prefailed:
            return i, None, self.source.prefailed[i]
        try:
            image = load_rgb(self.source.read_bytes(i), self.max_pixels)
        except ImageDecodeError as e:
            return i, None, str(e)
        except OSError as e:
            return i, None, f"cannot read: {e.strerror or e}"
        if self.augment is not None and self.views is not None and self.views[i] > 0:
            image = self.augment(image, i)
        try:
            arr = np.asarray(self.preprocess(image), dtype=np.float32)
        except Exception as e:  # a backbone's preprocess rejecting one image must not stop the run
            return i, None, f"preprocess failed: {type(e).__name__}: {e}"
        if arr.shape != self.shape:
            return i, None, f"preprocess gave shape {arr.shape}, expected {self.shape}"
        if not np.isfinite(arr).all():
            return i, None, "preprocess gave NaN or Inf values"
        return i, arr, None


class _DecodeDataset:
    """Items start.. of a source as a torch map-style dataset (runs in DataLoader workers)."""

    def __init__(self, decoder: ItemDecoder, start: int):
        self.decoder, self.start = decoder, start

    def __len__(self) -> int:
        return len(self.decoder.source) - self.start

    def __getitem__(self, k: int):
        return self.decoder(self.start + k)


def _collate(items):
    return items


def _worker_init(_):
    """Decode workers: one thread each, and die with the main process even on SIGKILL.

    Without PR_SET_PDEATHSIG a killed extraction leaves its workers blocked on a full result
    pipe that their siblings keep open, forever.
    """
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _reference_shape(preprocess) -> tuple[int, ...]:
    from PIL import Image

    return tuple(np.asarray(preprocess(Image.new("RGB", (256, 256), (128, 128, 128)))).shape)


def _resolve_backbone(features, weights, device):
    from genattr.features.registry import Backbone, get_backbone

    if isinstance(features, Backbone):
        return features
    try:
        return get_backbone(features, weights=weights)
    except KeyError as e:
        raise GenattrError(str(e.args[0])) from None


def _autocast(device: str, dtype: str):
    import torch

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def _has_conv(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@contextlib.contextmanager
def _memory_format(model, channels_last: bool) -> Iterator[None]:
    """channels_last while extracting (faster convolutions on CPU); the caller's model is
    given back in its own layout."""
    import torch

    if not channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def embed_arrays(
    backbone, pixels: np.ndarray, device: str, dtype: str, channels_last: bool
) -> np.ndarray:
    """One forward pass: preprocessed (B, ...) float32 -> (B, dim) float32, shape checked."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels))
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device, non_blocking=True)
    with torch.inference_mode(), _autocast(device.split(":")[0], dtype):
        y = backbone.embed(x)
    y = y.float().cpu().numpy()
    if y.shape != (len(pixels), backbone.dim):
        raise GenattrError(
            f"backbone {backbone.name} returned {y.shape}, expected ({len(pixels)}, {backbone.dim})"
        )
    return y


class _FailureLog:
    """Failures so far; written with each commit, filtered to the committed cursor."""

    def __init__(self, path: Path, cursor: int):
        self.path = path
        self.rows: list[tuple[int, str, str, str]] = []
        if path.exists():
            import pyarrow.parquet as pq

            t = pq.read_table(path).to_pylist()
            self.rows = [
                (r["source_index"], r["id"], r["path"], r["reason"])
                for r in t
                if r["source_index"] < cursor
            ]

    def add(self, i: int, source, reason: str) -> None:
        self.rows.append((i, source.ids[i], source.paths[i], reason))

    def write(self, cursor: int) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from genattr.atomic import atomic_path

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


def _open_store(out: Path, backbone, source, settings: dict[str, Any], store_dtype: str):
    from genattr.store import BackboneInfo, EmbeddingStore

    info = BackboneInfo.from_backbone(backbone)
    src = source.describe()
    if not EmbeddingStore.exists(out):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise GenattrError(f"{out}: exists and is not an embedding store; choose a new --out")
        state = {"source": src, **settings, "cursor": 0, "complete": False, "failed": 0}
        # where the weights came from, so an index over this store can load them again
        extra = {"extraction": state, "weights_path": backbone.weights_path, **source.extra}
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


@dataclass
class EmbedJob:
    """What an engine needs to embed items start..total-1 and hand them to a ShardWriter."""

    backbone: Any  # Backbone
    decoder: ItemDecoder
    start: int
    batch_size: int
    device: str
    dtype: str
    channels_last: bool
    workers: int | None  # decode processes (local) or decode tasks in flight (ray); None: auto
    threads: int | None  # torch threads per model (process or actor)


def _embed_local(job: EmbedJob, writer: ShardWriter, advance: Callable[[int], None]) -> None:
    """Decode in DataLoader workers, embed here; batches never straddle a shard."""
    import torch

    workers = default_workers() if job.workers is None else job.workers
    threads = job.threads
    if threads is None and job.device == "cpu":
        threads = max(1, (os.cpu_count() or 1) - workers)
    model = job.backbone.model.eval().to(job.device)
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(job.decoder, job.start),
        batch_size=job.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    batch: list[np.ndarray] = []
    rows: list[int] = []

    def run_batch() -> None:
        vectors = embed_arrays(
            job.backbone, np.stack(batch), job.device, job.dtype, job.channels_last
        )
        writer.add(rows, vectors)
        batch.clear()
        rows.clear()

    with _torch_threads(threads), _memory_format(model, job.channels_last):
        for chunk in loader:
            for i, arr, reason in chunk:
                if arr is None:
                    writer.fail(i, reason)
                    continue
                batch.append(arr)
                rows.append(i)
                if len(batch) >= min(job.batch_size, writer.room):
                    run_batch()
            advance(len(chunk))
        if batch:
            run_batch()


def extract(
    features: Any,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    store_dtype: str = "fp32",
    shard_size: int = DEFAULT_SHARD_SIZE,
    threads: int | None = None,
    channels_last: bool | None = None,
    max_pixels: int | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = False,
    augment: str | None = None,
    views: int = 1,
    augment_seed: int = 0,
    engine: str = "local",
    concurrency: int | None = None,
    ray_address: str | None = None,
) -> ExtractResult:
    """Embed every image of `images` with backbone `features` into the store at `out`.

    features: a registered backbone name or a `Backbone`; images: a folder, a text file of
    paths, webdataset .tar shards or an AbC test-case JSON (see genattr.data.sources).
    dtype is the compute precision (autocast for fp16/bf16); store_dtype what is written (fp32
    or fp16). workers: decode processes (0 decodes in this process); threads: torch threads for
    the model, by default the cores the workers leave (oversubscribing a small CPU costs more
    than it gives: see BENCHMARKS.md). channels_last: default on for models with convolutions.
    augment (mild|strong) with views=K embeds each image K times, view 0 as it is (a `view`
    metadata column tells them apart; see genattr.features.augment). Re-running with the same
    arguments resumes an interrupted run; on a complete store it does nothing.
    engine="ray" runs the same extraction as Ray Data batch inference: `concurrency` model
    actors (default: one per GPU, or one on CPU), on the cluster at `ray_address` or on a
    local Ray started here (see genattr.features.extract_ray); the store is the same.
    """
    import torch

    from genattr.data.images import DEFAULT_MAX_PIXELS
    from genattr.data.sources import open_source, with_views

    if engine not in ENGINES:
        raise GenattrError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if dtype not in COMPUTE_DTYPES:
        raise GenattrError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if store_dtype not in ("fp32", "fp16", "float32", "float16"):
        raise GenattrError(f"store dtype must be fp32 or fp16, got {store_dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise GenattrError("--batch-size and --shard-size must be positive")
    if engine == "local" and device.startswith("cuda") and not torch.cuda.is_available():
        raise GenattrError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise GenattrError(f"--device must be cpu or cuda, got {device!r}")
    if engine == "ray":
        from genattr.features.extract_ray import import_ray

        import_ray()  # before any store is created
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    out = Path(out)

    if (augment is None) != (views == 1) or views < 1:
        raise GenattrError("--augment and --views go together: e.g. --augment mild --views 4")
    augmenter = None
    if augment is not None:
        from genattr.features.augment import AUGMENTATIONS, Augmenter

        if augment not in AUGMENTATIONS:
            raise GenattrError(f"--augment must be one of {', '.join(AUGMENTATIONS)}")
        augmenter = Augmenter(augment, augment_seed)

    source = with_views(open_source(images, root=root, exclude=out), views)
    backbone = _resolve_backbone(features, weights, device)
    settings = {
        "shard_size": int(shard_size),
        "dtype": dtype,
        "batch_size": int(batch_size),
        "max_pixels": max_pixels,
        "augment": augment,
        "views": views,
        "augment_seed": augment_seed,
    }
    store = _open_store(out, backbone, source, settings, store_dtype)
    t0 = time.perf_counter()
    with store.writing():
        writer = ShardWriter(store, source, settings)
        n, start = writer.total, writer.start
        if start >= n:
            if not writer.state.get("complete"):
                store.update_extra({"extraction": {**writer.state, "complete": True}})
            return ExtractResult(store, n, start, 0, 0, writer.failed_before, 0.0)
        job = EmbedJob(
            backbone=backbone,
            decoder=ItemDecoder(
                source,
                backbone.preprocess,
                max_pixels,
                _reference_shape(backbone.preprocess),
                augmenter,
            ),
            start=start,
            batch_size=int(batch_size),
            device=device,
            dtype=dtype,
            channels_last=_has_conv(backbone.model) if channels_last is None else channels_last,
            workers=workers,
            threads=threads,
        )
        with progress_bar("extract", n, done=start, enabled=progress) as advance:
            if engine == "local":
                _embed_local(job, writer, advance)
            else:
                from genattr.features.extract_ray import embed_with_ray

                embed_with_ray(job, writer, advance, concurrency=concurrency, address=ray_address)
        writer.finish()
    failed_total = writer.failed_total
    return ExtractResult(
        store,
        n,
        start,
        writer.extracted,
        failed_total - writer.failed_before,
        failed_total,
        time.perf_counter() - t0,
    )
