"""The Task CRD on a real API server: defaults, validation messages, explain, printing.

The unit tests prove the CRD is what the models render; these prove the API server reads
it as meant: it applies the defaults the models have, refuses what the models refuse and
names the offending field, and prints and explains Tasks the way users will see them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from subprocess import CompletedProcess
from typing import Any

import pytest

from tasklease.api.models import Task, TaskSpec

pytestmark = pytest.mark.cluster

Kubectl = Callable[..., CompletedProcess[str]]

TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"app": "export"}},
    "spec": {
        "serviceAccountName": "runner",
        "containers": [{"name": "runner", "image": "busybox", "args": ["sh", "-c", "true"]}],
    },
}


def task(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tasklease.io/v1alpha1",
        "kind": "Task",
        "metadata": {"name": name},
        "spec": {"template": TEMPLATE, **spec},
    }


def create(kubectl: Kubectl, namespace: str, body: dict[str, Any]) -> CompletedProcess[str]:
    return kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(body), check=False)


def get(kubectl: Kubectl, namespace: str, name: str = "demo") -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        kubectl("get", "task", name, "-n", namespace, "-o", "json").stdout
    )
    return result


def patch(
    kubectl: Kubectl, namespace: str, change: dict[str, Any], *, status: bool = False
) -> CompletedProcess[str]:
    subresource = ["--subresource=status"] if status else []
    return kubectl(
        "patch",
        "task",
        "demo",
        "-n",
        namespace,
        "--type=merge",
        *subresource,
        "-p",
        json.dumps(change),
        check=False,
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_valid_task_is_accepted_with_defaults(kubectl: Kubectl, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(task()))

    stored = get(kubectl, namespace)
    spec = stored["spec"]
    assert spec["ackTimeout"] == "2m"
    assert spec["reportProgressTimeout"] == "15m"
    assert spec["heartbeatInterval"] == "1m"
    assert spec["retry"]["maxAttempts"] == 3
    assert spec["retry"]["backoff"]["initial"] == "10s"
    assert spec["cancel"] is False
    # The pod template is kept as written, fields the partial schema does not name included.
    assert spec["template"] == TEMPLATE
    # The server's defaults are the models' defaults, field for field.
    assert Task.model_validate(stored).spec == TaskSpec.model_validate({"template": TEMPLATE})
    # Status is defaulted on read, so a task nobody has touched yet reads as Pending.
    assert stored["status"]["phase"] == "Pending"


REFUSALS = [
    pytest.param({"ackTimeout": "5m", "reportProgressTimeout": "1m"}, "spec.ackTimeout", id="ack"),
    pytest.param({"heartbeatInterval": "15m"}, "spec.heartbeatInterval", id="heartbeat-equal"),
    pytest.param(
        {"heartbeatInterval": "20m", "reportProgressTimeout": "10m"},
        "spec.heartbeatInterval",
        id="heartbeat-longer",
    ),
    pytest.param({"ackTimeout": "0s"}, "spec.ackTimeout", id="zero-ack"),
    pytest.param({"heartbeatInterval": "0s"}, "spec.heartbeatInterval", id="zero-heartbeat"),
    pytest.param({"attemptTimeout": "0s"}, "spec.attemptTimeout", id="zero-attempt-timeout"),
    pytest.param(
        {"reportProgressTimeout": "ten minutes"}, "spec.reportProgressTimeout", id="bad-duration"
    ),
    pytest.param({"lateAfter": "1d"}, "spec.lateAfter", id="day-unit"),
    pytest.param({"template": None}, "spec.workerGroup", id="neither-template-nor-group"),
    pytest.param(
        {"template": {"spec": {"containers": []}}},
        "spec.template.spec.containers",
        id="no-containers",
    ),
    pytest.param({"retry": {"maxAttempts": 0}}, "spec.retry.maxAttempts", id="no-attempts"),
    pytest.param(
        {"retry": {"backoff": {"jitter": 2}}}, "spec.retry.backoff.jitter", id="jitter-over-1"
    ),
    pytest.param({"workerGroup": "Pool_A"}, "spec.workerGroup", id="bad-worker-group"),
]


@pytest.mark.parametrize(("spec", "field"), REFUSALS)
def test_invalid_task_is_refused_naming_the_field(
    kubectl: Kubectl, namespace: str, spec: dict[str, Any], field: str
) -> None:
    body = task(**spec)
    body["spec"] = {key: value for key, value in body["spec"].items() if value is not None}

    result = create(kubectl, namespace, body)

    assert result.returncode != 0, f"accepted: {body['spec']}"
    assert field in result.stderr, result.stderr
    missing = kubectl("get", "task", "demo", "-n", namespace, check=False)
    assert "NotFound" in missing.stderr


def test_cancel_cannot_be_undone(kubectl: Kubectl, namespace: str) -> None:
    assert create(kubectl, namespace, task()).returncode == 0
    assert patch(kubectl, namespace, {"spec": {"cancel": True}}).returncode == 0

    undo = patch(kubectl, namespace, {"spec": {"cancel": False}})
    assert undo.returncode != 0
    assert "spec.cancel" in undo.stderr
    assert "cannot be uncanceled" in undo.stderr
    # Removing the field defaults it back to false, which is the same undo.
    removed = patch(kubectl, namespace, {"spec": {"cancel": None}})
    assert removed.returncode != 0
    assert "cannot be uncanceled" in removed.stderr
    assert get(kubectl, namespace)["spec"]["cancel"] is True


def test_status_written_by_a_runner_is_validated(kubectl: Kubectl, namespace: str) -> None:
    assert create(kubectl, namespace, task()).returncode == 0

    too_much = patch(
        kubectl, namespace, {"status": {"progress": {"epoch": 1, "percent": 150}}}, status=True
    )
    assert too_much.returncode != 0
    assert "status.progress.percent" in too_much.stderr

    checkpoint = {"offset": 12, "files": ["a", "b"], "nested": {"ok": True}}
    report = {"epoch": 1, "percent": 40, "checkpoint": checkpoint}
    assert patch(kubectl, namespace, {"status": {"progress": report}}, status=True).returncode == 0
    assert get(kubectl, namespace)["status"]["progress"]["checkpoint"] == checkpoint


def explain(kubectl: Kubectl, field: str) -> str:
    """`kubectl explain`, retried while the API server publishes the new CRD's OpenAPI."""
    deadline = time.monotonic() + 30
    while True:
        result = kubectl("explain", field, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return result.stdout
        time.sleep(0.5)


def test_kubectl_explain_reads_well(kubectl: Kubectl) -> None:
    retry = one_line(explain(kubectl, "task.spec.retry"))
    assert "maxAttempts" in retry
    assert "Attempts in all, the first one included (AWS maximumRetries + 1)." in retry

    spec = one_line(explain(kubectl, "task.spec"))
    assert "ackTimeout" in spec
    assert "How long a new runner has to acknowledge the task" in spec

    top = one_line(explain(kubectl, "task"))
    assert "A unit of work handed to one runner at a time under a heartbeat lease." in top


def test_printer_columns(kubectl: Kubectl, namespace: str) -> None:
    assert create(kubectl, namespace, task()).returncode == 0
    status = {
        "phase": "Running",
        "attempt": 1,
        "epoch": 1,
        "holder": "demo-1",
        "progress": {"epoch": 1, "percent": 42.5, "reportTime": "2024-06-11T02:20:00Z"},
    }
    assert patch(kubectl, namespace, {"status": status}, status=True).returncode == 0

    header, row = kubectl("get", "tasks", "-n", namespace).stdout.splitlines()

    assert re.split(r"\s{2,}", header.strip()) == [
        "NAME",
        "PHASE",
        "PROGRESS",
        "HOLDER",
        "ATTEMPT",
        "LAST REPORT",
        "AGE",
    ]
    assert row.split()[:5] == ["demo", "Running", "42.5", "demo-1", "1"]


def test_short_name_and_category(kubectl: Kubectl, namespace: str) -> None:
    assert create(kubectl, namespace, task()).returncode == 0

    for resource in ("tl", "tasklease", "tasks.tasklease.io"):
        listed = kubectl("get", resource, "-n", namespace, "-o", "name").stdout.split()
        assert listed == ["task.tasklease.io/demo"], resource
