"""The reconciler: watch events in, the pure core's decisions out to the API server.

Our informers deliver watch events (`task_seen`, `pod_seen`, `runner_lease_seen`;
docs/decisions/own-informers.md). Each only updates the cache (`cache.TaskCache`) and
marks the Task's key dirty, so it stays cheap and never blocks: a heartbeat costs one cache
update, one `observe` and one deadline move, and no API write. Workers take dirty keys one
at a time per key (`WorkQueue`), parse the Task, ask the core (`lease.core.decide`) what to
do and make the writes, each a compare-and-swap on the version decided on. One deadline
queue wakes a key when the core asked to be asked again (docs/decisions/one-deadline-queue.md);
a Task whose deadline is near is read a moment before it, so that the write at the deadline
is the first request after it.

Around the work loop, one module per job: pool runners' liveness (`pool_runners`), the
bookkeeping writes put off while hand-outs wait (`deferral`,
docs/decisions/two-write-hand-out.md), replaced runners' pods deleted in the background
(`pod_deletions`), the report on a Task that does not parse (`invalid_spec`), and Events
sent from a bounded queue (`events`, docs/decisions/bounded-event-queue.md).

A Task's body waits for its worker as JSON while a backlog of keys waits, and as the
informer decoded it otherwise (docs/decisions/json-bodies-behind-backlog.md).

Nothing here is needed to continue after a restart: all state is on the Task, and the
cache is rebuilt from the informers' initial listings (design invariant 5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pydantic_core
from pydantic import ValidationError

from tasklease.api.models import EPOCH_LABEL, HOLDER_ANNOTATION, POOL_RUNNER_ROLE, ROLE_LABEL, Task
from tasklease.api.written import applied_server_side
from tasklease.kube.errors import ApiError, Conflict, Gone
from tasklease.kube.refs import ObjectRef
from tasklease.lease.core import (
    FAILED_CREATE,
    Clock,
    CreatePod,
    Decision,
    DeletePod,
    DeleteTask,
    PatchLease,
    PatchStatus,
    PodState,
    RecordEvent,
    decide,
    observe,
)
from tasklease.operator import failpoints
from tasklease.operator.cache import (
    Body,
    TaskCache,
    TaskEntry,
    TaskKey,
    comparable_version,
    overdue_at,
    runner_pod_seen,
)
from tasklease.operator.deferral import DeferredWrites
from tasklease.operator.events import DEFAULT_SENDERS, EventQueue, PendingEvent
from tasklease.operator.invalid_spec import describe_validation_error, invalid_spec_report
from tasklease.operator.metrics import OperatorMetrics
from tasklease.operator.pod_deletions import BACKGROUND_DELETIONS, PodDeletions
from tasklease.operator.pool_runners import PoolRunners
from tasklease.operator.queues import DeadlineQueue, WorkQueue

logger = logging.getLogger(__name__)

# A decision loop that keeps producing writes is a bug, not a workload: stop and retry later.
_MAX_STEPS_PER_RECONCILE = 8
_RETRY_AFTER_ERROR_S = 5.0
# A pod creation refused for a reason that may clear is tried again after 1, 2, 4 ... 60 s
# (within the ack window), with a Warning Event on the first refusal and every tenth.
_CREATE_RETRY_FIRST_S = 1.0
_CREATE_RETRY_MAX_S = 60.0
_CREATE_REFUSAL_EVENT_EVERY = 10
# A Task whose deadline comes is read this long before it, so that the write at the deadline
# is the first request after it (a lease's replacement waits for every round trip between
# its deadline and its pod). Longer than a read takes on a busy API server; short enough
# that few bodies are held at any time.
_PREFETCH_S = 1.0


def connections_needed(*, workers: int, event_senders: int = DEFAULT_SENDERS) -> int:
    """Requests a Reconciler makes at once, at most: the API client's pool should have this
    many connections beside its watches', so that no write waits for a connection."""
    return workers + event_senders + BACKGROUND_DELETIONS


