"""Hand memory the operator freed back to the system.

Bursts (a bulk create, the initial listing after a restart, a mass expiry) decode thousands
of Task bodies at once and free them moments later. glibc keeps freed chunks in its heap
for reuse, so without a trim the process's RSS stays at the burst's high-water mark for good: in
the scale benchmark RSS per Task was four to five times the live Python heap
(docs/results/2026-11-29-memory.md). `malloc_trim(0)` returns free pages from the middle of the
heap too. It does not touch CPython's own small-object arenas, which are released when empty.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

TRIM_INTERVAL_S = 30.0


def malloc_trim() -> Callable[[], bool] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


async def trim_periodically(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Trim every `interval_s`; a few milliseconds each, off the event loop's hot path."""
    trim = malloc_trim()
    if trim is None:
        logger.info("no malloc_trim in this C library; freed memory stays with the allocator")
        return
    while True:
        await asyncio.sleep(interval_s)
        trim()
