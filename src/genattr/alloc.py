"""The C allocator for batch work: keep freed memory instead of handing it back each batch.

glibc serves every allocation above its mmap threshold (128 KB, rising to at most 32 MB as
it adapts) with a fresh `mmap` and unmaps it on free, and trims the heap top whenever 128 KB
lies free there. A convolutional network's activations are such buffers: every batch then
maps them again and page-faults every page in, and on 2-core VMs half the CPU time of an
extraction went to the kernel (BENCHMARKS.md, "Extraction at the CPU's floor"). For a batch
command the working set is the same batch after batch, so `tune_for_batch_work` makes glibc
serve large blocks from the heap (`M_MMAP_MAX` 0), never trim it (`M_TRIM_THRESHOLD`) and grow
it in large steps (`M_TOP_PAD`): freed activations are reused for the next batch.

The web service does not call it: its memory must go back after a burst of large uploads
(it trims on purpose, `genattr.serve.budget.trim_heap`). Elsewhere than glibc (musl, macOS)
this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
BATCH_SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 * 2**20}

_applied: dict[str, bool] = {"batch": False}


def glibc_function(name: str, argtypes: list, restype: Any) -> Callable[..., Any] | None:
    """glibc's function `name` with its C signature, or None where the C library has none
    (musl, macOS)."""
    lib = ctypes.util.find_library("c")
    if lib is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def tune_for_batch_work() -> bool:
    """Set the allocator for batch work in this process (see the module's docstring); True
    where it took effect (glibc), False elsewhere. Idempotent; process-wide."""
    if _applied["batch"]:
        return True
    mallopt = glibc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    ok = all(mallopt(param, value) == 1 for param, value in BATCH_SETTINGS.items())
    _applied["batch"] = ok
    if not ok:
        logger.debug("mallopt refused the batch settings; the allocator is unchanged")
    return ok
