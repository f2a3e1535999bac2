"""Pod status as a kubelet reports it, for the status subresource: pure functions.

Only the first container runs, so `containerStatuses` has one entry. Pods share the host's
network, so `podIP` and `hostIP` are loopback. The patches are strategic-merge patches:
`conditions` merge by `type` (the PodScheduled condition the binding wrote survives), and
`containerStatuses` is an atomic list, replaced whole.

Exit codes follow container runtimes: a process killed by signal N reports 128 + N (SIGKILL:
137) and the container reason `Error`, 0 is `Completed`, anything else `Error`. A pod that
never got to start its process is Failed with a container reason saying why (StartError for
an exec failure, CreateContainerConfigError for an environment or credential problem) and
the same reason and message on the pod, where the operator reads them.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from tasklease.api.times import rfc3339
from tasklease.executor.env import LOCAL_IP

SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
RUNNING: Final = "Running"
TERMINAL_PHASES: Final = frozenset({SUCCEEDED, FAILED})
START_ERROR: Final = "StartError"
CONFIG_ERROR: Final = "CreateContainerConfigError"
START_FAILURE_EXIT_CODE: Final = 128  # what containerd reports for a StartError


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Exit:
    """How a process ended, as Kubernetes reports it."""

    code: int
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> Exit:
        """`Popen.returncode` is -N for a process killed by signal N."""
        if returncode < 0:
            return cls(code=128 - returncode, signal=-returncode)
        return cls(code=returncode)

    @property
    def reason(self) -> str:
        return "Completed" if self.code == 0 else "Error"

    @property
    def description(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with code {self.code}"


def conditions(
    pod: Mapping[str, Any], wanted: Mapping[str, tuple[bool, str | None]], at: str
) -> list[dict[str, Any]]:
    """The pod conditions to patch so that each type in `wanted` has its (status, reason):
    only those that change, stamped `at`. An unchanged condition keeps its transition time
    (PodScheduled, written by the binding, in particular)."""
    current = {
        condition.get("type"): condition
        for condition in (pod.get("status") or {}).get("conditions") or []
    }
    changed: list[dict[str, Any]] = []
    for type_, (status, reason) in wanted.items():
        text = "True" if status else "False"
        existing = current.get(type_) or {}
        if existing.get("status") == text and existing.get("reason") == reason:
            continue
        condition: dict[str, Any] = {"type": type_, "status": text, "lastTransitionTime": at}
        # null removes a reason the condition had before (strategic merge)
        condition["reason"] = reason
        changed.append(condition)
    return changed


def _first_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    first: Mapping[str, Any] = containers[0]
    return first


def _container_status(
    pod: Mapping[str, Any], *, container_id: str | None, state: dict[str, Any], ready: bool
) -> dict[str, Any]:
    container = _first_container(pod)
    status: dict[str, Any] = {
        "name": container.get("name", ""),
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }
    if container_id is not None:
        status["containerID"] = container_id
    return status


def _addresses(started: datetime) -> dict[str, Any]:
    return {
        "hostIP": LOCAL_IP,
        "hostIPs": [{"ip": LOCAL_IP}],
        "podIP": LOCAL_IP,
        "podIPs": [{"ip": LOCAL_IP}],
        "startTime": rfc3339(started),
    }


def running_status(
    pod: Mapping[str, Any], *, container_id: str, started_at: datetime
) -> dict[str, Any]:
    """The status patch for a pod whose process has started."""
    at = rfc3339(started_at)
    return {
        "status": {
            "phase": RUNNING,
            **_addresses(started_at),
            "conditions": conditions(
                pod,
                {
                    "PodScheduled": (True, None),
                    "PodReadyToStartContainers": (True, None),
                    "Initialized": (True, None),
                    "ContainersReady": (True, None),
                    "Ready": (True, None),
                },
                at,
            ),
            "containerStatuses": [
                _container_status(
                    pod,
                    container_id=container_id,
                    state={"running": {"startedAt": at}},
                    ready=True,
                )
            ],
        }
    }


def terminated_status(
    pod: Mapping[str, Any],
    *,
    container_id: str | None,
    started_at: datetime | None,
    finished_at: datetime,
    exit: Exit,
    reason: str | None = None,
    message: str | None = None,
    pod_reason: str | None = None,
    pod_message: str | None = None,
    force_failed: bool = False,
) -> dict[str, Any]:
    """The status patch for a pod whose process has ended (or never started).

    `reason` overrides the container's reason derived from the exit code; `force_failed`
    makes the pod Failed even on exit code 0 (the executor stopped it, as a kubelet's node
    shutdown does).
    """
    at = rfc3339(finished_at)
    terminated: dict[str, Any] = {
        "exitCode": exit.code,
        "reason": reason or exit.reason,
        "finishedAt": at,
    }
    if started_at is not None:
        terminated["startedAt"] = rfc3339(started_at)
    if exit.signal is not None:
        terminated["signal"] = exit.signal
    if message:
        terminated["message"] = message
    if container_id is not None:
        terminated["containerID"] = container_id
    status: dict[str, Any] = {
        "phase": SUCCEEDED if exit.code == 0 and not force_failed else FAILED,
        **_addresses(started_at or finished_at),
        "conditions": conditions(
            pod,
            {
                "PodScheduled": (True, None),
                "PodReadyToStartContainers": (False, None),
                "Initialized": (True, None),
                "ContainersReady": (False, "PodCompleted"),
                "Ready": (False, "PodCompleted"),
            },
            at,
        ),
        "containerStatuses": [
            _container_status(
                pod,
                container_id=container_id,
                state={"terminated": terminated},
                ready=False,
            )
        ],
    }
    if pod_reason is not None:
        status["reason"] = pod_reason
    if pod_message is not None:
        status["message"] = pod_message
    return {"status": status}


def start_failure_status(
    pod: Mapping[str, Any], *, reason: str, message: str, at: datetime
) -> dict[str, Any]:
    """The status patch for a pod whose process could not be started."""
    return terminated_status(
        pod,
        container_id=None,
        started_at=None,
        finished_at=at,
        exit=Exit(START_FAILURE_EXIT_CODE),
        reason=reason,
        message=message,
        pod_reason=reason,
        pod_message=message,
        force_failed=True,
    )


def should_bind(
    pod: Mapping[str, Any], *, node_labels: Mapping[str, str], selector_label: str | None
) -> bool:
    """Whether to bind an unscheduled pod to this node: it is alive and unbound, carries
    `selector_label` (unless None: take all pods), has no scheduling gates, and its
    `nodeSelector` (the one placement rule honoured here) matches the node's labels."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if spec.get("nodeName") or metadata.get("deletionTimestamp"):
        return False
    if (pod.get("status") or {}).get("phase") in TERMINAL_PHASES:
        return False
    if selector_label is not None and selector_label not in (metadata.get("labels") or {}):
        return False
    if spec.get("schedulingGates"):
        return False
    selector: Mapping[str, str] = spec.get("nodeSelector") or {}
    return all(node_labels.get(key) == value for key, value in selector.items())
