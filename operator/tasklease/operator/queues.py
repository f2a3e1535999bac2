"""A work queue and a deadline queue for the reconciler, in the shape of client-go's.

Why not one kopf timer per Task: kopf runs an asyncio task per timer per object (about
18 KiB each, and they stall the loop when they fire together), and a timer only looks at
its object every `interval`, so a lease would expire up to one interval late. One heap of
deadlines costs a few dozen bytes per Task and wakes exactly when the earliest deadline is
due (client-go's delaying queue does the same; docs/decisions/one-deadline-queue.md).

The work queue guarantees that a key is processed by one worker at a time and that a key
marked dirty while being processed is processed again afterwards, so no observation is lost
and no two workers ever write the same Task concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys to process, each by one worker at a time, in two lanes.

    Urgent keys (a deadline came: a lease to take back, a read ahead of one) are taken
    before all others, so that a burst of events (a bulk create, the writes and pod events
    of a burst of reassignments) cannot hold up the reassignments themselves: with one lane,
    the benchmark's 80 simultaneous expiries waited behind up to 77 keys of their own
    aftermath.
    """

    def __init__(self) -> None:
        self._urgent: deque[K] = deque()
        self._normal: deque[K] = deque()
        self._entries = asyncio.Semaphore(0)  # lane entries, duplicates included
        self._dirty: set[K] = set()
        self._urgent_keys: set[K] = set()  # dirty keys that are urgent
        self._processing: set[K] = set()
        self._waiting = 0  # dirty keys not being processed

    def __len__(self) -> int:
        """Keys waiting for a worker."""
        return self._waiting

    def add(self, key: K, *, urgent: bool = False) -> None:
        """Mark `key` for processing; cheap and idempotent, callable from any coroutine."""
        if key in self._dirty:
            if urgent and key not in self._urgent_keys:
                self._urgent_keys.add(key)
                if key not in self._processing:
                    # Waiting in the normal lane: ahead of it in the urgent one too (the
                    # normal entry is skipped when it comes up).
                    self._enter(key)
            return
        self._dirty.add(key)
        if urgent:
            self._urgent_keys.add(key)
        if key not in self._processing:  # else `done` requeues it
            self._waiting += 1
            self._enter(key)

    def _enter(self, key: K) -> None:
        (self._urgent if key in self._urgent_keys else self._normal).append(key)
        self._entries.release()

    async def get(self) -> K:
        while True:
            await self._entries.acquire()
            key = self._urgent.popleft() if self._urgent else self._normal.popleft()
            if key in self._dirty and key not in self._processing:
                break
            # A second entry of a key already taken (it was made urgent while waiting).
        self._waiting -= 1
        self._processing.add(key)
        self._dirty.discard(key)
        self._urgent_keys.discard(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._waiting += 1
            self._enter(key)


class DeadlineQueue(Generic[K]):
    """Calls `on_due(key)` when a key's deadline (monotonic seconds) is reached.

    Each key has at most one live deadline; scheduling it again replaces the previous one.
    Most reschedules move a deadline later (every heartbeat moves its lease's deadline), and
    those cost no heap entry: the key's earlier entry stays, and when it surfaces the key
    goes back into the heap at its current deadline. So the heap holds about one entry per
    key, however often the deadlines move, instead of one per heartbeat until they surface.
    """

    def __init__(
        self, on_due: Callable[[K], None], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._on_due = on_due
        self._clock = clock
        self._heap: list[tuple[float, int, K]] = []
        self._deadline: dict[K, float] = {}
        # The earliest heap entry of each key that has one: entries of the key at other
        # times were superseded by an earlier deadline and are dropped when they surface.
        self._entry_at: dict[K, float] = {}
        self._sequence = 0
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._deadline)

    @property
    def heap_size(self) -> int:
        """Entries in the heap, superseded ones included (for tests and memory figures)."""
        return len(self._heap)

    def schedule(self, key: K, at: float | None) -> None:
        """Set (or with None, clear) the deadline of `key`."""
        if at is None:
            self._deadline.pop(key, None)  # its entry is dropped when it surfaces
            return
        self._deadline[key] = at
        entry_at = self._entry_at.get(key)
        if entry_at is not None and entry_at <= at:
            return  # an entry surfaces by then and puts the key back at `at`
        self._push(key, at)

    def _push(self, key: K, at: float) -> None:
        self._entry_at[key] = at
        self._sequence += 1
        heapq.heappush(self._heap, (at, self._sequence, key))
        if self._heap[0][2] == key and self._heap[0][0] == at:
            self._changed.set()  # a new earliest deadline: re-arm the sleep

    def _surface(self) -> tuple[float, K] | None:
        """Pop superseded entries, and entries of keys whose deadline moved later (they go
        back in at their deadline), until the top entry is a key's deadline; that one."""
        while self._heap:
            at, _, key = self._heap[0]
            if self._entry_at.get(key) != at:
                heapq.heappop(self._heap)  # superseded by an earlier entry of the key
                continue
            deadline = self._deadline.get(key)
            if deadline == at:
                return at, key
            heapq.heappop(self._heap)
            del self._entry_at[key]
            if deadline is not None:
                self._push(key, deadline)
        return None

    def next_deadline(self) -> float | None:
        top = self._surface()
        return None if top is None else top[0]

    def fire_due(self) -> int:
        """Hand every due key to `on_due`; returns how many fired."""
        now = self._clock()
        fired = 0
        while (top := self._surface()) is not None and top[0] <= now:
            _, key = top
            heapq.heappop(self._heap)
            del self._entry_at[key]
            del self._deadline[key]
            self._on_due(key)
            fired += 1
        return fired

    async def run(self) -> None:
        """Sleep until the earliest deadline, fire, repeat; forever."""
        while True:
            self.fire_due()
            upcoming = self.next_deadline()
            self._changed.clear()
            timeout = None if upcoming is None else max(upcoming - self._clock(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=timeout)
