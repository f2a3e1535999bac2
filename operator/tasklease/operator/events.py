"""The operator's Events: posted for free, sent by a few senders from a bounded queue.

Events are best effort: what the operator must never lose is on the Task (its lease, its
status, its conditions), and client-go's event recorder drops Events too (its broadcaster
queues 1,000 and drops what comes beyond). What an Event must never do is cost a hand-out or a
reassignment anything, or hold memory without bound.

A posted Event is a few strings in a queue of at most `DEFAULT_CAPACITY`, and
`DEFAULT_SENDERS` coroutines send them, each on a connection of its own (the client's pool
is sized for them beside the workers): a burst of Events never holds a burst of built
requests, nor makes the lease writes wait for a connection
(docs/decisions/bounded-event-queue.md).

When the queue is full, a Warning (an attempt that failed, a lease that expired) displaces
the oldest Normal Event; anything else is dropped, counted, and logged at most once a minute.
Senders take Warnings first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tasklease.kube.refs import ObjectRef

logger = logging.getLogger(__name__)

WARNING = "Warning"
# As client-go's broadcaster (maxQueuedEvents): an Event is a few hundred bytes here.
DEFAULT_CAPACITY = 1000
# Enough to keep up with the default event budget (TASKLEASE_API_QPS) at a few tens of
# milliseconds per request; each holds a connection only while it sends.
DEFAULT_SENDERS = 4
_DROP_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class PendingEvent:
    about: ObjectRef
    type: str  # "Normal" or "Warning"
    reason: str
    message: str


class EventQueue:
    """Events waiting to be sent by `send`; `post` never waits."""

    def __init__(
        self,
        send: Callable[[PendingEvent], Awaitable[None]],
        *,
        senders: int = DEFAULT_SENDERS,
        capacity: int = DEFAULT_CAPACITY,
        on_dropped: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if senders < 1 or capacity < 1:
            raise ValueError("an event queue needs a sender and room for an Event")
        self._send = send
        self._senders = senders
        self._capacity = capacity
        self._on_dropped = on_dropped
        self._clock = clock
        self._warnings: deque[PendingEvent] = deque()
        self._normal: deque[PendingEvent] = deque()
        self._ready = asyncio.Semaphore(0)  # one per queued Event
        self._tasks: list[asyncio.Task[None]] = []
        self._dropped_unlogged = 0
        self._drop_logged_at: float | None = None

    def __len__(self) -> int:
        """Events waiting for a sender."""
        return len(self._warnings) + len(self._normal)

    def post(self, event: PendingEvent) -> None:
        """Queue `event` for sending, or drop it (or the oldest Normal one) when full."""
        warning = event.type == WARNING
        if len(self) >= self._capacity:
            if not (warning and self._normal):
                self._drop(event)
                return
            # Replaces a queued Event: the count of queued Events stays the same.
            self._drop(self._normal.popleft())
            self._warnings.append(event)
            return
        (self._warnings if warning else self._normal).append(event)
        self._ready.release()

    def start(self) -> None:
        for index in range(self._senders):
            self._tasks.append(asyncio.create_task(self._sender(), name=f"events-{index}"))

    async def stop(self) -> None:
        """Stop sending; what is still queued is dropped (a replica that lost its leadership
        must not write after its successor's first write)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _sender(self) -> None:
        while True:
            await self._ready.acquire()
            event = self._warnings.popleft() if self._warnings else self._normal.popleft()
            try:
                await self._send(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # best effort: a sender must outlive any failure
                logger.warning(
                    "could not record event %s on %s: %s", event.reason, event.about.name, exc
                )

    def _drop(self, event: PendingEvent) -> None:
        if self._on_dropped is not None:
            self._on_dropped(event.type)
        self._dropped_unlogged += 1
        now = self._clock()
        if self._drop_logged_at is None or now - self._drop_logged_at >= _DROP_LOG_INTERVAL_S:
            logger.warning(
                "dropped %d Event(s) (%s %s on %s the last): %d wait to be sent, and the API "
                "server is not taking them as fast as they come",
                self._dropped_unlogged,
                event.type,
                event.reason,
                event.about.name,
                len(self),
            )
            self._dropped_unlogged = 0
            self._drop_logged_at = now
