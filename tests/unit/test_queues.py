"""The reconciler's work queue and deadline queue, on fake time."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tasklease.operator.queues import DeadlineQueue, WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def deadline_queue() -> tuple[DeadlineQueue[str], FakeClock, list[tuple[float, str]]]:
    clock = FakeClock()
    fired: list[tuple[float, str]] = []
    queue: DeadlineQueue[str] = DeadlineQueue(
        lambda key: fired.append((clock.now, key)), clock=clock
    )
    return queue, clock, fired


def advance_to(queue: DeadlineQueue[str], clock: FakeClock, until: float) -> None:
    """Step the clock from deadline to deadline, firing each at its own time."""
    while (upcoming := queue.next_deadline()) is not None and upcoming <= until:
        clock.now = upcoming
        queue.fire_due()
    clock.now = until
    queue.fire_due()


def test_keys_fire_at_their_deadlines_in_order() -> None:
    queue, clock, fired = deadline_queue()
    queue.schedule("a", 10.0)
    queue.schedule("b", 5.0)
    clock.now = 4.999
    assert queue.fire_due() == 0
    advance_to(queue, clock, 20.0)
    assert fired == [(5.0, "b"), (10.0, "a")]
    assert len(queue) == 0
    assert queue.next_deadline() is None


def test_a_deadline_moved_later_often_keeps_one_heap_entry_and_fires_once_at_the_last() -> None:
    queue, clock, fired = deadline_queue()
    for heartbeat in range(1000):
        clock.now = heartbeat * 0.01
        queue.schedule("lease", clock.now + 60.0)
    assert queue.heap_size == 1
    advance_to(queue, clock, 200.0)
    assert [key for _, key in fired] == ["lease"]
    assert fired[0][0] == pytest.approx(9.99 + 60.0)
    assert queue.heap_size == 0


def test_a_deadline_moved_earlier_fires_early_and_only_once() -> None:
    queue, clock, fired = deadline_queue()
    queue.schedule("a", 50.0)
    queue.schedule("a", 20.0)
    assert queue.next_deadline() == 20.0
    advance_to(queue, clock, 100.0)
    assert fired == [(20.0, "a")]


def test_a_cleared_deadline_never_fires_and_can_be_set_again() -> None:
    queue, clock, fired = deadline_queue()
    queue.schedule("a", 10.0)
    queue.schedule("a", None)
    assert len(queue) == 0
    advance_to(queue, clock, 15.0)
    assert fired == []
    queue.schedule("a", 30.0)
    advance_to(queue, clock, 40.0)
    assert fired == [(30.0, "a")]


def test_next_deadline_skips_entries_of_deadlines_that_moved() -> None:
    queue, _, _ = deadline_queue()
    queue.schedule("a", 10.0)
    queue.schedule("b", 15.0)
    queue.schedule("a", 25.0)
    assert queue.next_deadline() == 15.0


@pytest.mark.parametrize("seed", range(40))
def test_fires_exactly_what_a_plain_dict_of_deadlines_would(seed: int) -> None:
    """Random schedules, clears and clock steps against the obvious (slow) model."""
    rng = random.Random(seed)
    queue, clock, fired = deadline_queue()
    model: dict[str, float] = {}
    expected: list[tuple[float, str]] = []
    keys = [f"k{i}" for i in range(8)]
    for _ in range(300):
        roll = rng.random()
        key = rng.choice(keys)
        if roll < 0.55:
            at = clock.now + rng.choice([0.0, 0.5, 1.0, 2.0, 5.0, rng.uniform(0, 10)])
            queue.schedule(key, at)
            model[key] = at
        elif roll < 0.65:
            queue.schedule(key, None)
            model.pop(key, None)
        else:
            until = clock.now + rng.uniform(0, 3)
            # The model: every deadline up to `until`, in time order, each at its own time.
            for k, at in sorted(model.items(), key=lambda item: (item[1], item[0])):
                if at <= until:
                    expected.append((max(at, clock.now), k))
                    del model[k]
            advance_to(queue, clock, until)
        assert len(queue) == len(model)
    assert sorted(fired) == sorted(expected)
    assert queue.heap_size <= 2 * len(keys)


def test_run_wakes_for_a_deadline_set_while_it_sleeps() -> None:
    async def scenario() -> list[str]:
        fired: list[str] = []
        done = asyncio.Event()

        def on_due(key: str) -> None:
            fired.append(key)
            done.set()

        queue: DeadlineQueue[str] = DeadlineQueue(on_due)
        runner = asyncio.create_task(queue.run())
        await asyncio.sleep(0)  # asleep with nothing scheduled
        queue.schedule("a", time.monotonic())
        await asyncio.wait_for(done.wait(), timeout=10)
        runner.cancel()
        return fired

    assert asyncio.run(scenario()) == ["a"]


# --- WorkQueue ------------------------------------------------------------------------------


def test_a_key_added_twice_is_processed_once() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        queue.add("a")
        assert len(queue) == 1
        assert await queue.get() == "a"
        queue.done("a")
        assert len(queue) == 0

    asyncio.run(scenario())


def test_a_key_dirtied_while_processed_comes_back_after_done_and_not_before() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        key = await queue.get()
        queue.add("a")  # a new event while a worker holds the key
        assert len(queue) == 0  # no second worker may take it meanwhile
        queue.done(key)
        assert len(queue) == 1
        assert await queue.get() == "a"

    asyncio.run(scenario())


async def drain(queue: WorkQueue[str]) -> list[str]:
    """Take and finish every waiting key; the order they were taken in."""
    taken = []
    while len(queue):
        key = await queue.get()
        taken.append(key)
        queue.done(key)
    return taken


def test_urgent_keys_are_taken_before_keys_that_came_earlier() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        for key in ("a", "b", "c"):
            queue.add(key)
        queue.add("deadline", urgent=True)
        return await drain(queue)

    assert asyncio.run(scenario()) == ["deadline", "a", "b", "c"]


def test_a_waiting_key_made_urgent_jumps_the_queue_and_is_taken_once() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        for key in ("a", "b", "c"):
            queue.add(key)
        queue.add("c", urgent=True)
        assert len(queue) == 3
        taken = await drain(queue)
        # The urgent lane's stale twin of "c" is skipped, not handed out a second time.
        queue.add("d")
        taken.append(await asyncio.wait_for(queue.get(), timeout=5))
        return taken

    assert asyncio.run(scenario()) == ["c", "a", "b", "d"]


def test_a_key_made_urgent_while_processed_comes_back_urgent() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        key = await queue.get()
        queue.add("b")
        queue.add("a", urgent=True)  # its deadline came while a worker held it
        queue.done(key)
        return [await queue.get(), await queue.get()]

    assert asyncio.run(scenario()) == ["a", "b"]
