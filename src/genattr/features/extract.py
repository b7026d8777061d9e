"""Batched, resumable feature extraction from image collections into an embedding store.

Decoding runs in worker processes (a torch DataLoader) while the main process runs the model,
so on a CPU the cores go to the forward pass and decoding hides behind it. Images that cannot
be decoded are recorded in STORE/failed.parquet (source_index, id, path, reason) and skipped;
entries of the collection that are not images (hidden, not an image by name or content, a
folder already walked) are listed in STORE/skipped.parquet (path, reason) and counted by reason
in store.json's extra["extraction"]["listing"], so every entry seen is accounted for. A file is
read only if it is a regular file, and only up to `max_file_mb`: anything else is a failure.
With engine="ray" the same items are decoded by Ray tasks and embedded by Ray actors holding
the model (genattr.features.extract_ray); either way this process writes the store, through
the same `ShardWriter`, so both engines write the same shards. The parts, as in
clip-retrieval: reader and decoder (`decode`), embedder (`embedder`), writer (`writer`), and
the engines (the local one here, Ray in `extract_ray`).

Resuming: store.json's extra["extraction"]["cursor"] is the number of source items fully
accounted for (embedded in a committed shard, or failed). Shards close after exactly
`shard_size` vectors, and the local engine's batches never straddle a shard, so a run killed
at any moment and started again recomputes the same batches and ends with the same store (ids
and vectors) as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from genattr.atomic import check_output
from genattr.data.images import DEFAULT_MAX_PIXELS
from genattr.data.sources import open_source, with_views
from genattr.errors import GenattrError, check_count
from genattr.features.augment import AUGMENTATIONS, Augmenter
from genattr.features.decode import DEFAULT_MAX_FILE_MB, ItemDecoder, reference_shape
from genattr.features.embedder import (
    EmbedJob,
    embed_arrays,
    has_conv,
    memory_format,
    torch_threads,
)
from genattr.features.extract_ray import embed_with_ray, import_ray
from genattr.features.registry import Backbone, get_backbone
from genattr.features.writer import ShardWriter, open_store
from genattr.progress import progress_bar

DEFAULT_BATCH_SIZE = 32
DEFAULT_SHARD_SIZE = 10_000
COMPUTE_DTYPES = ("fp32", "fp16", "bf16")
logger = logging.getLogger(__name__)
ENGINES = ("local", "ray")


MAX_WORKERS = 4


def choose_workers(decode_s: float, model_s: float, cores: int, device: str) -> int:
    """Decode workers that make an image cheapest, from one batch measured inline: `decode_s`
    and `model_s` seconds per image (the model on all `cores` threads). With W workers the
    model keeps cores - W threads on CPU (assumed to scale linearly), and the slower of the
    two sides sets the pace; inline, they add up. On 2 cores small PNGs (1.5 ms) beside a
    CNN (13 ms) decode inline; large JPEGs or a GPU's fast model get workers."""
    best, best_cost = 0, decode_s + model_s
    for w in range(1, min(MAX_WORKERS, cores - 1 if device == "cpu" else cores) + 1):
        model = model_s * cores / (cores - w) if device == "cpu" else model_s
        cost = max(decode_s / w, model)
        if cost < best_cost * 0.95:  # workers cost start-up and copies: want a clear gain
            best, best_cost = w, cost
    return best


@dataclass
class ExtractResult:
    """What one call did: `extracted` and `failed_now` count this run only.

    `listing` is what the source listing saw (`ImageSource.listing()`): items, folders walked
    and entries skipped, counted by reason."""

    store: Any  # EmbeddingStore
    total: int  # items in the source
    resumed_from: int  # items already done before this run
    extracted: int
    failed_now: int
    failed_total: int
    seconds: float
    listing: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> dict[str, int]:
        """Entries that are not items, by reason (hidden, not an image, ...)."""
        return dict(self.listing.get("skipped", {}))

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def images_per_second(self) -> float:
        done = self.extracted + self.failed_now
        return done / self.seconds if self.seconds > 0 else float("nan")


