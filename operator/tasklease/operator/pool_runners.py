"""Pool runners' liveness (AWS ReportTaskRunnerHeartbeat), as the operator judges it.

A pool runner renews a `coordination.k8s.io` Lease of its own. The operator times the
renewals on its own monotonic clock, from when it saw each one (design invariant 3: never a
runner's clock against ours), and a runner whose pod ended or was deleted is gone at once
(invariant 7). The Tasks a runner holds are indexed by runner, so that its going wakes
exactly those Tasks, and the core sees the runner as the pod of each: alive while its Lease
is, gone with the reason otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tasklease.api.models import Task
from tasklease.lease.core import PodState
from tasklease.operator.cache import TaskEntry, TaskKey, disruption_of

RunnerKey = tuple[str, str]  # (namespace, the runner's pod and Lease name)
_NO_TASKS: frozenset[TaskKey] = frozenset()


@dataclass(slots=True)
class _PoolRunner:
    """A pool runner as the operator saw it: its Lease renewals on our monotonic clock."""

    renew_seen_at: float
    duration_s: float
    renew_time: str | None = None
    gone: str | None = None  # why it is gone, once its Lease or pod is
    disruption: str | None = None  # its pod's DisruptionTarget condition

    def expires_at(self) -> float:
        return self.renew_seen_at + self.duration_s


class PoolRunners:
    """The pool runners seen, and the Tasks each holds."""

    def __init__(self, *, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._runners: dict[RunnerKey, _PoolRunner] = {}
        self._held_by: dict[RunnerKey, set[TaskKey]] = {}

    def lease_seen(self, event_type: str | None, body: dict[str, Any]) -> Iterable[TaskKey]:
        """A runner's Lease was written or deleted; the Tasks it holds, to decide on again."""
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
        return self._held_by.get(key, _NO_TASKS)

    def pod_seen(self, event_type: str | None, body: dict[str, Any]) -> Iterable[TaskKey]:
        """A runner's pod changed; the Tasks it holds when that ends the runner."""
        metadata = body.get("metadata", {})
        key = (metadata.get("namespace", ""), metadata.get("name", ""))
        status = body.get("status") or {}
        phase = status.get("phase")
        disruption = disruption_of(status)
        if disruption is not None and key in self._runners:
            self._runners[key].disruption = disruption
        why = None
        if event_type == "DELETED":
            why = f"pool runner pod {key[1]} was deleted"
        elif phase in ("Succeeded", "Failed"):
            why = f"pool runner pod {key[1]} ended ({phase})"
        if why is None:
            return _NO_TASKS
        runner = self._runners.setdefault(key, _PoolRunner(self._monotonic(), 0.0))
        runner.gone = why
        runner.disruption = disruption or runner.disruption
        return self._held_by.get(key, _NO_TASKS)

    def holder_state(self, task: Task) -> tuple[PodState | None, float | None]:
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
        gone = PodState(
            name=holder,
            epoch=task.lease.epoch,
            gone=True,
            message=message,
            disruption=runner.disruption,
        )
        return gone, None

    def index(self, entry: TaskEntry, holder: str | None) -> None:
        """Keep the index in step with the lease annotations: `holder` is the pool runner
        holding the Task now, None for none (or a pod)."""
        previous = entry.indexed_holder
        if previous == holder:
            return
        namespace = entry.key[0]
        if previous is not None:
            held = self._held_by.get((namespace, previous))
            if held is not None:
                held.discard(entry.key)
                if not held:
                    del self._held_by[(namespace, previous)]
        if holder is not None:
            self._held_by.setdefault((namespace, holder), set()).add(entry.key)
        entry.indexed_holder = holder
