"""Runner pods that lost the lease, deleted once each.

A decision that replaces a runner deletes its pod in the background: the lease already
fences the old runner, and the replacement should not wait for its predecessor's deletion.
At most `BACKGROUND_DELETIONS` run at once; the others wait their turn before their request
is built, since a burst of reassignments would otherwise queue its own lease writes behind
its deletions for a connection (aiohttp serves waiters in order). The stale-pod sweep, run
before each decision about a Task, deletes what is left: a pod whose deletion failed, or
one that lost its lease while another operator led.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tasklease.api.models import Task
from tasklease.lease.core import Clock, when_to_stop_pod
from tasklease.operator.cache import TaskEntry

logger = logging.getLogger(__name__)

BACKGROUND_DELETIONS = 4


class PodDeletions:
    def __init__(self, delete_pod: Callable[[str, str], Awaitable[bool]]) -> None:
        self._delete_pod = delete_pod
        self._background: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(BACKGROUND_DELETIONS)

    def in_background(self, entry: TaskEntry, namespace: str, name: str) -> None:
        """Delete a runner pod off the critical path, in its turn (a failed deletion is
        retried by the sweep)."""
        task = asyncio.get_running_loop().create_task(
            self._in_turn(self._delete(entry, namespace, name))
        )
        self._background.add(task)
        task.add_done_callback(self._background_done)

    async def delete_stale(self, entry: TaskEntry, task: Task, clock: Clock) -> float | None:
        """Delete runner pods that lost the lease; return when to look again (monotonic)."""
        next_check: float | None = None
        for pod in entry.pods:
            if pod.gone:
                if pod.epoch < task.lease.epoch:
                    entry.forget_pod(pod.name)  # nothing more to learn from it
                continue
            if entry.is_deleting(pod.name):
                continue
            when = when_to_stop_pod(task, pod)
            if when is None:
                continue
            if when > clock.wall:
                at = clock.monotonic_at(when)
                next_check = at if next_check is None else min(next_check, at)
                continue
            logger.info("deleting stale runner pod %s/%s", task.namespace, pod.name)
            await self._delete(entry, task.namespace, pod.name)
        return next_check

    async def stop(self) -> None:
        """Cancel the deletions not done yet: a replica that lost its leadership must not
        write after its successor has begun (whose sweep deletes what is left)."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _delete(self, entry: TaskEntry, namespace: str, name: str) -> Coroutine[Any, Any, None]:
        """Delete a runner pod once. The name is marked now, before the deletion is awaited
        (often in the background), because the next reconcile's sweep runs before a
        background deletion has started, and would delete the pod a second time (and wait
        for it). Pod events of its going skip a marked name too. A deletion that fails is
        unmarked, so that the sweep tries again."""
        entry.mark_deleting(name)
        return self._delete_marked(entry, namespace, name)

    async def _delete_marked(self, entry: TaskEntry, namespace: str, name: str) -> None:
        try:
            await self._delete_pod(namespace, name)
        except BaseException:
            entry.unmark_deleting(name)
            raise

    async def _in_turn(self, deletion: Coroutine[Any, Any, None]) -> None:
        try:
            async with self._slots:
                await deletion
        finally:
            # Stopped while it waited its turn: never started, and closed so that it is not
            # reported as a coroutine never awaited.
            deletion.close()

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background write failed: %s", task.exception())
