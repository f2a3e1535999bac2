"""Bookkeeping writes put off while other work waits for the API or for a worker.

A decision the core marks `deferrable` writes only bookkeeping (the status that records a
hand-out: no runner waits for it, and the lease already fences): while hand-outs and
reassignments wait for the API budget or for a worker, a worker writing such a status is a
worker not handing out (docs/decisions/two-write-hand-out.md). Each put-off write goes
back to the work queue once nothing waits any more, or after `MAX_DEFER_S`: a status must
not lag for ever under load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tasklease.operator.cache import TaskKey

MAX_DEFER_S = 60.0
# How often put-off writes look for a free API budget again.
_POLL_S = 0.25


class DeferredWrites:
    """The Tasks whose bookkeeping write is put off, and since when (monotonic)."""

    def __init__(
        self,
        *,
        busy: Callable[[], bool],
        wake: Callable[[TaskKey], None],
        monotonic: Callable[[], float],
    ) -> None:
        self._busy = busy
        self._wake = wake
        self._monotonic = monotonic
        self._since: dict[TaskKey, float] = {}

    def put_off(self, key: TaskKey) -> bool:
        """Whether to put off `key`'s deferrable write now: while other work waits, for at
        most `MAX_DEFER_S` from the first time it was put off."""
        if not self._busy():
            return False
        since = self._since.setdefault(key, self._monotonic())
        return self._monotonic() - since < MAX_DEFER_S

    def forget(self, key: TaskKey) -> None:
        """`key` has no put-off write (any more)."""
        self._since.pop(key, None)

    async def run(self) -> None:
        """Wake the put-off keys once nothing waits, or each once it is overdue."""
        while True:
            await asyncio.sleep(_POLL_S)
            if not self._since:
                continue
            if self._busy():
                overdue = self._monotonic() - MAX_DEFER_S
                keys = [key for key, since in self._since.items() if since <= overdue]
            else:
                keys = list(self._since)
            for key in keys:
                self._wake(key)
