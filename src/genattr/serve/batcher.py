"""Requests that arrive together are answered together, off the event loop.

One worker task takes the first waiting item, gathers whatever else arrives within a few
milliseconds (up to a batch size), and runs the batch function in a thread, so the model sees
one batch instead of many single images and the event loop keeps serving (health checks,
thumbnails, the page) while the CPU works. One batch runs at a time: the model is not
re-entrant-safe in general and a second concurrent batch would only fight for the same cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """More requests waiting than the service accepts: the client should retry later."""


class MicroBatcher(Generic[T, R]):
    """`await submit(item)` -> the result of `fn` for that item, computed in a batch.

    `fn(items)` returns one entry per item, in order: a result, or an exception for that item
    alone (a bad image must not fail the others in its batch)."""

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R | Exception]],
        max_batch: int = 16,
        max_wait: float = 0.005,
        max_queue: int = 256,
    ) -> None:
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] = asyncio.Queue(max_queue)
        self._worker: asyncio.Task | None = None
        self.batches = 0  # served so far, with `items`: the mean batch size shows batching works
        self.items = 0

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def submit(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} requests already waiting") from None
        return await future

    async def _gather(self) -> list[tuple[T, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.done()]  # skip cancelled clients

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except Exception as e:  # the batch function failed as a whole: fail its requests
                results = [e] * len(batch)
            self.batches += 1
            self.items += len(batch)
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
