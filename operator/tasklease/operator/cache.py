"""What the operator keeps per Task between events: a few hundred bytes, rebuilt from the
informers' listings after a restart (design invariant 5: memory is a cache of observations).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tasklease.api.models import EPOCH_LABEL, KIND, Phase, Task
from tasklease.lease.core import PodState, Sighting

TaskKey = tuple[str, str]  # (namespace, name)
# A Task's body as the reconciler holds it: JSON, or decoded (from the watch, for a worker
# that takes it at once). Both parse to the same Task (tests/unit/test_models.py).
Body = bytes | dict[str, Any]


@dataclass(slots=True)
class TaskEntry:
    """One Task as the operator saw it.

    The body is held only until a worker takes the key (`raw`; as JSON when a backlog
    waits): tens of thousands of idle leases must not cost tens of thousands of full
    objects. A reconcile that finds no body (a deadline is near) reads the Task afresh, a
    moment before the deadline, and keeps that body until the deadline's decision; so does
    a reconcile whose bookkeeping write is put off.
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
    # When it will have waited Pending or Assigned for longer than it should (monotonic;
    # `overdue_at`), for the stuck-Tasks metric.
    overdue_at: float | None = None
    pods: tuple[PodState, ...] = ()  # runner pods seen (by name; one or two, rarely more)
    deleting: set[str] | None = None  # pods we asked to delete (a set only when there are)
    pod_created_for_epoch: int = 0
    # The API server refused to create the current epoch's pod (a PodState saying why, and
    # when to try again), and how many times in a row.
    refused_pod: PodState | None = None
    refusals: int = 0
    expired_at: float | None = None  # a lease deadline passed; the replacement is pending
    indexed_holder: str | None = None  # the pool runner this Task is indexed under

    def pod_for(self, epoch: int) -> PodState | None:
        """The runner pod of `epoch` as seen, or as refused by the API server."""
        seen = next((p for p in self.pods if p.epoch == epoch), None)
        if seen is None and self.refused_pod is not None and self.refused_pod.epoch == epoch:
            return self.refused_pod
        return seen

    def pod_seen(self, state: PodState) -> bool:
        """Take in a runner pod's new state; whether it can change a decision about the
        Task. Most changes cannot, and each one that queues the Task costs a worker a
        reconcile and often a read of the Task (bodies are not kept between events): a
        reassignment alone brings half a dozen. The core looks at the current epoch's pod
        only for its end, and at older pods only to delete them."""
        previous = next((pod for pod in self.pods if pod.name == state.name), None)
        if state.gone and self.sighting is not None and state.epoch < self.sighting.epoch:
            # A replaced runner's pod is gone: nothing more to learn from it or to do.
            self.forget_pod(state.name)
            return False
        self.pods = with_pod(self.pods, state)
        if state == previous:
            return False  # a change of something we do not read (conditions, IPs, ...)
        if self.sighting is None:
            return True
        if state.epoch >= self.sighting.epoch:
            # The holder's pod (or the next one, of a hand-out whose lease write has not
            # been seen yet) starting or running.
            return state.gone or state.terminating or state.terminated
        # A replaced runner's pod, still there: to delete, unless we already asked.
        return not self.is_deleting(state.name)

    def forget_pod(self, name: str) -> None:
        self.pods = tuple(pod for pod in self.pods if pod.name != name)
        self.unmark_deleting(name)

    def mark_deleting(self, name: str) -> None:
        if self.deleting is None:
            self.deleting = set()
        self.deleting.add(name)

    def unmark_deleting(self, name: str) -> None:
        if self.deleting is not None:
            self.deleting.discard(name)
            if not self.deleting:
                self.deleting = None

    def is_deleting(self, name: str) -> bool:
        return self.deleting is not None and name in self.deleting