class Writer(Protocol):
    """The API calls the reconciler makes (tasklease.kube.client.KubeWriter); Task reads and
    writes answer with the Task's JSON."""

    async def get_task(self, namespace: str, name: str) -> bytes: ...
    async def patch_task_annotations(
        self,
        namespace: str,
        name: str,
        *,
        resource_version: str,
        annotations: dict[str, str | None],
        labels: dict[str, str | None] | None = None,
        compact_managed_fields: bool = False,
    ) -> bytes: ...
    async def patch_task_status(
        self, namespace: str, name: str, *, resource_version: str, status: dict[str, Any]
    ) -> bytes: ...
    async def create_pod(self, namespace: str, manifest: dict[str, Any]) -> bool: ...
    async def delete_pod(self, namespace: str, name: str) -> bool: ...
    async def delete_task(
        self, namespace: str, name: str, *, uid: str, resource_version: str
    ) -> bool: ...
    async def record_event(
        self, task: ObjectRef, *, type_: str, reason: str, message: str
    ) -> None: ...
    def congested(self) -> bool: ...


class Reconciler:
    def __init__(
        self,
        writer: Writer,
        *,
        workers: int = 8,
        event_senders: int = DEFAULT_SENDERS,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: OperatorMetrics | None = None,
        blind_within: Callable[[float], float] | None = None,
        ttl_after_finished: timedelta | None = None,
        compact_managed_fields: bool = True,
    ) -> None:
        self._writer = writer
        # The default spec.ttlAfterFinished (the chart's operator.ttlAfterFinished).
        self._ttl_after_finished = ttl_after_finished
        # The chart's operator.compactManagedFields (api/written.py).
        self._compact_managed_fields = compact_managed_fields
        self._workers = workers
        self._monotonic = monotonic
        # How much of the last s seconds the operator could not see (`Sight.blind_within`):
        # left out of the age of a lease first seen in a listing.
        self._blind_within = blind_within
        self._wall = wall
        self._metrics = metrics
        # What the metrics' per-Task figures are computed from (OperatorMetrics.attach).
        self.cache = TaskCache(monotonic=monotonic)
        self._pool_runners = PoolRunners(monotonic=monotonic)
        self._queue: WorkQueue[TaskKey] = WorkQueue()
        # A deadline's key goes ahead of everything the watches brought meanwhile.
        self._deadlines: DeadlineQueue[TaskKey] = DeadlineQueue(
            functools.partial(self._wake, urgent=True), clock=monotonic
        )
        self._deferred = DeferredWrites(busy=self._busy, wake=self._wake, monotonic=monotonic)
        self._deletions = PodDeletions(writer.delete_pod)
        self._events = EventQueue(
            self._send_event,
            senders=event_senders,
            on_dropped=None if metrics is None else metrics.event_dropped,
        )
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._events.start()
        self._tasks.append(asyncio.create_task(self._deadlines.run(), name="deadlines"))
        self._tasks.append(asyncio.create_task(self._deferred.run(), name="deferred"))
        for index in range(self._workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"reconcile-{index}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Background deletions too: a burst's may queue for long, and a replica that lost
        # its leadership must not write after its successor has begun.
        await self._deletions.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._events.stop()

    # --- events in (from the informers; must stay cheap) -----------------------------------

    def task_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        # The informer hands bodies over without managedFields.
        metadata = body.get("metadata", {})
        key: TaskKey = (metadata.get("namespace", ""), metadata.get("name", ""))
        if event_type == "DELETED":
            gone = self.cache.forget(key)
            if gone is not None:
                self._pool_runners.index(gone, None)
            self._deferred.forget(key)
            self._deadlines.schedule(key, None)
            return
        entry = self.cache.entry(key)
        # Parsed by the worker that takes the key, with the time it came (see module doc).
        entry.raw = pydantic_core.to_json(body) if self._backlogged() else body
        entry.raw_seen_at = self._monotonic()
        entry.raw_version = comparable_version(metadata.get("resourceVersion"))
        self._queue.add(entry.key)

    def pod_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        labels = body.get("metadata", {}).get("labels") or {}
        if labels.get(ROLE_LABEL) == POOL_RUNNER_ROLE:
            for task_key in self._pool_runners.pod_seen(event_type, body):
                self._wake(task_key)
            return
        seen = runner_pod_seen(event_type, body)
        if seen is None:
            return
        key, state = seen
        entry = self.cache.get(key)
        if entry is None:
            self.cache.hold_orphan(key, state)
        elif entry.pod_seen(state):
            self._wake(entry.key)

    def runner_lease_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A pool runner's own Lease (ReportTaskRunnerHeartbeat) was written or deleted."""
        for task_key in self._pool_runners.lease_seen(event_type, body):
            self._wake(task_key)

    def _wake(self, key: TaskKey, *, urgent: bool = False) -> None:
        """Queue `key` for a reason other than a new body: it needs a decision even when the
        only body at hand is older than one already parsed."""
        entry = self.cache.get(key)
        if entry is not None:
            entry.woken = True
        self._queue.add(key, urgent=urgent)

    # --- work -----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            try:
                await self._reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reconciling task %s/%s failed; retrying", *key)
                self._deadlines.schedule(key, self._monotonic() + _RETRY_AFTER_ERROR_S)
            finally:
                self._queue.done(key)

    async def _reconcile(self, key: TaskKey) -> None:
        entry = self.cache.get(key)
        if entry is None:
            return
        namespace, name = key
        raw, entry.raw = entry.raw, None
        woken, entry.woken = entry.woken, False
        if raw is not None and 0 < entry.raw_version < entry.newest_version:
            if not woken:
                return  # history: everything in it is in a version already decided on
            raw = None  # something else needs a decision, and this body is too old for it
        if raw is not None:
            task = self._observe(entry, raw, seen_at=entry.raw_seen_at)
        else:
            try:
                raw = await self._writer.get_task(namespace, name)
            except Gone:
                return  # its DELETED event is on its way
            if self.cache.get(key) is not entry:
                return
            task = self._observe(entry, raw, seen_at=self._monotonic())
        for _ in range(_MAX_STEPS_PER_RECONCILE):
            if task is None:
                await self._report_invalid(entry, raw)
                return
            assert entry.sighting is not None
            clock = Clock(monotonic=self._monotonic(), wall=self._wall())
            if task.is_pool_task:
                pod, next_pod_check = self._pool_runners.holder_state(task)
            else:
                next_pod_check = await self._deletions.delete_stale(entry, task, clock)
                pod = entry.pod_for(task.lease.epoch)
            decision = decide(
                task,
                sighting=entry.sighting,
                pod=pod,
                clock=clock,
                ttl_after_finished=self._ttl_after_finished,
            )
            if not decision.actions:
                self._deferred.forget(key)
                wake_at = min(
                    (t for t in (decision.wake_at, next_pod_check) if t is not None),
                    default=None,
                )
                if wake_at is not None and wake_at - self._monotonic() <= _PREFETCH_S:
                    # Due within the prefetch window: keep the body, so that the decision
                    # at the deadline writes at once instead of reading the Task first.
                    self._hold_body(entry, raw)
                    self._deadlines.schedule(key, wake_at)
                    return
                # Bodies are not kept between events (memory), so a deadline needs a read;
                # it is made this much early, off the path from deadline to replacement.
                self._deadlines.schedule(key, None if wake_at is None else wake_at - _PREFETCH_S)
                return
            if decision.deferrable and self._deferred.put_off(key):
                # The body stays: reading it again would spend the budget this waits for.
                self._hold_body(entry, raw)
                return
            self._deferred.forget(key)
            logger.info("task %s/%s: %s", namespace, name, decision.why)
            try:
                raw = await self._execute(entry, task, decision) or raw
            except Conflict:
                try:
                    raw = await self._writer.get_task(namespace, name)
                except Gone:
                    return
            if self.cache.get(key) is not entry or decision.deletes_task:
                return  # deleted meanwhile, or by this decision (its DELETED event follows)
            self._record_metrics(entry, task, decision, decided_at=clock.monotonic)
            task = self._observe(entry, raw, seen_at=self._monotonic())
        self._deadlines.schedule(key, self._monotonic() + _RETRY_AFTER_ERROR_S)

    def _observe(self, entry: TaskEntry, raw: Body, *, seen_at: float) -> Task | None:
        """The Task in `raw`, folded into the entry's sighting as seen at `seen_at`; None
        when it is invalid (`entry.invalid` says why)."""
        try:
            task = (
                Task.model_validate_json(raw)
                if isinstance(raw, bytes)
                else Task.model_validate(raw)
            )
        except ValidationError as error:
            entry.invalid = describe_validation_error(error)
            return None
        entry.invalid = None
        entry.newest_version = max(
            entry.newest_version, comparable_version(task.metadata.get("resourceVersion"))
        )
        self._pool_runners.index(entry, task.lease.holder if task.is_pool_task else None)
        previous = entry.sighting
        sighting = observe(previous, task, now=seen_at, blind_within=self._blind_within)
        if sighting.epoch == entry.pod_created_for_epoch and not sighting.pod_ensured:
            sighting = dataclasses.replace(sighting, pod_ensured=True)
        entry.sighting = sighting
        phase = task.status.phase
        if phase != entry.phase or previous is None or previous.epoch != sighting.epoch:
            entry.overdue_at = overdue_at(task, sighting, now=seen_at, wall=self._wall())
        entry.phase = phase
        return task

    def _hold_body(self, entry: TaskEntry, raw: Body) -> None:
        """Hold a body already seen for the key's next reconcile, unless a newer one came."""
        if entry.raw is None:
            # Seeing it again changes nothing (`observe` of a version already folded in).
            entry.raw, entry.raw_seen_at, entry.raw_version = raw, self._monotonic(), 0

    def _busy(self) -> bool:
        """Whether other work waits: for the API budget, or for a worker (a backlog of
        keys, e.g. a bulk create: a worker that writes a status is a worker not handing
        out, and with two round trips per hand-out a few workers bound the hand-out rate
        before the budget does)."""
        return self._writer.congested() or self._backlogged()

    def _backlogged(self) -> bool:
        """As many keys wait as there are workers, or more: a key queued now is not taken
        at once."""
        return len(self._queue) >= self._workers

    # --- writes ---------------------------------------------------------------------------

    async def _execute(self, entry: TaskEntry, task: Task, decision: Decision) -> bytes | None:
        """Perform the decision's actions in order; the Task's JSON after the last write of
        it (None when the decision wrote no Task)."""
        namespace, name = task.namespace, task.name
        resource_version = str(task.metadata.get("resourceVersion", ""))
        written: bytes | None = None
        for action in decision.actions:
            match action:
                case PatchLease(annotations=annotations, labels=labels):
                    written = await self._writer.patch_task_annotations(
                        namespace,
                        name,
                        resource_version=resource_version,
                        annotations=annotations,
                        labels=labels,
                        compact_managed_fields=self._compacts(task, annotations),
                    )
                    resource_version = _resource_version(written)
                    failpoints.reached(failpoints.AFTER_LEASE_WRITE)
                case PatchStatus(status=status):
                    written = await self._writer.patch_task_status(
                        namespace,
                        name,
                        resource_version=resource_version,
                        status=status,
                    )
                    resource_version = _resource_version(written)
                    failpoints.reached(failpoints.AFTER_STATUS_WRITE)
                case CreatePod(manifest=manifest):
                    epoch = int(manifest["metadata"]["labels"][EPOCH_LABEL])
                    try:
                        await self._writer.create_pod(namespace, manifest)
                    except ApiError as error:
                        self._pod_refused(entry, task, manifest["metadata"]["name"], epoch, error)
                        continue
                    entry.pod_created_for_epoch = epoch
                    entry.refused_pod, entry.refusals = None, 0
                    failpoints.reached(failpoints.AFTER_POD_CREATE)
                case DeletePod(name=pod_name):
                    # Off the critical path: the lease already fences the old runner.
                    self._deletions.in_background(entry, namespace, pod_name)
                case DeleteTask(uid=uid, resource_version=version):
                    await self._writer.delete_task(
                        namespace, name, uid=uid, resource_version=version
                    )
                case RecordEvent(type=type_, reason=reason, message=message):
                    about = ObjectRef(namespace, name, task.uid, resource_version)
                    self._events.post(PendingEvent(about, type_, reason, message))
        return written

    def _compacts(self, task: Task, annotations: dict[str, str | None]) -> bool:
        """Whether this lease write replaces the Task's managedFields: a hand-out (the next
        runner's heartbeats are what it makes cheaper), unless the Task is applied
        server-side."""
        return (
            self._compact_managed_fields
            and annotations.get(HOLDER_ANNOTATION) is not None
            and not applied_server_side(task.metadata)
        )

    def _pod_refused(
        self, entry: TaskEntry, task: Task, pod: str, epoch: int, error: ApiError
    ) -> None:
        """Remember why the API server would not create the pod, for the next decision:
        invalid (400, 422: the template is wrong, the task fails), or a refusal that may
        clear (a missing ServiceAccount, quota, Pod Security, the API server away: tried
        again with backoff while the ack window lasts, and shown on the Task). Never an
        error loop with a traceback."""
        invalid = error.status in (400, 422)
        if entry.refused_pod is None or entry.refused_pod.epoch != epoch:
            entry.refusals = 0
        entry.refusals += 1
        delay = min(_CREATE_RETRY_MAX_S, _CREATE_RETRY_FIRST_S * 2 ** (entry.refusals - 1))
        entry.refused_pod = PodState.refused(
            pod,
            epoch,
            message=f"HTTP {error.status}: {error.message}",
            invalid=invalid,
            retry_at=None if invalid else self._monotonic() + delay,
        )
        if entry.refusals == 1:
            logger.warning(
                "task %s/%s: the API server refused pod %s (%s)",
                task.namespace,
                task.name,
                pod,
                entry.refused_pod.message,
            )
        if not invalid:
            if entry.refusals % _CREATE_REFUSAL_EVENT_EVERY == 1:
                about = ObjectRef(
                    task.namespace, task.name, task.uid, str(task.metadata.get("resourceVersion"))
                )
                self._events.post(
                    PendingEvent(
                        about,
                        "Warning",
                        FAILED_CREATE,
                        f"could not create pod {pod} (try {entry.refusals}, again in "
                        f"{delay:g}s): {entry.refused_pod.message}",
                    )
                )
            self._deadlines.schedule(entry.key, self._monotonic() + delay)

    async def _report_invalid(self, entry: TaskEntry, raw: Body) -> None:
        """Say on the Task what is wrong with it (`invalid_spec`)."""
        message = entry.invalid or "invalid"
        report = invalid_spec_report(raw, message, now=self._wall())
        if report is None:
            return  # said already, for this generation
        logger.warning("task %s/%s is invalid: %s", report.namespace, report.name, message)
        try:
            await self._writer.patch_task_status(
                report.namespace,
                report.name,
                resource_version=report.resource_version,
                status=report.status,
            )
        except (Conflict, Gone):
            return  # a newer version is on its way through the watch
        self._events.post(report.event)

    async def _send_event(self, event: PendingEvent) -> None:
        await self._writer.record_event(
            event.about, type_=event.type, reason=event.reason, message=event.message
        )

    # --- metrics --------------------------------------------------------------------------

    def _record_metrics(
        self, entry: TaskEntry, task: Task, decision: Decision, *, decided_at: float
    ) -> None:
        """Count an executed decision (a refused compare-and-swap never gets here)."""
        if decision.expired_at is not None and decision.retrying:
            entry.expired_at = decision.expired_at
        if self._metrics is None:
            entry.expired_at = None
            return
        self._metrics.decision_executed(task, decision, now=self._wall())
        if decision.expired_at is not None:
            self._metrics.expiry_decided(late_by_s=decided_at - decision.expired_at)
        if decision.handed_out is not None and entry.expired_at is not None:
            self._metrics.replacement_created(late_by_s=self._monotonic() - entry.expired_at)
            entry.expired_at = None


def _resource_version(raw: bytes) -> str:
    """metadata.resourceVersion of a Task's JSON: what the next compare-and-swap write of the
    same decision is made against."""
    # No string cache: it would keep strings of every Task written alive in the parser.
    return str(pydantic_core.from_json(raw, cache_strings=False)["metadata"]["resourceVersion"])
