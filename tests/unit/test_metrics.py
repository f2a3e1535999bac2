"""The workload's gauges: whether the replica leads, and what a scrape says of each informer
before and after its first listing."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import generate_latest

from tasklease.operator.metrics import OperatorMetrics


@dataclass
class FakeInformer:
    resource: str
    namespace: str | None
    synced: bool = False


@dataclass
class FakeWorkload:
    informers: list[FakeInformer] = field(default_factory=list)
    running: bool = False


def _samples(metrics: OperatorMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        name: float(value)
        for line in text.splitlines()
        if line.startswith("tasklease_informer_synced{")
        for name, _, value in [line.rpartition(" ")]
    }


def test_informer_synced_follows_each_informer() -> None:
    tasks = FakeInformer("tasks", "team-a")
    pods = FakeInformer("pods", None)
    metrics = OperatorMetrics()
    metrics.attach_workload(FakeWorkload([tasks, pods], running=True))

    # A standby (or an operator still listing) says so: nothing is synced yet.
    assert _samples(metrics) == {
        'tasklease_informer_synced{namespace="team-a",resource="tasks"}': 0.0,
        'tasklease_informer_synced{namespace="",resource="pods"}': 0.0,
    }

    tasks.synced = True
    assert _samples(metrics) == {
        'tasklease_informer_synced{namespace="team-a",resource="tasks"}': 1.0,
        'tasklease_informer_synced{namespace="",resource="pods"}': 0.0,
    }


def test_leading_follows_the_workload() -> None:
    workload = FakeWorkload()
    metrics = OperatorMetrics()
    metrics.attach_workload(workload)

    def leading() -> float | None:
        return metrics.registry.get_sample_value("tasklease_leading")

    assert leading() == 0.0  # a standby
    workload.running = True
    assert leading() == 1.0
    workload.running = False  # stopped leading
    assert leading() == 0.0
