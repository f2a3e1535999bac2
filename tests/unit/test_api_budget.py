"""The client-side rate limit and what the writer tells its observer, on fake time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tasklease.kube.client import TokenBucket
from tasklease.operator.metrics import OperatorMetrics


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_token_bucket_waits_only_once_the_burst_is_spent_and_says_how_long() -> None:
    time = FakeTime()
    bucket = TokenBucket(qps=10, burst=2, clock=time.clock, sleep=time.sleep)

    async def scenario() -> list[float]:
        waits = [await bucket.take(), await bucket.take()]
        assert bucket.congested()  # the burst is spent
        waits.append(await bucket.take())  # one token refills in 1/qps
        time.now += 0.05  # half a token comes back on its own
        waits.append(await bucket.take())
        time.now += 1.0  # more than the burst refills, but never beyond it
        waits += [await bucket.take(), await bucket.take(), await bucket.take()]
        return waits

    assert asyncio.run(scenario()) == pytest.approx([0.0, 0.0, 0.1, 0.05, 0.0, 0.0, 0.1])


def test_a_request_within_the_budget_has_not_waited_on_a_real_clock() -> None:
    bucket = TokenBucket(qps=1e9, burst=1 << 30)  # the writer's default: no limit

    async def takes() -> list[float]:
        return [await bucket.take() for _ in range(3)]

    assert asyncio.run(takes()) == [0.0, 0.0, 0.0]  # not counted as waits for the budget


def test_requests_and_waits_are_exported_by_verb_resource_code_and_budget() -> None:
    metrics = OperatorMetrics()
    observed: Any = metrics  # as the writer sees it: a tasklease.kube.client.RequestObserver
    observed.api_request(verb="PATCH", resource="tasks", code="200", seconds=0.03)
    observed.api_request(verb="PATCH", resource="tasks", code="409", seconds=0.2)
    observed.api_request(verb="POST", resource="pods", code="none", seconds=4.0)
    observed.api_throttled(budget="requests", seconds=0.5)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    requests = "tasklease_api_request_duration_seconds"
    patched = {"verb": "PATCH", "resource": "tasks", "code": "200"}
    assert value(f"{requests}_count", **patched) == 1
    assert value(f"{requests}_bucket", **patched, le="0.025") == 0
    assert value(f"{requests}_bucket", **patched, le="0.05") == 1
    refused = {"verb": "PATCH", "resource": "tasks", "code": "409"}
    assert value(f"{requests}_sum", **refused) == 0.2
    unanswered = {"verb": "POST", "resource": "pods", "code": "none"}
    assert value(f"{requests}_bucket", **unanswered, le="2.5") == 0
    assert value(f"{requests}_bucket", **unanswered, le="5.0") == 1

    assert value("tasklease_api_throttle_seconds_count", budget="requests") == 1
    assert value("tasklease_api_throttle_seconds_sum", budget="requests") == 0.5
    assert (
        value("tasklease_api_throttle_seconds_count", budget="events") == 0
    )  # at zero from the start
