"""Bookkeeping writes are put off only while other work waits, and never for longer than
`MAX_DEFER_S`; once nothing waits, or once overdue, they go back to the work queue."""

from __future__ import annotations

import asyncio

from tasklease.operator.cache import TaskKey
from tasklease.operator.deferral import MAX_DEFER_S, DeferredWrites
from tests.waiting import wait_for_async

KEY: TaskKey = ("jobs", "demo")
OTHER: TaskKey = ("jobs", "other")


class Scene:
    def __init__(self) -> None:
        self.now = 1000.0
        self.busy = True
        self.woken: list[TaskKey] = []
        self.deferred = DeferredWrites(
            busy=lambda: self.busy, wake=self.woken.append, monotonic=lambda: self.now
        )


def test_a_write_is_not_put_off_when_nothing_else_waits() -> None:
    scene = Scene()
    scene.busy = False
    assert not scene.deferred.put_off(KEY)


def test_a_write_is_put_off_while_busy_for_at_most_the_limit() -> None:
    scene = Scene()
    assert scene.deferred.put_off(KEY)
    scene.now += MAX_DEFER_S - 1
    assert scene.deferred.put_off(KEY)  # still counted from the first time
    scene.now += 1
    assert not scene.deferred.put_off(KEY)


def test_a_forgotten_write_starts_its_count_again() -> None:
    scene = Scene()
    assert scene.deferred.put_off(KEY)
    scene.now += MAX_DEFER_S
    scene.deferred.forget(KEY)
    assert scene.deferred.put_off(KEY)


def test_put_off_writes_are_woken_once_nothing_waits_or_once_overdue() -> None:
    async def scenario() -> None:
        scene = Scene()
        scene.deferred.put_off(KEY)
        scene.now += 1
        scene.deferred.put_off(OTHER)
        running = asyncio.create_task(scene.deferred.run())
        try:
            scene.now += MAX_DEFER_S - 1  # KEY overdue, OTHER not yet
            await wait_for_async("the overdue write woken", lambda: scene.woken, timeout=5)
            assert set(scene.woken) == {KEY}

            scene.deferred.forget(KEY)
            scene.woken.clear()
            scene.busy = False
            await wait_for_async("the other write woken", lambda: scene.woken, timeout=5)
            assert set(scene.woken) == {OTHER}
        finally:
            running.cancel()

    asyncio.run(scenario())
