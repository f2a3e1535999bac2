"""The operator's bounded Event queue (tasklease.operator.events): memory and connections
stay bounded however many Events a burst posts, and Warnings go first."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tasklease.kube.refs import ObjectRef
from tasklease.operator.events import EventQueue, PendingEvent
from tasklease.operator.metrics import OperatorMetrics
from tests.waiting import run_until


def _event(name: str, type_: str = "Normal", reason: str = "Acknowledged") -> PendingEvent:
    return PendingEvent(ObjectRef("ns", name), type_, reason, f"{reason} {name}")


class _Sink:
    """Records what is sent; holds every send until `gate` opens."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate = asyncio.Event()

    async def send(self, event: PendingEvent) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            self.sent.append(event.about.name)
        finally:
            self.in_flight -= 1


async def _drain(queue: EventQueue, sink: _Sink, expected: int) -> None:
    sink.gate.set()
    await run_until(
        f"{expected} Events sent", lambda: len(sink.sent) >= expected and len(queue) == 0
    )


def test_a_burst_beyond_capacity_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        sink = _Sink()
        dropped: list[str] = []
        queue = EventQueue(sink.send, senders=2, capacity=5, on_dropped=dropped.append)
        queue.start()
        try:
            for index in range(20):
                queue.post(_event(f"t{index}"))
            await asyncio.sleep(0)
            # Five queued, the rest dropped; then two taken by the senders (held at the gate).
            assert dropped == ["Normal"] * 15
            assert sink.in_flight == 2
            assert len(queue) == 3
            queue.post(_event("late"))
            await _drain(queue, sink, 6)
            assert sorted(sink.sent) == sorted([*(f"t{index}" for index in range(5)), "late"])
            assert sink.most_in_flight == 2
        finally:
            await queue.stop()

    asyncio.run(scenario())


def test_a_warning_displaces_the_oldest_normal_event_and_goes_first() -> None:
    async def scenario() -> None:
        sink = _Sink()
        dropped: list[str] = []
        queue = EventQueue(sink.send, senders=1, capacity=3, on_dropped=dropped.append)
        for name in ("n1", "n2", "n3"):
            queue.post(_event(name))
        queue.post(_event("w1", "Warning", "Expired"))
        assert dropped == ["Normal"]
        queue.post(_event("w2", "Warning", "Expired"))
        queue.post(_event("w3", "Warning", "Expired"))
        # Full of Warnings: a new one has nothing to displace.
        queue.post(_event("w4", "Warning", "Expired"))
        assert dropped == ["Normal", "Normal", "Normal", "Warning"]
        queue.post(_event("n4"))
        assert dropped[-1] == "Normal"
        queue.start()
        try:
            await _drain(queue, sink, 3)
            assert sink.sent == ["w1", "w2", "w3"]
        finally:
            await queue.stop()

    asyncio.run(scenario())


def test_a_failing_send_does_not_stop_the_sender(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        sent: list[str] = []

        async def send(event: PendingEvent) -> None:
            if event.about.name == "bad":
                raise ConnectionResetError("the API server went away")
            sent.append(event.about.name)

        queue = EventQueue(send, senders=1, capacity=10)
        queue.start()
        try:
            with caplog.at_level(logging.WARNING):
                for name in ("a", "bad", "b"):
                    queue.post(_event(name))
                await run_until("the Events after the failed one sent", lambda: len(sent) == 2)
            assert sent == ["a", "b"]
            assert "could not record event Acknowledged on bad" in caplog.text
        finally:
            await queue.stop()

    asyncio.run(scenario())


def test_drops_are_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        now = [0.0]
        queue = EventQueue(_Sink().send, senders=1, capacity=1, clock=lambda: now[0])
        queue.post(_event("kept"))
        with caplog.at_level(logging.WARNING):
            for index in range(5):
                queue.post(_event(f"lost{index}"))
            now[0] = 61.0
            queue.post(_event("lost-later"))
        lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(lines) == 2
        assert lines[0].startswith("dropped 1 Event(s)")
        assert lines[1].startswith("dropped 5 Event(s) (Normal Acknowledged on lost-later")

    asyncio.run(scenario())


def test_stop_drops_what_is_queued_and_sends_nothing_after() -> None:
    async def scenario() -> None:
        sink = _Sink()
        queue = EventQueue(sink.send, senders=1, capacity=10)
        queue.start()
        for name in ("a", "b", "c"):
            queue.post(_event(name))
        await asyncio.sleep(0)
        await queue.stop()
        sink.gate.set()
        await asyncio.sleep(0)
        assert sink.sent == []
        assert sink.in_flight == 0

    asyncio.run(scenario())


def test_needs_a_sender_and_room() -> None:
    with pytest.raises(ValueError, match="needs a sender"):
        EventQueue(_Sink().send, senders=0)
    with pytest.raises(ValueError, match="needs a sender"):
        EventQueue(_Sink().send, capacity=0)


def test_drops_are_exported_by_type() -> None:
    metrics = OperatorMetrics()
    queue = EventQueue(_Sink().send, senders=1, capacity=1, on_dropped=metrics.event_dropped)
    queue.post(_event("kept"))
    queue.post(_event("lost"))
    queue.post(_event("lost", "Warning", "Expired"))  # displaces "kept"
    queue.post(_event("lost", "Warning", "Expired"))
    sample = metrics.registry.get_sample_value
    assert sample("tasklease_events_dropped_total", {"type": "Normal"}) == 2.0
    assert sample("tasklease_events_dropped_total", {"type": "Warning"}) == 1.0
