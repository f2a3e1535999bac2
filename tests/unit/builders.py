"""Test data for the pure lease core: Task bodies, a fake clock, and a step-by-step driver.

`task_body` builds a Task the way the API server would hand it over (camelCase, metadata,
lease annotations); `make_task` parses it. `apply` performs a decision's Task writes the way
the API server's JSON merge patch would (None deletes a key, lists are replaced), so a test
can drive the state machine like the real reconciler: observe -> decide -> apply -> observe.
`Harness` does exactly that, with runner pods, runner writes and fake time.

Nothing here sleeps or reads a real clock.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    API_VERSION,
    EPOCH_ANNOTATION,
    EPOCH_LABEL,
    HOLDER_ANNOTATION,
    KIND,
    Task,
)
from tasklease.lease.core import (
    FAILED_CREATE,
    POD_REJECTED,
    Action,
    Clock,
    CreatePod,
    Decision,
    DeletePod,
    PatchLease,
    PatchStatus,
    PodState,
    Sighting,
    decide,
    observe,
    stale_pod,
)

NAME = "demo"
NAMESPACE = "jobs"
UID = "6f1c2a9e-0d4b-4c55-9a53-1e7f3b2d8c10"
CREATED = datetime(2024, 1, 1, tzinfo=UTC)
MONOTONIC_START = 1_000.0

A = TypeVar("A")

TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"app": "demo"}, "annotations": {"team": "data"}},
    "spec": {
        "containers": [
            {
                "name": "main",
                "image": "busybox",
                "command": ["sh", "-c", "echo hi"],
                "env": [{"name": "USER_SETTING", "value": "1"}],
            }
        ]
    },
}


def iso(when: datetime) -> str:
    """RFC 3339 with a Z, as the API server writes timestamps."""
    return when.isoformat().replace("+00:00", "Z")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, None deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def task_body(
    *,
    name: str = NAME,
    holder: str | None = None,
    epoch: int | None = None,
    acquire_time: datetime | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A Task body as the API server returns it; `overrides` are merge-patched on top.

    `overrides` take camelCase top-level keys (`spec`, `status`, `metadata`); the lease
    shortcuts write the annotations.
    """
    annotations: dict[str, str] = {}
    if holder is not None:
        annotations[HOLDER_ANNOTATION] = holder
    if epoch is not None:
        annotations[EPOCH_ANNOTATION] = str(epoch)
    if acquire_time is not None:
        annotations[ACQUIRE_TIME_ANNOTATION] = iso(acquire_time)
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": UID,
            "creationTimestamp": iso(CREATED),
            "generation": 1,
            "resourceVersion": "1",
            "annotations": annotations,
        },
        "spec": {"template": copy.deepcopy(TEMPLATE), "parameters": {"date": "2024-01-01"}},
        "status": {},
    }
    result: dict[str, Any] = merge_patch(body, overrides)
    return result


def make_task(**overrides: Any) -> Task:
    """`task_body(**overrides)`, parsed."""
    return Task.model_validate(task_body(**overrides))


def parse(body: dict[str, Any]) -> Task:
    return Task.model_validate(body)


def apply(body: dict[str, Any], actions: Decision | Iterable[Action]) -> dict[str, Any]:
    """The Task after the decision's Task writes (pod actions and events are not Task writes)."""
    steps = actions.actions if isinstance(actions, Decision) else tuple(actions)
    updated = copy.deepcopy(body)
    for action in steps:
        if isinstance(action, PatchLease):
            metadata_patch: dict[str, Any] = {"annotations": action.annotations}
            if action.labels:
                metadata_patch["labels"] = action.labels
            updated = merge_patch(updated, {"metadata": metadata_patch})
        elif isinstance(action, PatchStatus):
            updated = merge_patch(updated, {"status": action.status})
        else:
            continue
        metadata = updated["metadata"]
        metadata["resourceVersion"] = str(int(metadata.get("resourceVersion", "0")) + 1)
    return updated


def of_type(decision: Decision, kind: type[A]) -> list[A]:
    return [a for a in decision.actions if isinstance(a, kind)]


def kinds(decision: Decision) -> list[str]:
    """The action types in order, for asserting the shape of a decision."""
    return [type(a).__name__ for a in decision.actions]


def only(decision: Decision, kind: type[A]) -> A:
    found = of_type(decision, kind)
    assert len(found) == 1, f"expected one {kind.__name__} in {kinds(decision)}"
    return found[0]


@dataclass
class FakeClock:
    """Both clocks of the operator; they move together unless a test says otherwise."""

    monotonic: float = MONOTONIC_START
    wall: datetime = CREATED

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += timedelta(seconds=seconds)

    def advance_to(self, monotonic: float) -> None:
        """Exactly to `monotonic` (no float drift), the wall clock along."""
        self.wall += timedelta(seconds=monotonic - self.monotonic)
        self.monotonic = monotonic

    def now(self) -> Clock:
        return Clock(monotonic=self.monotonic, wall=self.wall)


