"""Prometheus metrics of the operator.

Counters and histograms move when the reconciler has *executed* a decision (so a refused
compare-and-swap is not counted). Per-Task gauges (Tasks by phase, the age of each lease's
last report) are computed from the reconciler's cache at scrape time instead of being kept
up to date on every watch event: a heartbeat must stay as cheap as possible, and a scrape
every 15 seconds is not.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tasklease.api.models import Outcome, Phase, Task
from tasklease.lease.core import Decision
from tasklease.operator.events import DEFAULT_CAPACITY as EVENT_QUEUE_CAPACITY

# Report ages are judged against timeouts of seconds (tests) to 15 minutes (default).
REPORT_AGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0)
# Detection latency: the goal is well under a second.
DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One API request: milliseconds when the API server is idle, seconds when it is saturated.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class TaskCache(Protocol):
    def phase_counts(self) -> dict[Phase, int]: ...
    def overdue_counts(self) -> dict[Phase, int]: ...
    def report_ages(self) -> Iterable[float]: ...


class WatchState(Protocol):
    """An informer as the metrics see it (tasklease.kube.informer.Informer)."""

    @property
    def resource(self) -> str: ...
    @property
    def namespace(self) -> str | None: ...
    @property
    def synced(self) -> bool: ...


class WorkloadState(Protocol):
    """The work as the metrics see it (tasklease.operator.workload.Workload)."""

    @property
    def informers(self) -> Sequence[WatchState]: ...
    @property
    def running(self) -> bool: ...


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            # process_cpu_seconds_total, process_resident_memory_bytes,
            # process_start_time_seconds, ...: the dashboard's CPU and memory panels and the
            # restart alert read them. The default registry has them already; ours does not.
            ProcessCollector(registry=registry)
        self.registry = registry
        self.handouts = Counter(
            "tasklease_handouts",
            "Leases handed out to a runner pod (first attempts and retries).",
            registry=self.registry,
        )
        self.attempts_ended = Counter(
            "tasklease_attempts_ended",
            "Attempts that ended, by outcome (Succeeded, Failed, AckTimeout, ...).",
            ["outcome"],
            registry=self.registry,
        )
        self.reassignments = Counter(
            "tasklease_reassignments",
            "Attempts that ended without success and whose task goes on to another attempt.",
            ["reason"],
            registry=self.registry,
        )
        self.attempt_duration = Histogram(
            "tasklease_attempt_duration_seconds",
            "From hand-out to the end of the attempt, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.reassignment_delay = Histogram(
            "tasklease_reassignment_delay_seconds",
            "From a lease deadline passing (last observed report + timeout) to the creation "
            "of the replacement runner pod.",
            buckets=DELAY_BUCKETS,
            registry=self.registry,
        )
        # The first part of the one above: what the operator itself took (its timer, its
        # queue, a read when it held no body) before the API server's answers (the next two).
        self.expiry_decision_delay = Histogram(
            "tasklease_expiry_decision_delay_seconds",
            "From a lease deadline passing to the operator's decision to end the attempt.",
            buckets=DELAY_BUCKETS,
            registry=self.registry,
        )
        self.api_request_duration = Histogram(
            "tasklease_api_request_duration_seconds",
            "The operator's requests to the API server (reads and writes; not its watches), "
            "from sending to the last byte of the answer, by verb, resource and HTTP status "
            '(code "none": no answer).',
            ["verb", "resource", "code"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.api_throttle = Histogram(
            "tasklease_api_throttle_seconds",
            "Waits for the client-side rate limit (TASKLEASE_API_QPS and TASKLEASE_API_BURST) "
            'before a request, by budget ("requests" or "events"); requests that did not '
            "wait are not counted.",
            ["budget"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )

        self.events_dropped = Counter(
            "tasklease_events_dropped",
            "Events not recorded because too many waited to be sent (the queue holds "
            f"{EVENT_QUEUE_CAPACITY:,}; a Warning displaces the oldest Normal Event), by type.",
            ["type"],
            registry=self.registry,
        )
        # Every outcome and Event type exported at 0 from the start: `rate()` and `increase()`
        # ignore a series' first sample, so a series that appeared with its first count would
        # hide that count (a start's first reassignment of a kind, on the dashboard; the
        # first Events dropped, from the alert; charts/tasklease/files/).
        for outcome in Outcome:
            self.attempts_ended.labels(outcome.value)
            self.reassignments.labels(outcome.value)
        for type_ in ("Normal", "Warning"):
            self.events_dropped.labels(type_)
        for budget in ("requests", "events"):
            self.api_throttle.labels(budget)

    def attach(self, cache: TaskCache) -> None:
        """Export per-Task figures computed from `cache` at scrape time."""
        self.registry.register(_CacheCollector(cache))

    def attach_workload(self, workload: WorkloadState) -> None:
        """Export whether this replica leads (runs the work; a standby does not), and
        whether each informer has delivered its first listing: until all have, the leader
        decides without knowing everything (after a start or a takeover)."""
        self.registry.register(_WorkloadCollector(workload))

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def decision_executed(self, task: Task, decision: Decision, *, now: datetime) -> None:
        if decision.handed_out is not None:
            self.handouts.inc()
        if decision.ended is not None:
            outcome = decision.ended.value
            self.attempts_ended.labels(outcome).inc()
            if decision.retrying:
                self.reassignments.labels(outcome).inc()
            attempts = task.status.attempts
            if attempts and attempts[-1].end_time is None:
                elapsed = (now - attempts[-1].start_time).total_seconds()
                self.attempt_duration.labels(outcome).observe(max(elapsed, 0.0))

    def replacement_created(self, *, late_by_s: float) -> None:
        self.reassignment_delay.observe(max(late_by_s, 0.0))

    def expiry_decided(self, *, late_by_s: float) -> None:
        self.expiry_decision_delay.observe(max(late_by_s, 0.0))

    def event_dropped(self, type_: str) -> None:
        self.events_dropped.labels(type_).inc()

    # tasklease.kube.client.RequestObserver

    def api_request(self, *, verb: str, resource: str, code: str, seconds: float) -> None:
        self.api_request_duration.labels(verb, resource, code).observe(seconds)

    def api_throttled(self, *, budget: str, seconds: float) -> None:
        self.api_throttle.labels(budget).observe(seconds)


class _CacheCollector(Collector):
    def __init__(self, cache: TaskCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        phases = GaugeMetricFamily(
            "tasklease_tasks", "Tasks the operator watches, by phase.", labels=["phase"]
        )
        counts = self._cache.phase_counts()
        for phase in Phase:
            phases.add_metric([phase.value], counts.get(phase, 0))
        yield phases

        overdue = GaugeMetricFamily(
            "tasklease_tasks_overdue",
            "Tasks Assigned for longer than their ackTimeout plus 30s, or Pending (not waiting "
            "for a pool runner) for that long after their backoff: nothing moves them on.",
            labels=["phase"],
        )
        late = self._cache.overdue_counts()
        for phase in (Phase.PENDING, Phase.ASSIGNED):
            overdue.add_metric([phase.value], late.get(phase, 0))
        yield overdue

        tally: Tally[float] = Tally()
        total = 0.0
        for age in self._cache.report_ages():
            total += age
            bucket = next((b for b in REPORT_AGE_BUCKETS if age <= b), float("inf"))
            tally[bucket] += 1
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound in (*REPORT_AGE_BUCKETS, float("inf")):
            cumulative += tally[bound]
            buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
        ages = HistogramMetricFamily(
            "tasklease_report_age_seconds",
            "Per held lease: seconds since the operator last observed a progress report.",
        )
        ages.add_metric([], buckets, total)
        yield ages


class _WorkloadCollector(Collector):
    def __init__(self, workload: WorkloadState) -> None:
        self._workload = workload

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "tasklease_leading",
            "1 while this replica leads and does the work (with leader election off: once "
            "started); a standby exports 0.",
            value=1.0 if self._workload.running else 0.0,
        )
        synced = GaugeMetricFamily(
            "tasklease_informer_synced",
            "1 once the informer of a resource has listed it (a standby lists nothing).",
            labels=["resource", "namespace"],
        )
        for informer in self._workload.informers:
            synced.add_metric(
                [informer.resource, informer.namespace or ""], 1.0 if informer.synced else 0.0
            )
        yield synced