# ItemDecoder's answer for one item: (index, decoded array or None, why it failed or None)
_Decoded = tuple[int, np.ndarray | None, str | None]


class _DecodeDataset(torch.utils.data.Dataset[_Decoded]):
    """Items start.. of a source as a torch map-style dataset (runs in DataLoader workers)."""

    def __init__(self, decoder: ItemDecoder, start: int):
        self.decoder, self.start = decoder, start

    def __len__(self) -> int:
        return len(self.decoder.source) - self.start

    def __getitem__(self, k: int) -> _Decoded:
        return self.decoder(self.start + k)


def _collate(items: list[_Decoded]) -> list[_Decoded]:
    return items


def _worker_init(_):
    """Decode workers: one thread each, and die with the main process even on SIGKILL.

    Without PR_SET_PDEATHSIG a killed extraction leaves its workers blocked on a full result
    pipe that their siblings keep open, forever.
    """
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _resolve_backbone(features: Any, weights: str | None, device: str) -> Backbone:
    if isinstance(features, Backbone):
        return features
    try:
        return get_backbone(features, weights=weights, device=device)
    except KeyError as e:
        raise GenattrError(str(e.args[0])) from None


def _embed_local(job: EmbedJob, writer: ShardWriter, advance: Callable[[int], None]) -> None:
    """Decode in DataLoader workers (or inline), embed here; batches never straddle a shard.
    With `job.workers` None the first batch is decoded inline and both sides timed, and the
    rest runs with the workers `choose_workers` finds cheapest."""
    cores = os.cpu_count() or 1
    model = job.backbone.model.eval().to(job.device)
    with memory_format(model, job.channels_last):
        start, workers = job.start, job.workers
        if workers is None:
            start, workers = _first_batch_inline(job, writer, advance, cores)
        threads = job.threads
        if threads is None and job.device == "cpu":
            threads = max(1, cores - workers)
        loader: torch.utils.data.DataLoader[_Decoded] = torch.utils.data.DataLoader(
            _DecodeDataset(job.decoder, start),
            batch_size=job.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
        with torch_threads(threads):
            _embed_decoded(job, writer, advance, loader)


def _embed_decoded(
    job: EmbedJob,
    writer: ShardWriter,
    advance: Callable[[int], None],
    chunks: Iterable[list[_Decoded]],
) -> float:
    """Embed decoded items in batches (failures recorded); seconds spent in the model."""
    batch: list[np.ndarray] = []
    rows: list[int] = []
    model_s = 0.0

    def run_batch() -> None:
        nonlocal model_s
        t0 = time.perf_counter()
        vectors = embed_arrays(job.backbone, batch, job.device, job.dtype, job.channels_last)
        model_s += time.perf_counter() - t0
        writer.add(rows, vectors)
        batch.clear()
        rows.clear()

    for chunk in chunks:
        for i, arr, reason in chunk:
            if arr is None:  # the decoder says why
                writer.fail(i, reason or "not decoded")
                continue
            batch.append(arr)
            rows.append(i)
            if len(batch) >= min(job.batch_size, writer.room):
                run_batch()
        advance(len(chunk))
    if batch:
        run_batch()
    return model_s


def _first_batch_inline(
    job: EmbedJob, writer: ShardWriter, advance: Callable[[int], None], cores: int
) -> tuple[int, int]:
    """Decode and embed the first batch in this process, timing both sides; returns where
    the rest starts and the decode workers for it."""
    end = min(len(job.decoder.source), job.start + min(job.batch_size, writer.room))
    t0 = time.perf_counter()
    chunk = [job.decoder(i) for i in range(job.start, end)]
    decode_s = time.perf_counter() - t0
    with torch_threads(job.threads or (cores if job.device == "cpu" else None)):
        model_s = _embed_decoded(job, writer, advance, [chunk])
    n = max(1, end - job.start)
    workers = choose_workers(decode_s / n, model_s / n, cores, job.device) if n > 1 else 0
    logger.info(
        f"decoding {1000 * decode_s / n:.1f} ms/image, model {1000 * model_s / n:.1f} ms/image: "
        f"{workers or 'no'} decode worker{'s' if workers != 1 else ''}"
    )
    return end, workers


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
    max_file_mb: float | None = None,
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
    or fp16). workers: decode processes (0 decodes in this process; None: chosen from the first
    batch, decoded inline and timed, `choose_workers`); threads: torch threads for
    the model, by default the cores the workers leave (oversubscribing a small CPU costs more
    than it gives: see BENCHMARKS.md). channels_last: default on for models with convolutions.
    max_file_mb: files larger than this (MB of 2^20 bytes, default 256) are failures, not read.
    augment (mild|strong) with views=K embeds each image K times, view 0 as it is (a `view`
    metadata column tells them apart; see genattr.features.augment). Re-running with the same
    arguments resumes an interrupted run; on a complete store it does nothing.
    engine="ray" runs the same extraction as Ray Data batch inference: `concurrency` model
    actors (default: one per GPU, or one on CPU), on the cluster at `ray_address` or on a
    local Ray started here (see genattr.features.extract_ray); the store is the same.
    """
    if engine not in ENGINES:
        raise GenattrError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if dtype not in COMPUTE_DTYPES:
        raise GenattrError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if store_dtype not in ("fp32", "fp16", "float32", "float16"):
        raise GenattrError(f"store dtype must be fp32 or fp16, got {store_dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise GenattrError("--batch-size and --shard-size must be positive")
    if workers is not None:
        check_count(workers, "--workers", minimum=0)
    if threads is not None:
        check_count(threads, "--threads", minimum=1)
    if concurrency is not None:
        check_count(concurrency, "--concurrency", minimum=1)
    if engine == "local" and device.startswith("cuda") and not torch.cuda.is_available():
        raise GenattrError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise GenattrError(f"--device must be cpu or cuda, got {device!r}")
    if engine == "ray":
        import_ray()  # before any store is created
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    max_file_mb = DEFAULT_MAX_FILE_MB if max_file_mb is None else max_file_mb
    if not (isinstance(max_file_mb, int | float) and math.isfinite(max_file_mb)) or (
        max_file_mb <= 0
    ):
        raise GenattrError(f"--max-file-mb must be a positive number, got {max_file_mb!r}")
    out = check_output(out, "dir")
    if (augment is None) != (views == 1) or views < 1:
        raise GenattrError("--augment and --views go together: e.g. --augment mild --views 4")
    augmenter = None
    if augment is not None:
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
        "max_file_mb": max_file_mb,
        "augment": augment,
        "views": views,
        "augment_seed": augment_seed,
    }
    store = open_store(out, backbone, source, settings, store_dtype)
    t0 = time.perf_counter()
    with store.writing():
        writer = ShardWriter(store, source, settings)
        n, start = writer.total, writer.start
        if start >= n:
            state = {**writer.state, "complete": True, "listing": writer.listing}
            if state != writer.state:
                store.update_extra({"extraction": state})
            return ExtractResult(store, n, start, 0, 0, writer.failed_before, 0.0, writer.listing)
        job = EmbedJob(
            backbone=backbone,
            decoder=ItemDecoder(
                source,
                backbone.preprocess,
                max_pixels,
                reference_shape(backbone.preprocess),
                augmenter,
                max_bytes=int(max_file_mb * 2**20),
            ),
            start=start,
            batch_size=int(batch_size),
            device=device,
            dtype=dtype,
            channels_last=has_conv(backbone.model) if channels_last is None else channels_last,
            workers=workers,
            threads=threads,
        )
        with progress_bar("extract", n, done=start, enabled=progress) as advance:
            if engine == "local":
                _embed_local(job, writer, advance)
            else:
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
        writer.listing,
    )
