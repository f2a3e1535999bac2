"""The local executor's reports: pod status patches as a kubelet writes them, exit codes,
the binding decision, the Node and its Lease, a pod's credentials."""

from __future__ import annotations

import base64
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasklease.executor.credentials import (
    Endpoint,
    Token,
    parse_token,
    refresh_delay_s,
    token_request,
    write_credentials,
)
from tasklease.executor.node import LOCAL_EXECUTOR_LABEL, node_labels, node_lease, node_status
from tasklease.executor.status import (
    Exit,
    running_status,
    should_bind,
    start_failure_status,
    terminated_status,
)

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(seconds=7)
SCHEDULED = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2030-01-01T00:00:00Z"}


def pod(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u",
            "labels": {"tasklease.io/task": "t"},
        },
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Pending", "conditions": [SCHEDULED], **status},
    }


def by_type(patch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in patch["status"]["conditions"]}


@pytest.mark.parametrize(
    ("returncode", "code", "sig", "reason"),
    [
        (0, 0, None, "Completed"),
        (3, 3, None, "Error"),
        (-9, 137, 9, "Error"),
        (-15, 143, 15, "Error"),
    ],
)
def test_exit_codes_follow_container_runtimes(
    returncode: int, code: int, sig: int | None, reason: str
) -> None:
    result = Exit.from_returncode(returncode)
    assert (result.code, result.signal, result.reason) == (code, sig, reason)


def test_exit_description_names_the_signal() -> None:
    assert Exit.from_returncode(-signal.SIGKILL).description == "killed by SIGKILL"
    assert Exit.from_returncode(2).description == "exited with code 2"


def test_running_status_reports_the_container_running_and_the_pod_ready() -> None:
    patch = running_status(pod(), container_id="local://42", started_at=T0)
    status = patch["status"]
    assert status["phase"] == "Running"
    assert status["podIP"] == "127.0.0.1"
    assert status["startTime"] == "2030-01-02T03:04:05Z"
    container = status["containerStatuses"][0]
    assert container["name"] == "main"
    assert container["state"] == {"running": {"startedAt": "2030-01-02T03:04:05Z"}}
    assert container["ready"] is True
    conditions = by_type(patch)
    assert {t: c["status"] for t, c in conditions.items()} == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    # PodScheduled (written by the binding) is already right: its transition time stays.
    assert "PodScheduled" not in conditions


def test_terminated_status_after_running() -> None:
    running = running_status(pod(), container_id="local://42", started_at=T0)["status"]
    current = pod(**{**running, "conditions": [SCHEDULED, *running["conditions"]]})
    patch = terminated_status(
        current, container_id="local://42", started_at=T0, finished_at=T1, exit=Exit(3)
    )
    status = patch["status"]
    assert status["phase"] == "Failed"
    assert status["containerStatuses"][0]["state"] == {
        "terminated": {
            "exitCode": 3,
            "reason": "Error",
            "startedAt": "2030-01-02T03:04:05Z",
            "finishedAt": "2030-01-02T03:04:12Z",
            "containerID": "local://42",
        }
    }
    conditions = by_type(patch)
    assert set(conditions) == {"PodReadyToStartContainers", "ContainersReady", "Ready"}
    assert conditions["Ready"]["reason"] == "PodCompleted"
    assert "reason" not in status


def test_exit_zero_succeeds_unless_forced_failed() -> None:
    ok = terminated_status(pod(), container_id=None, started_at=T0, finished_at=T1, exit=Exit(0))
    assert ok["status"]["phase"] == "Succeeded"
    stopped = terminated_status(
        pod(),
        container_id=None,
        started_at=T0,
        finished_at=T1,
        exit=Exit(0),
        pod_reason="Terminated",
        pod_message="stopped",
        force_failed=True,
    )
    assert stopped["status"]["phase"] == "Failed"
    assert stopped["status"]["reason"] == "Terminated"


