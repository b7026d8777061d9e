"""Memory for decoding uploads, shared by every request: a byte budget, and giving it back.

A small upload can be a huge image (a constant 16-bit PNG of 89 M pixels is 180 KB), so the
service cannot bound memory by counting requests or upload bytes. Each upload reserves what
its decoding will hold at its peak (`genattr.data.images.decoded_bytes`, from the header)
before any pixel is decoded, keeps the bytes of its working-size image while it waits for its
batch, and gives everything back when it is answered. Requests that do not fit wait.

Small requests (a tenth of the budget's small share or less; any ordinary image) are not held
up by huge ones: large reservations are taken first come, first served, from the budget less
a share kept for small ones; small ones may use the whole budget while no large one waits,
and only their share while one does, so neither kind starves the other. A request larger
than the budget for large ones is granted that whole budget, alone.

glibc keeps freed memory in its arenas, and threads decoding large images leave it
fragmented: `trim_heap` (`malloc_trim`) hands free pages back to the system, after a large
decode and whenever the budget falls idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from genattr.alloc import glibc_function


class Busy(Exception):
    """Too many requests waiting for memory: the client should retry later."""


@dataclass
class _Waiter:
    n: int
    large: bool
    future: asyncio.Future = field(repr=False)


class Hold:
    """Bytes granted to one request; `shrink_to` gives part back, `release` the rest."""

    def __init__(self, budget: ByteBudget, n: int, large: bool) -> None:
        self.budget, self.n, self.large = budget, n, large

    def shrink_to(self, n: int) -> None:
        if n < self.n:
            self.budget._give_back(self.n - n, self.large)
            self.n = n

    def release(self) -> None:
        self.shrink_to(0)


class ByteBudget:
    """At most `total` bytes granted at once (see the module's docstring); at most
    `max_waiting` requests wait, more are refused with `Busy`. Event-loop only (not
    thread-safe): acquire and release from coroutines."""

    def __init__(self, total: int, small_share: int | None = None, max_waiting: int = 256) -> None:
        if total < 1:
            raise ValueError(f"a byte budget must be positive, got {total}")
        self.total = total
        self.small_share = min(total, small_share if small_share is not None else total // 8)
        self.small = max(1, self.small_share // 2)  # a request up to this is small
        self.large_total = max(1, total - self.small_share)
        self.max_waiting = max_waiting
        self.used = self.used_large = self.used_small = 0
        self.peak = 0  # most bytes granted at once since start
        self.granted = 0  # requests granted, and of those, how many had to wait
        self.waited = 0
        self._waiting: deque[_Waiter] = deque()
        self.on_idle: list = []  # callables run when nothing is granted any more

    def cost(self, n: int) -> tuple[int, bool]:
        """What a request of `n` bytes is charged, and whether it is large."""
        n = max(0, int(n))
        if n <= self.small:
            return n, False
        return min(n, self.large_total), True

    def _fits(self, n: int, large: bool) -> bool:
        if self.used + n > self.total:
            return False
        if large:
            return self.used_large + n <= self.large_total
        large_waiting = any(w.large for w in self._waiting)
        return not large_waiting or self.used_small + n <= self.small_share

    def _grant(self, n: int, large: bool) -> None:
        self.used += n
        if large:
            self.used_large += n
        else:
            self.used_small += n
        self.peak = max(self.peak, self.used)
        self.granted += 1

    def _first(self, large: bool) -> _Waiter | None:
        return next((w for w in self._waiting if w.large == large and not w.future.done()), None)

    def _wake(self) -> None:
        """Grant waiters in order within their kind, as long as they fit."""
        progress = True
        while progress:
            progress = False
            for large in (True, False):
                w = self._first(large)
                if w is not None and self._fits(w.n, w.large):
                    self._waiting.remove(w)
                    self._grant(w.n, w.large)
                    w.future.set_result(None)
                    progress = True
        self._waiting = deque(w for w in self._waiting if not w.future.done())

    def _give_back(self, n: int, large: bool) -> None:
        self.used -= n
        if large:
            self.used_large -= n
        else:
            self.used_small -= n
        self._wake()
        if self.used == 0:
            for fn in self.on_idle:
                fn()

    async def acquire(self, n: int) -> Hold:
        """Wait until `n` bytes (as charged by `cost`) can be granted; `Busy` when too many
        requests wait already."""
        n, large = self.cost(n)
        if self._first(large) is None and self._fits(n, large):
            self._grant(n, large)
            return Hold(self, n, large)
        if len(self._waiting) >= self.max_waiting:
            raise Busy(f"{len(self._waiting)} requests already waiting for memory")
        waiter = _Waiter(n, large, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._give_back(n, large)  # granted just as the request was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)
                self._wake()  # a large waiter gone can let small ones use the whole budget
            raise
        self.waited += 1
        return Hold(self, n, large)

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[Hold]:
        """`acquire(n)`, released on leaving the block."""
        held = await self.acquire(n)
        try:
            yield held
        finally:
            held.release()

    def stats(self) -> dict[str, int]:
        return {
            "total": self.total,
            "used": self.used,
            "peak": self.peak,
            "waiting": len(self._waiting),
            "granted": self.granted,
            "waited": self.waited,
        }


_MALLOC_TRIM = glibc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc `malloc_trim(0)`); False where
    there is no such call. Thread-safe; takes milliseconds."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