class TaskCache:
    """Every Task's entry, and the runner pods seen before their Task (a listing's order:
    the runner informers start first), handed over when it comes."""

    def __init__(self, *, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._entries: dict[TaskKey, TaskEntry] = {}
        self._orphan_pods: dict[TaskKey, tuple[PodState, ...]] = {}

    def get(self, key: TaskKey) -> TaskEntry | None:
        return self._entries.get(key)

    def entry(self, key: TaskKey) -> TaskEntry:
        """The Task's entry, new (with its pods seen so far) when it had none."""
        entry = self._entries.get(key)
        if entry is None:
            entry = TaskEntry(key=key, pods=self._orphan_pods.pop(key, ()))
            self._entries[key] = entry
        return entry

    def forget(self, key: TaskKey) -> TaskEntry | None:
        """The Task was deleted: its entry, no longer kept."""
        self._orphan_pods.pop(key, None)
        return self._entries.pop(key, None)

    def hold_orphan(self, key: TaskKey, state: PodState) -> None:
        """A runner pod of a Task not seen yet."""
        self._orphan_pods[key] = with_pod(self._orphan_pods.get(key, ()), state)

    # Figures for the metrics' scrape (metrics.TaskCache), computed on demand.

    def phase_counts(self) -> dict[Phase, int]:
        counts: dict[Phase, int] = {}
        # Called from the metrics server's thread: list() copies the values in one step
        # under the GIL, iterating the live dict would fail when the loop adds a Task.
        for entry in list(self._entries.values()):
            if entry.phase is not None:
                counts[entry.phase] = counts.get(entry.phase, 0) + 1
        return counts

    def overdue_counts(self) -> dict[Phase, int]:
        """Tasks Pending or Assigned for longer than they should be (`overdue_at`)."""
        now = self._monotonic()
        counts: dict[Phase, int] = {}
        for entry in list(self._entries.values()):  # another thread; see phase_counts
            if entry.overdue_at is not None and entry.phase is not None and now > entry.overdue_at:
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


# An operator times a lease out at its deadline, within a second: a Task still Assigned this
# long after its ack window is one the operator is not acting on.
OVERDUE_GRACE_S = 30.0


def overdue_at(task: Task, sighting: Sighting, *, now: float, wall: datetime) -> float | None:
    """When `task`, just seen in its phase at `now` (monotonic), will be overdue: Assigned
    (or handed out and not yet recorded) past its ack window from the hand-out as this
    process saw it, or Pending for an ack window after its backoff, without a hand-out;
    plus OVERDUE_GRACE_S. None for the other phases, and for pool Tasks while Pending
    (waiting for a claim is the pool's queue)."""
    status = task.status
    window = task.spec.ack_timeout.total_seconds() + OVERDUE_GRACE_S
    lease = task.lease
    # Handed out, the status not yet recorded (put off during a burst of hand-outs): as
    # good as Assigned.
    handed_out = lease.holder is not None and lease.epoch > status.epoch
    if status.phase == Phase.ASSIGNED or (status.phase == Phase.PENDING and handed_out):
        return sighting.epoch_seen_at + window
    if status.phase == Phase.PENDING and not task.is_pool_task:
        retry = status.next_attempt_time
        backoff = max(0.0, (retry - wall).total_seconds()) if retry is not None else 0.0
        return now + backoff + window
    return None


def runner_pod_seen(
    event_type: str | None, body: dict[str, Any]
) -> tuple[TaskKey, PodState] | None:
    """The Task a runner pod belongs to (its controlling owner) and the pod's state as the
    core reads it; None for a pod that is no Task's runner."""
    metadata = body.get("metadata", {})
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
        return None
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
        disruption=disruption_of(status),
        grace_ends=metadata.get("deletionTimestamp"),
    )
    return (metadata.get("namespace", ""), owner.get("name", "")), state


def disruption_of(status: dict[str, Any]) -> str | None:
    """A pod's DisruptionTarget condition as "reason: message" (evicted, preempted, deleted
    with its lost node), None when it has none."""
    for condition in status.get("conditions") or ():
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            reason = condition.get("reason") or "DisruptionTarget"
            message = condition.get("message")
            return f"{reason}: {message}" if message else reason
    return None


def with_pod(pods: tuple[PodState, ...], state: PodState) -> tuple[PodState, ...]:
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