def test_killed_process_reports_its_signal() -> None:
    patch = terminated_status(
        pod(), container_id=None, started_at=T0, finished_at=T1, exit=Exit.from_returncode(-9)
    )
    terminated = patch["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["signal"]) == (137, 9)


def test_start_failure_fails_the_pod_with_reason_and_message() -> None:
    patch = start_failure_status(pod(), reason="StartError", message="no such file", at=T1)
    status = patch["status"]
    assert status["phase"] == "Failed"
    assert (status["reason"], status["message"]) == ("StartError", "no such file")
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 128
    assert "startedAt" not in terminated


LABELS = node_labels("tasklease-local")


@pytest.mark.parametrize(
    ("change", "selector", "expected"),
    [
        ({}, "tasklease.io/task", True),
        ({}, None, True),
        ({"metadata": {"labels": {}}}, "tasklease.io/task", False),
        ({"metadata": {"labels": {}}}, None, True),
        ({"spec": {"nodeName": "elsewhere"}}, None, False),
        ({"metadata": {"deletionTimestamp": "2030-01-01T00:00:00Z"}}, None, False),
        ({"status": {"phase": "Failed"}}, None, False),
        ({"spec": {"schedulingGates": [{"name": "g"}]}}, None, False),
        ({"spec": {"nodeSelector": {LOCAL_EXECUTOR_LABEL: "true"}}}, None, True),
        ({"spec": {"nodeSelector": {"disk": "ssd"}}}, None, False),
    ],
)
def test_binding_decision(change: dict[str, Any], selector: str | None, expected: bool) -> None:
    subject = pod()
    for part, values in change.items():
        subject[part] = {**subject[part], **values}
    assert should_bind(subject, node_labels=LABELS, selector_label=selector) is expected


def test_node_status_is_ready_with_capacity() -> None:
    capacity = {"cpu": "2", "memory": "100Ki", "pods": "110"}
    status = node_status(
        "n", capacity=capacity, ready=True, heartbeat=T1, transition=T0, message="ok"
    )["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert ready["lastHeartbeatTime"] == "2030-01-02T03:04:12Z"
    assert ready["lastTransitionTime"] == "2030-01-02T03:04:05Z"
    assert status["allocatable"] == capacity
    assert LABELS[LOCAL_EXECUTOR_LABEL] == "true"


def test_node_lease_is_owned_by_the_node() -> None:
    lease = node_lease("n", node_uid="uid-1", renew=T0)
    assert lease["metadata"]["namespace"] == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert lease["spec"]["renewTime"] == "2030-01-02T03:04:05.000000Z"
    assert lease["spec"]["holderIdentity"] == "n"


def test_token_request_binds_the_token_to_the_pod() -> None:
    body = token_request(pod_name="p", pod_uid="u", expiration_s=3600)
    assert body["spec"]["boundObjectRef"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "p",
        "uid": "u",
    }
    assert body["spec"]["expirationSeconds"] == 3600
    token = parse_token({"status": {"token": "abc", "expirationTimestamp": "2030-01-02T04:04:05Z"}})
    assert token == Token("abc", T0 + timedelta(hours=1))
    assert refresh_delay_s(token, now=T0) == pytest.approx(2880.0)
    assert refresh_delay_s(token, now=token.expires_at) == 10.0


def test_credentials_are_a_private_kubeconfig_reading_a_token_file(tmp_path: Path) -> None:
    endpoint = Endpoint(server="https://127.0.0.1:6443", ca_data=b"CA")
    folder = tmp_path / "pod"
    path = write_credentials(folder, endpoint=endpoint, token=Token("first", T0), namespace="ns")
    write_credentials(folder, endpoint=endpoint, token=Token("second", T1), namespace="ns")
    config = yaml.safe_load(path.read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    token_file = Path(config["users"][0]["user"]["tokenFile"])
    assert token_file.read_text() == "second"
    assert config["contexts"][0]["context"]["namespace"] == "ns"
    assert path.stat().st_mode & 0o777 == 0o600
    assert token_file.stat().st_mode & 0o777 == 0o600
