"""The reconciler: watch events in, the pure core's decisions out to the API server.

The informers deliver watch events (`task_seen`, `pod_seen`, `runner_lease_seen`); they only
update an in-memory cache and mark the Task's key dirty, so they stay cheap and never block.
Workers take dirty keys one at a time per key (`WorkQueue`), parse the Task, ask the core
what to do and perform the writes. The deadline queue marks a key dirty again when the core
asked to be woken.

A heartbeat therefore costs one cache update, one `observe` and one deadline move: no API
write (design: "a heartbeat must not cost the operator a write").

A Task waiting behind a backlog is held as its JSON (bytes), not as decoded objects: after
a bulk create, or while hand-outs wait for the client-side rate limit, thousands of keys
wait at once, and decoded bodies (a few thousand small objects each) would raise the
operator's memory high-water mark to that many Tasks' worth for good, since CPython's
allocator rarely returns the arenas such a burst leaves behind (docs/performance.md,
"Memory"). When fewer keys wait than there are workers (a steady stream of heartbeats), a
worker takes the body at once, and it is handed over as the informer decoded it: encoding
it to JSON only for the worker to parse that again was a fifth of the reconciler's CPU per
heartbeat (`python -m bench.event_path`).

Nothing here is needed to continue after a restart: all state is on the Task, and the
cache is rebuilt from the informers' initial listings (design invariant 5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import pydantic_core
from pydantic import ValidationError

from tasklease.api.models import (
    EPOCH_LABEL,
    KIND,
    POOL_RUNNER_ROLE,
    ROLE_LABEL,
    Phase,
    Task,
)
from tasklease.kube.errors import ApiError, Conflict, Gone
from tasklease.kube.refs import ObjectRef
from tasklease.lease.core import (
    CONDITION_INVALID,
    FAILED_CREATE,
    Clock,
    CreatePod,
    Decision,
    DeletePod,
    PatchLease,
    PatchStatus,
    PodState,
    RecordEvent,
    Sighting,
    decide,
    observe,
    when_to_stop_pod,
)
from tasklease.operator import failpoints
from tasklease.operator.events import DEFAULT_SENDERS, EventQueue, PendingEvent
from tasklease.operator.metrics import OperatorMetrics
from tasklease.operator.queues import DeadlineQueue, WorkQueue

logger = logging.getLogger(__name__)

TaskKey = tuple[str, str]  # (namespace, name)
# A Task's body as the reconciler holds it: JSON, or decoded (from the watch, for a worker
# that takes it at once). Both parse to the same Task (tests/unit/test_models.py).
Body = bytes | dict[str, Any]

# A decision loop that keeps producing writes is a bug, not a workload: stop and retry later.
_MAX_STEPS_PER_RECONCILE = 8
_RETRY_AFTER_ERROR_S = 5.0
# A pod creation refused for a reason that may clear is tried again after 1, 2, 4 ... 60 s
# (within the ack window), with a Warning Event on the first refusal and every tenth.
_CREATE_RETRY_FIRST_S = 1.0
_CREATE_RETRY_MAX_S = 60.0
_CREATE_REFUSAL_EVENT_EVERY = 10
# A Task whose deadline comes is read this long before it, so that the write at the deadline
# is the first request after it (the scale benchmark's detection time counts every round
# trip between a lease's deadline and its replacement pod). Longer than a read takes on a
# busy API server; short enough that few bodies are held at any time.
_PREFETCH_S = 1.0
# How often put-off bookkeeping writes look for a free API budget again, and the longest
# they are put off.
_DEFERRED_POLL_S = 0.25
_MAX_DEFER_S = 60.0
# Replaced runners' pods deleted in the background at once, at most. The others wait their
# turn before their request is built: a burst of reassignments would otherwise queue its own
# lease writes behind its deletions for a connection (aiohttp serves waiters in order).
BACKGROUND_DELETIONS = 4


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
    ) -> bytes: ...
    async def patch_task_status(
        self, namespace: str, name: str, *, resource_version: str, status: dict[str, Any]
    ) -> bytes: ...
    async def create_pod(self, namespace: str, manifest: dict[str, Any]) -> bool: ...
    async def delete_pod(self, namespace: str, name: str) -> bool: ...
    async def record_event(
        self, task: ObjectRef, *, type_: str, reason: str, message: str
    ) -> None: ...
    def congested(self) -> bool: ...


@dataclass(slots=True)
class _Entry:
    """What the operator keeps per Task between events: a few hundred bytes.

    The body is held only until a worker takes the key (`raw`; as JSON when a backlog
    waits): tens of thousands of idle leases must not cost tens of thousands of full
    objects. A reconcile that finds no body (a deadline is near) reads the Task afresh, a
    moment before the deadline (`_PREFETCH_S`), and keeps that body until the deadline's
    decision; so does a reconcile whose bookkeeping write is put off.
    """

    key: TaskKey  # the one key object of this Task in every queue and index
    raw: Body | None = None  # the newest body no worker has taken yet
    raw_seen_at: float = 0.0  # when it came (monotonic): a report in it was seen then
    raw_version: int = 0  # its resourceVersion (0: not comparable, or a body kept on purpose)
    # The newest resourceVersion a worker parsed: an event older than that (the echo of our
    # first write, arriving after our second) is history, and must neither be acted on
    # (a write against it fails: 409, then a read) nor observed (an older report taken
    # for a new one would move the lease's deadline).
    newest_version: int = 0
    woken: bool = False  # queued for something besides a body: a pod, a deadline, a retry
    invalid: str | None = None
    sighting: Sighting | None = None
    phase: Phase | None = None  # of the last parsed version, for metrics
    pods: tuple[PodState, ...] = ()  # runner pods seen (by name; one or two, rarely more)
    deleting: set[str] | None = None  # pods we asked to delete (a set only when there are)
    pod_created_for_epoch: int = 0
    # The API server refused to create the current epoch's pod (a PodState saying why, and
    # when to try again), and how many times in a row.
    refused_pod: PodState | None = None
    refusals: int = 0
    expired_at: float | None = None  # a lease deadline passed; the replacement is pending
    indexed_holder: str | None = None  # the pool runner `held_by` lists this task under


@dataclass(slots=True)
class _PoolRunner:
    """A pool runner as the operator saw it: its Lease renewals on our monotonic clock."""

    renew_seen_at: float
    duration_s: float
    renew_time: str | None = None
    gone: str | None = None  # why it is gone, once its Lease or pod is

    def expires_at(self) -> float:
        return self.renew_seen_at + self.duration_s


def describe_validation_error(error: ValidationError) -> str:
    """'spec.template: restartPolicy is ...; spec.ackTimeout: ...' from pydantic's errors."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        text = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {text}" if where else text)
    return "; ".join(parts)


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
    ) -> None:
        self._writer = writer
        self._workers = workers
        self._monotonic = monotonic
        self._wall = wall
        self._metrics = metrics
        self._entries: dict[TaskKey, _Entry] = {}
        self._runners: dict[tuple[str, str], _PoolRunner] = {}
        self._held_by: dict[tuple[str, str], set[TaskKey]] = {}
        self._orphan_pods: dict[TaskKey, tuple[PodState, ...]] = {}
        self._queue: WorkQueue[TaskKey] = WorkQueue()
        # A deadline's key goes ahead of everything the watches brought meanwhile.
        self._deadlines: DeadlineQueue[TaskKey] = DeadlineQueue(
            functools.partial(self._wake, urgent=True), clock=monotonic
        )
        self._tasks: list[asyncio.Task[None]] = []
        # Pod deletions in the background (a replaced runner's; one per reassignment).
        self._background: set[asyncio.Task[None]] = set()
        self._deletion_slots = asyncio.Semaphore(BACKGROUND_DELETIONS)
        self._events = EventQueue(
            self._send_event,
            senders=event_senders,
            on_dropped=None if metrics is None else metrics.event_dropped,
        )
        # Tasks whose only pending write is bookkeeping (the status after a hand-out), put
        # off while hand-outs and reassignments wait (see `_busy`), and since when.
        self._deferred: dict[TaskKey, float] = {}

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._events.start()
        self._tasks.append(asyncio.create_task(self._deadlines.run(), name="deadlines"))
        self._tasks.append(asyncio.create_task(self._release_deferred(), name="deferred"))
        for index in range(self._workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"reconcile-{index}"))

    async def stop(self) -> None:
        # Background deletions too: a burst's may queue for long, and a replica that lost
        # its leadership must not write after its successor has begun (whose stale-pod
        # sweep deletes what is left).
        for task in (*self._tasks, *self._background):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self._tasks.clear()
        await self._events.stop()

    # --- events in (from the informers; must stay cheap) -----------------------------------

    def task_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        # The informer hands bodies over without managedFields.
        metadata = body.get("metadata", {})
        key: TaskKey = (metadata.get("namespace", ""), metadata.get("name", ""))
        if event_type == "DELETED":
            gone = self._entries.pop(key, None)
            if gone is not None:
                self._index_holder(gone, None)
            self._orphan_pods.pop(key, None)
            self._deferred.pop(key, None)
            self._deadlines.schedule(key, None)
            return
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(key=key, pods=self._orphan_pods.pop(key, ()))
            self._entries[key] = entry
        # Parsed by the worker that takes the key, with the time it came (see module doc).
        entry.raw = pydantic_core.to_json(body) if self._backlogged() else body
        entry.raw_seen_at = self._monotonic()
        entry.raw_version = comparable_version(metadata.get("resourceVersion"))
        self._queue.add(entry.key)

    def _wake(self, key: TaskKey, *, urgent: bool = False) -> None:
        """Queue `key` for a reason other than a new body: it needs a decision even when the
        only body at hand is older than one already parsed."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.woken = True
        self._queue.add(key, urgent=urgent)

    def pod_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        metadata = body.get("metadata", {})
        if (metadata.get("labels") or {}).get(ROLE_LABEL) == POOL_RUNNER_ROLE:
            self._pool_pod_seen(event_type, body)
            return
        owner = next(
            (
                ref
                for ref in metadata.get("ownerReferences") or []
                if ref.get("kind") == KIND and ref.get("controller")
            ),
            None,
        )
        epoch_text = (metadata.get("labels") or {}).get(EPOCH_LABEL, "")
        if owner is None or not epoch_text.isdigit():
            return
        key: TaskKey = (metadata.get("namespace", ""), owner.get("name", ""))
        status = body.get("status") or {}
        state = PodState(
            name=metadata.get("name", ""),
            epoch=int(epoch_text),
            # One string object per phase, not one per pod.
            phase=sys.intern(str(status.get("phase") or "Pending")),
            gone=event_type == "DELETED",
            terminating=metadata.get("deletionTimestamp") is not None,
            reason=status.get("reason"),
            message=status.get("message"),
        )
        entry = self._entries.get(key)
        if entry is None:
            self._orphan_pods[key] = _with_pod(self._orphan_pods.get(key, ()), state)
            return
        previous = next((pod for pod in entry.pods if pod.name == state.name), None)
        if state.gone and entry.sighting is not None and state.epoch < entry.sighting.epoch:
            # A replaced runner's pod is gone: nothing more to learn from it or to do.
            _forget_pod(entry, state.name)
            return
        entry.pods = _with_pod(entry.pods, state)
        if self._pod_change_matters(entry, previous, state):
            self._wake(entry.key)

    def _pod_change_matters(
        self, entry: _Entry, previous: PodState | None, state: PodState
    ) -> bool:
        """Whether a pod event can change a decision about its Task. Most cannot, and each
        one that queues the Task costs a worker a reconcile and often a read of the Task
        (bodies are not kept between events): a reassignment alone brings half a dozen.
        The core looks at the current epoch's pod only for its end, and at older pods only
        to delete them."""
        if state == previous:
            return False  # a change of something we do not read (conditions, IPs, ...)
        if entry.sighting is None:
            return True
        current = entry.sighting.epoch
        ended = state.gone or state.terminating or state.terminated
        if state.epoch >= current:
            # The holder's pod (or the next one, of a hand-out whose lease write has not
            # been seen yet) starting or running.
            return ended
        # A replaced runner's pod, still there: to delete, unless we already asked.
        return not (entry.deleting is not None and state.name in entry.deleting)

    def runner_lease_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A pool runner's own Lease (ReportTaskRunnerHeartbeat) was written or deleted."""
        metadata = body.get("metadata", {})
        key = (metadata.get("namespace", ""), metadata.get("name", ""))
        spec = body.get("spec") or {}
        now = self._monotonic()
        runner = self._runners.get(key)
        if event_type == "DELETED":
            if runner is not None:
                runner.gone = f"pool runner {key[1]}'s Lease was deleted"
        else:
            renew_time = spec.get("renewTime")
            duration_s = float(spec.get("leaseDurationSeconds") or 15)
            if runner is None:
                # First sight (or after a restart): a full lease duration from now.
                self._runners[key] = _PoolRunner(now, duration_s, renew_time)
            elif renew_time != runner.renew_time:
                runner.renew_seen_at, runner.duration_s = now, duration_s
                runner.renew_time = renew_time
                runner.gone = None if runner.gone and "Lease" in runner.gone else runner.gone
        for task_key in self._held_by.get(key, ()):
            self._wake(task_key)

    def _pool_pod_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        metadata = body.get("metadata", {})
        key = (metadata.get("namespace", ""), metadata.get("name", ""))
        phase = (body.get("status") or {}).get("phase")
        why = None
        if event_type == "DELETED":
            why = f"pool runner pod {key[1]} was deleted"
        elif phase in ("Succeeded", "Failed"):
            why = f"pool runner pod {key[1]} ended ({phase})"
        if why is None:
            return
        runner = self._runners.setdefault(key, _PoolRunner(self._monotonic(), 0.0))
        runner.gone = why
        for task_key in self._held_by.get(key, ()):
            self._wake(task_key)

    def _pool_runner_state(self, task: Task) -> tuple[PodState | None, float | None]:
        """The holder of a pool task as a PodState the core understands, and when to look
        again (its Lease's expiry on our clock). Unknown runners are given the benefit of the
        doubt: the task's own ack and progress timeouts still apply."""
        holder = task.lease.holder
        if holder is None:
            return None, None
        runner = self._runners.get((task.namespace, holder))
        if runner is None:
            return None, None
        now = self._monotonic()
        if runner.gone is None and now < runner.expires_at():
            return PodState(
                name=holder, epoch=task.lease.epoch, phase="Running"
            ), runner.expires_at()
        message = runner.gone or (
            f"pool runner {holder}'s Lease expired (not renewed for {runner.duration_s:.0f}s)"
        )
        return PodState(name=holder, epoch=task.lease.epoch, gone=True, message=message), None

    def _index_holder(self, entry: _Entry, current: str | None) -> None:
        """Keep `held_by` (pool runner -> its tasks) in step with the lease annotations:
        `current` is the pool runner holding the Task now, None for none (or a pod)."""
        key = entry.key
        previous = entry.indexed_holder
        if previous == current:
            return
        if previous is not None:
            held = self._held_by.get((key[0], previous))
            if held is not None:
                held.discard(key)
                if not held:
                    del self._held_by[(key[0], previous)]
        if current is not None:
            self._held_by.setdefault((key[0], current), set()).add(key)
        entry.indexed_holder = current

    # --- work -----------------------------------------------------------------------------

    def _parse(self, entry: _Entry, raw: Body, *, seen_at: float) -> Task | None:
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
        entry.phase = task.status.phase
        self._index_holder(entry, task.lease.holder if task.is_pool_task else None)
        sighting = observe(entry.sighting, task, now=seen_at)
        if sighting.epoch == entry.pod_created_for_epoch and not sighting.pod_ensured:
            sighting = dataclasses.replace(sighting, pod_ensured=True)
        entry.sighting = sighting
        return task

    def _keep(self, entry: _Entry, raw: Body) -> None:
        """Hold a body already seen for the key's next reconcile, unless a newer one came."""
        if entry.raw is None:
            # Seeing it again changes nothing (`observe` of a version already folded in).
            entry.raw, entry.raw_seen_at, entry.raw_version = raw, self._monotonic(), 0

    async def _work(self) -> None:
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

    def _pod_for(self, entry: _Entry, epoch: int) -> PodState | None:
        seen = next((p for p in entry.pods if p.epoch == epoch), None)
        if seen is None and entry.refused_pod is not None and entry.refused_pod.epoch == epoch:
            return entry.refused_pod
        return seen

    async def _reconcile(self, key: TaskKey) -> None:
        entry = self._entries.get(key)
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
            task = self._parse(entry, raw, seen_at=entry.raw_seen_at)
        else:
            try:
                raw = await self._writer.get_task(namespace, name)
            except Gone:
                return  # its DELETED event is on its way
            if self._entries.get(key) is not entry:
                return
            task = self._parse(entry, raw, seen_at=self._monotonic())
        for _ in range(_MAX_STEPS_PER_RECONCILE):
            if task is None:
                await self._report_invalid(entry, raw)
                return
            assert entry.sighting is not None
            clock = Clock(monotonic=self._monotonic(), wall=self._wall())
            if task.is_pool_task:
                pod, next_pod_check = self._pool_runner_state(task)
            else:
                next_pod_check = await self._stop_stale_pods(entry, task, clock)
                pod = self._pod_for(entry, task.lease.epoch)
            decision = decide(task, sighting=entry.sighting, pod=pod, clock=clock)
            if not decision.actions:
                self._deferred.pop(key, None)
                wake_at = min(
                    (t for t in (decision.wake_at, next_pod_check) if t is not None),
                    default=None,
                )
                if wake_at is not None and wake_at - self._monotonic() <= _PREFETCH_S:
                    # Due within the prefetch window: keep the body, so that the decision
                    # at the deadline writes at once instead of reading the Task first.
                    self._keep(entry, raw)
                    self._deadlines.schedule(key, wake_at)
                    return
                # Bodies are not kept between events (memory), so a deadline needs a read;
                # it is made this much early, off the path from deadline to replacement.
                self._deadlines.schedule(key, None if wake_at is None else wake_at - _PREFETCH_S)
                return
            if decision.deferrable and self._busy():
                deferred_since = self._deferred.setdefault(key, self._monotonic())
                if self._monotonic() - deferred_since < _MAX_DEFER_S:
                    # The body stays: reading it again would spend the budget this waits for.
                    self._keep(entry, raw)
                    return
            self._deferred.pop(key, None)
            logger.info("task %s/%s: %s", namespace, name, decision.why)
            try:
                raw = await self._execute(entry, task, decision) or raw
            except Conflict:
                try:
                    raw = await self._writer.get_task(namespace, name)
                except Gone:
                    return
            if self._entries.get(key) is not entry:
                return  # deleted meanwhile
            self._account(entry, task, decision, decided_at=clock.monotonic)
            task = self._parse(entry, raw, seen_at=self._monotonic())
        self._deadlines.schedule(key, self._monotonic() + _RETRY_AFTER_ERROR_S)

    def _busy(self) -> bool:
        """Whether other work waits: for the API budget, or for a worker (a backlog of
        keys, e.g. a bulk create: a worker that writes a status is a worker not handing
        out; with 16 workers and two round trips per hand-out, the benchmark's hand-out
        rate at 10,000 Tasks was bounded by workers, not by the budget)."""
        return self._writer.congested() or self._backlogged()

    def _backlogged(self) -> bool:
        """As many keys wait as there are workers, or more: a key queued now is not taken
        at once."""
        return len(self._queue) >= self._workers

    async def _release_deferred(self) -> None:
        """Back to the queue with the put-off writes once nothing waits any more, or once
        one has waited `_MAX_DEFER_S` (a status must not lag for ever under load)."""
        while True:
            await asyncio.sleep(_DEFERRED_POLL_S)
            if not self._deferred:
                continue
            if self._busy():
                overdue = self._monotonic() - _MAX_DEFER_S
                keys = [key for key, since in self._deferred.items() if since <= overdue]
            else:
                keys = list(self._deferred)
            for key in keys:
                self._wake(key)

    def _account(self, entry: _Entry, task: Task, decision: Decision, *, decided_at: float) -> None:
        """Metrics of an executed decision (a refused CAS never gets here)."""
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

    # --- figures for metrics, computed on demand --------------------------------------------

    def phase_counts(self) -> dict[Phase, int]:
        counts: dict[Phase, int] = {}
        # Called from the metrics server's thread: list() copies the values in one step
        # under the GIL, iterating the live dict would fail when the loop adds a Task.
        for entry in list(self._entries.values()):
            if entry.phase is not None:
                counts[entry.phase] = counts.get(entry.phase, 0) + 1
        return counts

    def report_ages(self) -> list[float]:
        now = self._monotonic()
        ages = []
        for entry in list(self._entries.values()):  # another thread; see phase_counts
            sighting = entry.sighting
            if sighting is None or entry.phase != Phase.RUNNING:
                continue
            seen = sighting.report_seen_at or sighting.epoch_seen_at
            ages.append(now - seen)
        return ages

    async def _execute(self, entry: _Entry, task: Task, decision: Decision) -> bytes | None:
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
                    # Off the critical path: the lease already fences the old runner, and
                    # the replacement should not wait for its predecessor's deletion (a
                    # failed delete is retried by the stale-pod sweep).
                    self._in_background(self._in_turn(self._delete_pod(entry, namespace, pod_name)))
                case RecordEvent(type=type_, reason=reason, message=message):
                    about = ObjectRef(namespace, name, task.uid, resource_version)
                    self._events.post(PendingEvent(about, type_, reason, message))
        return written

    def _pod_refused(
        self, entry: _Entry, task: Task, pod: str, epoch: int, error: ApiError
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

    async def _stop_stale_pods(self, entry: _Entry, task: Task, clock: Clock) -> float | None:
        """Delete runner pods that lost the lease; return when to look again (monotonic)."""
        next_check: float | None = None
        for pod in entry.pods:
            if pod.gone:
                if pod.epoch < task.lease.epoch:
                    _forget_pod(entry, pod.name)  # nothing more to learn from it
                continue
            if entry.deleting is not None and pod.name in entry.deleting:
                continue
            when = when_to_stop_pod(task, pod)
            if when is None:
                continue
            if when > clock.wall:
                at = clock.monotonic_at(when)
                next_check = at if next_check is None else min(next_check, at)
                continue
            logger.info("deleting stale runner pod %s/%s", task.namespace, pod.name)
            await self._delete_pod(entry, task.namespace, pod.name)
        return next_check

    def _delete_pod(self, entry: _Entry, namespace: str, name: str) -> Coroutine[Any, Any, None]:
        """Delete a runner pod once. The name is marked now, before the deletion is awaited
        (often in the background), because the next reconcile's stale-pod sweep runs before a
        background deletion has started, and would delete the pod a second time (and wait
        for it: docs/design.md, "What the benchmark changed"). Pod events of its going skip a
        marked name too. A deletion that fails is unmarked, so that the sweep tries again."""
        if entry.deleting is None:
            entry.deleting = set()
        entry.deleting.add(name)
        return self._delete_marked_pod(entry, namespace, name)

    async def _delete_marked_pod(self, entry: _Entry, namespace: str, name: str) -> None:
        try:
            await self._writer.delete_pod(namespace, name)
        except BaseException:
            _unmark_deleting(entry, name)
            raise

    async def _report_invalid(self, entry: _Entry, raw: Body) -> None:
        """Say on the object what is wrong, once per generation and message."""
        body: Any = raw
        if isinstance(raw, bytes):
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
        if not isinstance(body, dict):
            body = {}
        metadata = body.get("metadata") or {}
        message = entry.invalid or "invalid"
        generation = metadata.get("generation")
        conditions = list((body.get("status") or {}).get("conditions") or [])
        if not isinstance(conditions, list):
            conditions = []
        current = next(
            (c for c in conditions if isinstance(c, dict) and c.get("type") == CONDITION_INVALID),
            None,
        )
        if (
            current is not None
            and current.get("status") == "True"
            and current.get("message") == message
            and current.get("observedGeneration") == generation
        ):
            return
        now = self._wall().isoformat().replace("+00:00", "Z")
        updated = {
            "type": CONDITION_INVALID,
            "status": "True",
            "reason": "InvalidSpec",
            "message": message[:32768],
            "lastTransitionTime": now,
            "observedGeneration": generation,
        }
        conditions = [
            c
            for c in conditions
            if not (isinstance(c, dict) and c.get("type") == CONDITION_INVALID)
        ] + [updated]
        logger.warning(
            "task %s/%s is invalid: %s", metadata.get("namespace"), metadata.get("name"), message
        )
        try:
            await self._writer.patch_task_status(
                metadata["namespace"],
                metadata["name"],
                resource_version=metadata["resourceVersion"],
                status={"conditions": conditions, "observedGeneration": generation},
            )
        except (Conflict, Gone):
            return  # a newer version is on its way through the watch
        self._events.post(PendingEvent(ObjectRef.of(metadata), "Warning", "InvalidSpec", message))

    async def _send_event(self, event: PendingEvent) -> None:
        await self._writer.record_event(
            event.about, type_=event.type, reason=event.reason, message=event.message
        )

    async def _in_turn(self, deletion: Coroutine[Any, Any, None]) -> None:
        try:
            async with self._deletion_slots:
                await deletion
        finally:
            # Stopped while it waited its turn: never started, and closed so that it is not
            # reported as a coroutine never awaited.
            deletion.close()

    def _in_background(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background write failed: %s", task.exception())


def _forget_pod(entry: _Entry, name: str) -> None:
    entry.pods = tuple(pod for pod in entry.pods if pod.name != name)
    _unmark_deleting(entry, name)


def _unmark_deleting(entry: _Entry, name: str) -> None:
    if entry.deleting is not None:
        entry.deleting.discard(name)
        if not entry.deleting:
            entry.deleting = None


def _with_pod(pods: tuple[PodState, ...], state: PodState) -> tuple[PodState, ...]:
    """`pods` with `state` in place of the pod of the same name (a tuple: most Tasks have one
    pod, and a one-item tuple is a quarter of a one-item dict)."""
    return (*(pod for pod in pods if pod.name != state.name), state)


def comparable_version(resource_version: Any) -> int:
    """A resourceVersion as the integer Kubernetes 1.35 made comparable for objects of one
    resource (KEP-5504: a positive integer without leading zeros); 0 when it is not one,
    which compares as unknown (never older than anything)."""
    if (
        isinstance(resource_version, str)
        and resource_version.isdigit()
        and resource_version.isascii()
        and not resource_version.startswith("0")
    ):
        return int(resource_version)
    return 0


def _resource_version(raw: bytes) -> str:
    """metadata.resourceVersion of a Task's JSON: what the next compare-and-swap write of the
    same decision is made against."""
    # No string cache: it would keep strings of every Task written alive in the parser.
    return str(pydantic_core.from_json(raw, cache_strings=False)["metadata"]["resourceVersion"])
