"""Waiting for something outside the test (an API server, a process) to come about."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.1
) -> T:
    """Poll until `probe` returns something truthy, and return it; fail naming `what` and the
    last value seen."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


async def run_until(what: str, probe: Callable[[], object], *, turns: int = 1000) -> None:
    """Give the event loop turns until `probe` holds: for tests whose every coroutine is in
    this process, where waiting on a clock would only slow them down; fail naming `what`."""
    for _ in range(turns):
        if probe():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not so after {turns} turns of the event loop: {what}")
