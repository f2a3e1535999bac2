"""Runner pods, built from a Task's template: pure functions, no API calls.

A pod's name is derived from the task and the epoch, so a hand-out retried after a crash
finds the pod it already created (AlreadyExists) instead of starting a second runner for
the same epoch (design invariant 6).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from tasklease.api.models import (
    API_VERSION,
    EPOCH_LABEL,
    KIND,
    ROLE_LABEL,
    RUNNER_ROLE,
    TASK_LABEL,
    Task,
)
from tasklease.api.runner_env import ENV_POD_NAME, RESERVED_ENV, runner_env

# The runner learns its pod's name from the pod itself (the downward API).
_POD_NAME_ENV: dict[str, Any] = {
    "name": ENV_POD_NAME,
    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
}

_MAX_NAME = 63  # pod names become hostnames, which DNS limits to one 63-character label


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def label_safe_task_name(task_name: str) -> str:
    """The task name as a label value: itself when it fits, else a truncation plus a hash."""
    if len(task_name) <= _MAX_NAME:
        return task_name
    return f"{task_name[: _MAX_NAME - 9].rstrip('-.')}-{_short_hash(task_name)}"


def runner_pod_name(task_name: str, epoch: int) -> str:
    suffix = f"-{epoch}"
    if len(task_name) + len(suffix) <= _MAX_NAME:
        return task_name + suffix
    keep = _MAX_NAME - len(suffix) - 9
    return f"{task_name[:keep].rstrip('-.')}-{_short_hash(task_name)}{suffix}"


def runner_pod(task: Task, *, epoch: int, attempt: int, checkpoint: Any) -> dict[str, Any]:
    """The pod manifest for one attempt of a pod-per-attempt Task."""
    template = task.spec.template
    if template is None:
        raise ValueError("a pool task (no spec.template) has no runner pod")
    template = copy.deepcopy(template)
    metadata = template.get("metadata") or {}
    pod_spec: dict[str, Any] = template["spec"]
    name = runner_pod_name(task.name, epoch)

    labels = dict(metadata.get("labels") or {})
    labels[TASK_LABEL] = label_safe_task_name(task.name)
    labels[EPOCH_LABEL] = str(epoch)
    labels[ROLE_LABEL] = RUNNER_ROLE

    variables = runner_env(
        task=task.name,
        namespace=task.namespace,
        epoch=epoch,
        attempt=attempt,
        pod_name="",
        parameters=task.spec.parameters,
        checkpoint=checkpoint,
    )
    identity_env = [
        _POD_NAME_ENV if name == ENV_POD_NAME else {"name": name, "value": value}
        for name, value in variables.items()
    ]
    for container in pod_spec.get("containers", []):
        # Ours come last so that a template cannot spoof the lease identity.
        user_env = [e for e in container.get("env") or [] if e.get("name") not in RESERVED_ENV]
        container["env"] = user_env + copy.deepcopy(identity_env)

    pod_spec["restartPolicy"] = "Never"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": task.namespace,
            "labels": labels,
            "annotations": dict(metadata.get("annotations") or {}),
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": task.name,
                    "uid": task.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }
