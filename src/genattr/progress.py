"""One progress bar for long work (extraction, index builds): done/total, rate and ETA."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def progress_bar(
    label: str, total: int, *, done: int = 0, unit: str = "img", enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(k)`; the rate counts this run's items only, so a resumed job's ETA holds."""
    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[rate]}} {unit}/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    task = bar.add_task(label, total=total, completed=done, rate="   -")
    t0, run = time.perf_counter(), 0

    def advance(k: int) -> None:
        nonlocal run
        run += k
        rate = run / max(1e-9, time.perf_counter() - t0)
        bar.update(task, advance=k, rate=f"{rate:7.1f}")

    with bar:
        yield advance