@dataclass
class Harness:
    """Drives one Task through the core like the reconciler does, with fake time and pods."""

    body: dict[str, Any]
    clock: FakeClock = field(default_factory=FakeClock)
    sighting: Sighting | None = None
    pods: dict[str, PodState] = field(default_factory=dict)
    created_pods: list[str] = field(default_factory=list)
    deleted_pods: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    @classmethod
    def new(cls, **overrides: Any) -> Harness:
        harness = cls(body=task_body(**overrides))
        harness.observe()
        return harness

    # --- the operator ---------------------------------------------------------------------

    @property
    def task(self) -> Task:
        return parse(self.body)

    def observe(self) -> Sighting:
        self.sighting = observe(self.sighting, self.task, now=self.clock.monotonic)
        return self.sighting

    def restart_operator(self) -> None:
        """A new operator process: no sightings; the pod cache is rebuilt by the listing."""
        self.sighting = None
        self.observe()

    def pod(self) -> PodState | None:
        """The current epoch's runner pod, as the reconciler picks it."""
        epoch = self.task.lease.epoch
        return next((p for p in self.pods.values() if p.epoch == epoch), None)

    def decide(self) -> Decision:
        """What the core wants now, without performing it."""
        sighting = self.observe()
        return decide(self.task, sighting=sighting, pod=self.pod(), clock=self.clock.now())

    def perform(self, decision: Decision, *, crash_after: int | None = None) -> None:
        """Execute the decision's actions in order; `crash_after` stops after that many."""
        actions = decision.actions if crash_after is None else decision.actions[:crash_after]
        self.body = apply(self.body, actions)
        for action in actions:
            if isinstance(action, CreatePod):
                metadata = action.manifest["metadata"]
                name = metadata["name"]
                if name not in self.pods or self.pods[name].reason in (FAILED_CREATE, POD_REJECTED):
                    # AlreadyExists is fine; a pod whose creation was refused was never made
                    epoch = int(metadata["labels"][EPOCH_LABEL])
                    self.pods[name] = PodState(name=name, epoch=epoch)
                    self.created_pods.append(name)
            elif isinstance(action, DeletePod):
                self._delete_pod(action.name)
        self.observe()

    def step(self) -> Decision:
        """One reconcile step: stop stale pods, decide, perform."""
        self.stop_stale_pods()
        decision = self.decide()
        self.decisions.append(decision)
        self.perform(decision)
        return decision

    def settle(self, *, max_steps: int = 8) -> list[Decision]:
        """Step until a decision writes nothing (the reconciler's loop); return the steps."""
        steps: list[Decision] = []
        for _ in range(max_steps):
            decision = self.step()
            steps.append(decision)
            if not decision.actions:
                return steps
        raise AssertionError(f"no quiescence after {max_steps} steps: {[d.why for d in steps]}")

    def wake_at(self) -> float | None:
        return self.decide().wake_at

    def stop_stale_pods(self) -> list[str]:
        task = self.task
        stopped = [
            p.name
            for p in self.pods.values()
            if not p.gone and not p.terminating and stale_pod(task, p, now=self.clock.wall)
        ]
        for name in stopped:
            self._delete_pod(name)
        return stopped

    def _delete_pod(self, name: str) -> None:
        pod = self.pods.get(name)
        if pod is not None and not pod.gone:
            self.pods[name] = replace(pod, terminating=True)
            self.deleted_pods.append(name)

    # --- the world ------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def advance_to(self, monotonic: float) -> None:
        self.clock.advance_to(monotonic)

    def report(self, *, epoch: int | None = None, **progress: Any) -> None:
        """The runner replaces status.progress (fencing is the API server's job, not modelled)."""
        progress.setdefault("percent", 0)
        self.body["status"]["progress"] = {"epoch": epoch or self.task.lease.epoch, **progress}
        self.observe()

    def write_result(self, status: str, *, epoch: int | None = None, **fields: Any) -> None:
        result = {"epoch": epoch or self.task.lease.epoch, "status": status, **fields}
        self.body["status"]["result"] = result
        self.observe()

    def set_spec(self, **spec: Any) -> None:
        self.body = merge_patch(self.body, {"spec": spec})
        self.body["metadata"]["generation"] += 1
        self.observe()

    def pod_changes(self, name: str | None = None, **changes: Any) -> PodState:
        """The current (or named) runner pod changes, e.g. phase="Failed", gone=True."""
        pod = self.pods[name] if name is not None else self.pod()
        assert pod is not None, "no runner pod"
        updated = replace(pod, **changes)
        self.pods[pod.name] = updated
        return updated
