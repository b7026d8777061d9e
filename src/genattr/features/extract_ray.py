"""`genattr extract --engine ray`: extraction as Ray Data batch inference.

The pipeline is the canonical one: a range of source item numbers, decoded and preprocessed by
Ray tasks (one CPU each, on any node), then embedded by a pool of actors that each hold the
model: one GPU each where there are GPUs (default: one actor per GPU), else `threads` CPUs
(default 1, and as many actors as leave one CPU to decoding).

Results come back to this process in source order and go through the same `ShardWriter` as
the local engine, so the store (shards, ids, metadata, failures, resume cursor) is the one the
local engine writes; only this process touches the store, so a killed run resumes the same
way. Vectors equal the local engine's to float tolerance: the
model sees different batch compositions (Ray's batches do not stop at shard boundaries).

Workers read images by path, so on a cluster the images (and the store, for this process)
must be on storage every node sees. Without an address, a local Ray is started with a small
object store and stopped again at the end: on one machine it needs no set-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from genattr.errors import GenattrError
from genattr.features.decode import ItemDecoder
from genattr.features.embedder import EmbedJob, embed_arrays
from genattr.features.writer import ShardWriter

LOCAL_OBJECT_STORE_BYTES = 1 << 30  # decoded batches in flight, not the gallery: 1 GiB is plenty


def import_ray():
    """Ray and Ray Data, or a GenattrError saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise GenattrError(
            "--engine ray needs Ray Data: pip install 'genattr[ray]' (or run without --engine ray)"
        ) from None
    return ray


def _decode_batch(batch: dict[str, np.ndarray], decoder: ItemDecoder, start: int) -> dict:
    """Ray task: decode and preprocess items; failed ones keep zero pixels and a reason."""
    decoded = [decoder(start + int(k)) for k in batch["id"]]
    pixels = np.zeros((len(decoded), *decoder.shape), np.float32)
    for row, (_, arr, _) in enumerate(decoded):
        if arr is not None:
            pixels[row] = arr
    return {
        "item": np.array([i for i, _, _ in decoded], np.int64),
        "ok": np.array([arr is not None for _, arr, _ in decoded]),
        "reason": np.array([reason or "" for _, _, reason in decoded], dtype=object),
        "pixels": pixels,
    }


class _Embedder:
    """Ray actor: loads the model once onto its device, then embeds the decoded items."""

    def __init__(self, backbone: Any, device: str, dtype: str, channels_last: bool, threads: int):
        torch.set_num_threads(threads)
        # Ray makes an actor's GPU cuda:0 (CUDA_VISIBLE_DEVICES), whatever the driver asked for.
        self.device = "cuda" if device.startswith("cuda") else device
        backbone.model = backbone.model.eval().to(self.device)
        if channels_last:
            backbone.model = backbone.model.to(memory_format=torch.channels_last)
        self.backbone, self.dtype, self.channels_last = backbone, dtype, channels_last

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        vectors = np.zeros((len(ok), self.backbone.dim), np.float32)
        if ok.any():
            vectors[ok] = embed_arrays(
                self.backbone, batch["pixels"][ok], self.device, self.dtype, self.channels_last
            )
        return {"item": batch["item"], "ok": ok, "reason": batch["reason"], "vector": vectors}


def _actor_memory(backbone: Any, batch_size: int, shape: tuple[int, ...]) -> int:
    """Bytes a model actor needs: weights, a batch of pixels, and 256 MiB for the runtime."""
    weights = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    return weights + 4 * batch_size * int(np.prod(shape)) + (256 << 20)


def embed_with_ray(
    job: EmbedJob,
    writer: ShardWriter,
    advance: Callable[[int], None],
    *,
    concurrency: int | None = None,
    address: str | None = None,
) -> None:
    """Embed items job.start.. on Ray and hand them to `writer` in source order."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started and address is None:
        ray.init(
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level="WARNING",
        )
    elif started:
        ray.init(address=address, logging_level="WARNING")
    gpu = job.device.startswith("cuda")
    try:
        threads = job.threads or 1
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 0))
        if concurrency is None:
            # Ray Data stalls for good if the actors hold every CPU: reading needs one.
            free = resources.get("GPU", 0) if gpu else cpus - 1
            concurrency = max(1, int(free) // (1 if gpu else threads))
        if concurrency < 1:
            raise GenattrError("--concurrency must be at least 1")
        if gpu and concurrency > resources.get("GPU", 0):
            raise GenattrError(
                f"{concurrency} actor(s) with a GPU each, but the Ray cluster has "
                f"{int(resources.get('GPU', 0))} GPU(s); lower --concurrency or use --device cpu"
            )
        if not gpu and concurrency * threads >= cpus:
            raise GenattrError(
                f"{concurrency} actor(s) x {threads} thread(s) would hold all {cpus} CPUs of the "
                "Ray cluster and leave none to read and decode images; lower --concurrency "
                "or --threads"
            )
        _run(ray, job, writer, advance, concurrency, threads, gpu)
    finally:
        if started:
            ray.shutdown()


def _run(ray, job, writer, advance, concurrency: int, threads: int, gpu: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # the writer needs source order
    ctx.enable_progress_bars = False  # genattr draws its own bar
    data_log = logging.getLogger("ray.data")
    saved_level = data_log.level
    data_log.setLevel(logging.ERROR)  # Ray Data's per-run INFO lines would break the bar
    try:
        total = writer.total
        ds = ray.data.range(total - job.start).map_batches(
            _decode_batch,
            fn_kwargs={"decoder": job.decoder, "start": job.start},
            batch_size=job.batch_size,
            batch_format="numpy",
            # None: as many decode tasks as there are free CPUs
            compute=ray.data.TaskPoolStrategy(size=job.workers) if job.workers else None,
        )
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_kwargs={
                "backbone": job.backbone,
                "device": job.device,
                "dtype": job.dtype,
                "channels_last": job.channels_last,
                "threads": threads,
            },
            batch_size=job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=threads if not gpu else 1,
            num_gpus=1 if gpu else 0,
            # What an actor holds (the weights, plus room for activations) tells Ray how many
            # fit a node; it also keeps Ray from fusing decoding into the actors (it fuses
            # stages of equal resources), so decoding overlaps the forward pass.
            memory=_actor_memory(job.backbone, job.batch_size, job.decoder.shape),
        )
        expected = job.start
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            items, ok = out["item"], out["ok"].astype(bool)
            if len(items) == 0:
                continue
            if not np.array_equal(items, np.arange(expected, expected + len(items))):
                raise GenattrError(
                    f"Ray returned items {items[0]}.. where item {expected} was due; the store "
                    "keeps what was committed, run again to resume"
                )
            expected += len(items)
            for i, reason in zip(items[~ok], out["reason"][~ok], strict=True):
                writer.fail(int(i), str(reason))
            writer.add(items[ok].tolist(), out["vector"][ok])
            advance(len(items))
        if expected != total:
            raise GenattrError(f"Ray returned {expected - job.start} of {total - job.start} items")
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        data_log.setLevel(saved_level)
