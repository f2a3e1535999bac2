"""The reconciler's writes off the critical path (replaced pods' deletions, Events) hold a
bounded number of requests at once, however large the burst that brings them: beyond that
they wait before their request is built, and never take a connection a lease write needs.
The writer here only counts and holds calls: what is tested is the reconciler's own
concurrency, not the API server's answers (those are tests/integration's)."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

from tasklease.lease.core import Decision, DeletePod, RecordEvent
from tasklease.operator.cache import TaskEntry
from tasklease.operator.events import DEFAULT_SENDERS
from tasklease.operator.pod_deletions import BACKGROUND_DELETIONS
from tasklease.operator.reconciler import Reconciler, connections_needed
from tests.unit.builders import make_task
from tests.waiting import run_until


class HoldingWriter:
    """Holds every delete and Event until `gate` opens; counts the most held at once."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.held = 0
        self.most_held = 0
        self.deleted: list[str] = []
        self.events: list[str] = []

    async def _hold(self) -> None:
        self.held += 1
        self.most_held = max(self.most_held, self.held)
        try:
            await self.gate.wait()
        finally:
            self.held -= 1

    async def delete_pod(self, namespace: str, name: str) -> bool:
        await self._hold()
        self.deleted.append(name)
        return True

    async def record_event(self, task: Any, *, type_: str, reason: str, message: str) -> None:
        await self._hold()
        self.events.append(reason)

    def congested(self) -> bool:
        return False


def test_a_burst_of_reassignments_holds_a_bounded_number_of_requests() -> None:
    async def scenario() -> None:
        writer = HoldingWriter()
        reconciler = Reconciler(writer, workers=2)  # type: ignore[arg-type]
        reconciler.start()
        try:
            task = make_task()
            for index in range(50):
                entry = TaskEntry(key=("ns", f"t{index}"))
                decision = Decision(
                    actions=(
                        DeletePod(f"t{index}-1"),
                        RecordEvent("Warning", "Expired", f"t{index} expired"),
                    )
                )
                await reconciler._execute(entry, task, decision)
            await run_until(
                "deletions and Events held",
                lambda: writer.held >= BACKGROUND_DELETIONS + DEFAULT_SENDERS,
            )
            await asyncio.sleep(0.01)
            # 50 deletions and 50 Events came; only the bounded few are requests now.
            assert writer.most_held == BACKGROUND_DELETIONS + DEFAULT_SENDERS
            writer.gate.set()
            await run_until(
                "all sent", lambda: len(writer.deleted) == 50 and len(writer.events) == 50
            )
            assert sorted(writer.deleted) == sorted(f"t{index}-1" for index in range(50))
        finally:
            writer.gate.set()
            await reconciler.stop()

    asyncio.run(scenario())


def test_the_connection_pool_covers_every_request_made_at_once() -> None:
    assert connections_needed(workers=16) == 16 + DEFAULT_SENDERS + BACKGROUND_DELETIONS


def test_deletions_still_waiting_their_turn_are_dropped_quietly_on_stop() -> None:
    async def scenario() -> None:
        writer = HoldingWriter()
        reconciler = Reconciler(writer, workers=1)  # type: ignore[arg-type]
        reconciler.start()
        task = make_task()
        for index in range(BACKGROUND_DELETIONS + 3):
            decision = Decision(actions=(DeletePod(f"t{index}-1"),))
            await reconciler._execute(TaskEntry(key=("ns", f"t{index}")), task, decision)
        await run_until("deletions held", lambda: writer.held == BACKGROUND_DELETIONS)
        await reconciler.stop()  # a replica that lost its leadership writes nothing more
        writer.gate.set()
        await asyncio.sleep(0)
        assert writer.deleted == []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(scenario())
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
