"""The Task CRD on a real API server: defaults, validation messages, explain, printing.

The unit tests prove the CRD is what the models render; these prove the API server reads
it as meant: it applies the defaults the models have, refuses what the models refuse and
names the offending field, and prints and explains Tasks the way users will see them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from subprocess import CompletedProcess
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from tasklease.api.models import (
    GROUP,
    MAX_PARAMETER_NAME_LENGTH,
    MAX_PARAMETERS,
    MAX_PARAMETERS_BYTES,
    PLURAL,
    VERSION,
    Task,
    TaskSpec,
)
from tests.readme import readme_block
from tests.waiting import wait_for

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
    pytest.param(
        {"template": None, "workerGroup": "etl", "replacementPolicy": "AfterTermination"},
        "spec.replacementPolicy",
        id="after-termination-in-a-pool",
    ),
    pytest.param(
        {"replacementPolicy": "WhenConvenient"}, "spec.replacementPolicy", id="bad-policy"
    ),
    pytest.param(
        {"retry": {"onDisruption": "Skip"}}, "spec.retry.onDisruption", id="bad-on-disruption"
    ),
    pytest.param({"ttlAfterFinished": "-1s"}, "spec.ttlAfterFinished", id="negative-ttl"),
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


# Accepted silently once (issue 19): each is refused now, by the API server, naming the field.
MIB = 1024 * 1024
WHOLE_MS = "must be a whole number of milliseconds"
TOO_LARGE = "must not exceed 16384 bytes of names and values"
INCONSISTENT = [
    pytest.param(
        {"workerGroup": "gpu"},
        "spec.workerGroup",
        "a pool task has no template",
        id="template-and-worker-group",
    ),
    pytest.param(
        {"retry": {"backoff": {"initial": "1m", "max": "30s"}}},
        "spec.retry.backoff.max",
        "must not be below spec.retry.backoff.initial",
        id="backoff-max-below-initial",
    ),
    pytest.param(
        {"retry": {"backoff": {"initial": "10m"}}},
        "spec.retry.backoff.max",
        "spec.retry.backoff.max (5m unless set)",
        id="backoff-initial-above-the-default-max",
    ),
    # Below the millisecond, for every duration: 1ns was reported as 1us.
    pytest.param({"ackTimeout": "1ns"}, "spec.ackTimeout", WHOLE_MS, id="ack-1ns"),
    pytest.param(
        {"reportProgressTimeout": "10m1us"},
        "spec.reportProgressTimeout",
        WHOLE_MS,
        id="progress-10m1us",
    ),
    pytest.param(
        {"heartbeatInterval": "1.5ms"}, "spec.heartbeatInterval", WHOLE_MS, id="heartbeat-1.5ms"
    ),
    pytest.param(
        {"attemptTimeout": "999999ns"}, "spec.attemptTimeout", WHOLE_MS, id="attempt-999999ns"
    ),
    pytest.param(
        {"activeDeadline": "1h0.0001s"}, "spec.activeDeadline", WHOLE_MS, id="deadline-100us"
    ),
    pytest.param({"lateAfter": "0.00001m"}, "spec.lateAfter", WHOLE_MS, id="late-600us"),
    pytest.param(
        {"retry": {"backoff": {"initial": "1us"}}},
        "spec.retry.backoff.initial",
        WHOLE_MS,
        id="initial-1us",
    ),
    pytest.param(
        {"retry": {"backoff": {"initial": "0s", "max": "500us"}}},
        "spec.retry.backoff.max",
        WHOLE_MS,
        id="max-500us",
    ),
    # Parameters reach the runner in one environment variable (at most 128 KiB).
    pytest.param(
        {"parameters": {f"p{i}": "x" for i in range(MAX_PARAMETERS + 1)}},
        "spec.parameters",
        f"must have at most {MAX_PARAMETERS} items",
        id="too-many-parameters",
    ),
    pytest.param(
        {"parameters": {"": "x"}},
        "spec.parameters",
        "parameter names must be 1 to 253 characters long",
        id="empty-parameter-name",
    ),
    pytest.param(
        {"parameters": {"n" * (MAX_PARAMETER_NAME_LENGTH + 1): "x"}},
        "spec.parameters",
        "parameter names must be 1 to 253 characters long",
        id="parameter-name-too-long",
    ),
    pytest.param(
        {"parameters": {"a": "x" * 10_000, "b": "x" * 10_000}},
        "spec.parameters",
        TOO_LARGE,
        id="parameters-too-large-for-the-environment",
    ),
    pytest.param(
        {"parameters": {"day": "é" * (MAX_PARAMETERS_BYTES // 2)}},
        "spec.parameters",
        TOO_LARGE,
        id="parameters-too-large-in-utf8",
    ),
    # 2 MiB: etcd refused it (ResourceExhausted) naming nothing; now the schema does first.
    pytest.param(
        {"parameters": {"blob": "x" * 2 * MIB}},
        "spec.parameters",
        "Too long: may not be more than 16384 bytes",
        id="2MiB-one-value",
    ),
    pytest.param(
        {"parameters": {f"p{i}": "x" * (2 * MIB // 256) for i in range(256)}},
        "spec.parameters",
        TOO_LARGE,
        id="2MiB-in-256-values",
    ),
]


def create_via_api(api: Any, namespace: str, body: dict[str, Any]) -> ApiException | None:
    """Create a Task with the API client (which, unlike kubectl, shows the HTTP status)."""
    try:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )
    except ApiException as error:
        return error
    return None


@pytest.mark.parametrize(("spec", "field", "says"), INCONSISTENT)
def test_inconsistent_specs_are_refused_naming_the_field(
    kube_config: Any,
    kubectl: Kubectl,
    namespace: str,
    spec: dict[str, Any],
    field: str,
    says: str,
) -> None:
    refusal = create_via_api(kube_config, namespace, task(**spec))

    assert refusal is not None, f"accepted: {spec}"
    assert refusal.status == 422, refusal.body[:2000]
    text = json.loads(refusal.body)["message"]
    # The field's path (or one below it: spec.parameters.blob), as the API server names it.
    assert re.search(rf"{re.escape(field)}(\.[\w.]+)?: ", text), text
    assert says in text, text
    assert "ResourceExhausted" not in text
    missing = kubectl("get", "task", "demo", "-n", namespace, check=False)
    assert "NotFound" in missing.stderr
    # The models refuse it too (the operator parses Tasks with them).
    with pytest.raises(ValidationError):
        TaskSpec.model_validate(task(**spec)["spec"])


def test_what_the_limits_admit_is_admitted_and_parses(kube_config: Any, namespace: str) -> None:
    """At each limit exactly: admitted by the API server, and the models accept the stored
    Task (an object admitted but refused by the models would get an Invalid condition)."""
    per_value = MAX_PARAMETERS_BYTES // MAX_PARAMETERS - 4  # names "p000" to "p255"
    bodies = {
        "most-parameters": task(
            "most-parameters",
            parameters={f"p{i:03d}": "x" * per_value for i in range(MAX_PARAMETERS)},
        ),
        "longest-name": task(
            "longest-name", parameters={"n" * MAX_PARAMETER_NAME_LENGTH: "x" * 100}
        ),
        "finest-durations": task(
            "finest-durations",
            ackTimeout="1ms",
            heartbeatInterval="1000us",
            reportProgressTimeout="1.001s",
            lateAfter="0.0001m",
            retry={"backoff": {"initial": "0s", "max": "0s"}},
        ),
        "pool-task": {**task("pool-task"), "spec": {"workerGroup": "gpu"}},
    }
    for name, body in bodies.items():
        assert create_via_api(kube_config, namespace, body) is None, name
        stored = client.CustomObjectsApi(kube_config).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        Task.model_validate(stored)


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
    explained = wait_for(
        f"kubectl explain {field}",
        lambda: kubectl("explain", field, check=False),
        until=lambda result: result.returncode == 0,
        interval=0.5,
    )
    return explained.stdout


def test_kubectl_explain_reads_well(kubectl: Kubectl) -> None:
    retry = one_line(explain(kubectl, "task.spec.retry"))
    assert "maxAttempts" in retry
    assert "Attempts in all, the first one included (AWS maximumRetries + 1)." in retry

    spec = one_line(explain(kubectl, "task.spec"))
    assert "ackTimeout" in spec
    assert "How long a new runner has to acknowledge the task" in spec

    # The limits a user can run into are stated where they look them up.
    parameters = one_line(explain(kubectl, "task.spec.parameters"))
    assert f"at most {MAX_PARAMETERS} parameters" in parameters
    assert f"{MAX_PARAMETERS_BYTES} bytes (16 KiB, UTF-8) of names and values in all" in parameters
    assert "must be whole milliseconds" in spec

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


ATTEMPT_POLICIES_MARKER = (
    "<!-- tests/integration/test_task_api.py creates a Task with this spec as it is -->"
)


def test_the_readmes_attempt_policies_are_accepted_as_written(
    kubectl: Kubectl, namespace: str
) -> None:
    """The README's attempt-policy block, with a pod template beside it, is a Task the API
    server accepts and keeps as written."""
    spec = yaml.safe_load(readme_block(ATTEMPT_POLICIES_MARKER, "yaml"))["spec"]
    result = create(kubectl, namespace, task("policies", **spec))
    assert result.returncode == 0, result.stderr
    stored = get(kubectl, namespace, "policies")["spec"]
    assert stored["replacementPolicy"] == spec["replacementPolicy"] == "AfterTermination"
    assert stored["ttlAfterFinished"] == spec["ttlAfterFinished"]
    assert {k: stored["retry"][k] for k in spec["retry"]} == spec["retry"]
