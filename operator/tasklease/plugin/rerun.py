"""`kubectl tasklease rerun`: a new Task from an old one, its spec kept.

Only what the Task's author wrote is copied: the spec, labels and annotations. The lease
(the holder, epoch, acquire-time and previous-attempt annotations), the pool labels the
operator sets, the status (and with it the last checkpoint: a rerun starts from scratch),
owner references and finalizers stay behind; so does `spec.cancel`, or a rerun of a
canceled Task would be canceled at birth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    API_VERSION,
    CLAIMABLE_LABEL,
    EPOCH_ANNOTATION,
    HOLDER_ANNOTATION,
    KIND,
    PREVIOUS_ATTEMPT_ANNOTATION,
    WORKER_GROUP_LABEL,
)

# What the operator writes on a Task, never its author.
LEASE_ANNOTATIONS = frozenset(
    {HOLDER_ANNOTATION, EPOCH_ANNOTATION, ACQUIRE_TIME_ANNOTATION, PREVIOUS_ATTEMPT_ANNOTATION}
)
OPERATOR_LABELS = frozenset({CLAIMABLE_LABEL, WORKER_GROUP_LABEL})
# kubectl apply's record of the last applied object: it names the old Task, and would make
# a later `kubectl apply` of the new one compute its patch against the wrong object.
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"
RERUN_SUFFIX = "-rerun-"
# The API server appends five random characters to generateName.
_GENERATED_SUFFIX_LENGTH = 5
# Task names end up in label values (the runner pods' tasklease.io/task), which hold 63.
_MAX_NAME = 63


def rerun_manifest(task: Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """The new Task: named `name`, else `<old name>-rerun-<5 random characters>` by the API
    server (generateName)."""
    metadata = task.get("metadata") or {}
    labels = {
        key: value
        for key, value in (metadata.get("labels") or {}).items()
        if key not in OPERATOR_LABELS
    }
    annotations = {
        key: value
        for key, value in (metadata.get("annotations") or {}).items()
        if key not in LEASE_ANNOTATIONS and key != LAST_APPLIED_ANNOTATION
    }
    new_metadata: dict[str, Any] = {}
    if name is not None:
        new_metadata["name"] = name
    else:
        new_metadata["generateName"] = rerun_prefix(str(metadata.get("name", "task")))
    if labels:
        new_metadata["labels"] = labels
    if annotations:
        new_metadata["annotations"] = annotations
    spec = {key: value for key, value in (task.get("spec") or {}).items() if key != "cancel"}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": new_metadata, "spec": spec}


def rerun_prefix(name: str) -> str:
    """`<name>-rerun-`, the name shortened so that the generated one stays within 63."""
    keep = _MAX_NAME - _GENERATED_SUFFIX_LENGTH - len(RERUN_SUFFIX)
    return name[:keep].rstrip("-.") + RERUN_SUFFIX
