"""The runner SDK's writes as it sends them, to a fake Task API that records each JSON Patch.
What the API server and the operator make of them is tested on a real API server
(tests/integration/test_lease_protocol.py); here, what goes into one write."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.runner import Identity, TaskLease

A = {"row": 42, "file": "part-0007"}
B = {"row": 57, "file": "part-0009"}


@dataclass
class Response:
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


class FakeTaskApi:
    """The CustomObjectsApi calls the SDK makes: records each status patch, or raises the
    next of `failures` instead."""

    def __init__(self) -> None:
        self.patches: list[list[dict[str, Any]]] = []
        self.failures: list[Exception] = []
        self.task = {
            "metadata": {
                "name": "job",
                "annotations": {"tasklease.io/epoch": "3", "tasklease.io/holder": "job-3"},
            },
            "spec": {"heartbeatInterval": "1h"},
        }

    def get_namespaced_custom_object(self, *_args: Any, **_options: Any) -> Response:
        return Response(json.dumps(self.task).encode())

    def patch_namespaced_custom_object_status(self, *args: Any, **_options: Any) -> Response:
        if self.failures:
            raise self.failures.pop(0)
        self.patches.append(args[5])
        return Response(json.dumps(self.task).encode())

    def written(self, index: int = -1) -> dict[str, Any]:
        """What patch `index` writes, by path (its `test` fence left out)."""
        return {op["path"]: op["value"] for op in self.patches[index] if op["op"] != "test"}


def started(
    monkeypatch: pytest.MonkeyPatch, *, checkpoint: Any = None
) -> tuple[TaskLease, FakeTaskApi]:
    identity = Identity(
        task="job", namespace="ns", epoch=3, pod_name="job-3", checkpoint=checkpoint
    )
    lease = TaskLease(
        identity,
        api_client=client.ApiClient(),
        wall=lambda: datetime(2026, 11, 28, 12, tzinfo=UTC),
    )
    api = FakeTaskApi()
    monkeypatch.setattr(lease, "_api", api)
    lease.start()
    return lease, api


def test_fail_writes_its_checkpoint_and_the_result_in_one_fenced_patch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease, api = started(monkeypatch)
    try:
        assert lease.progress(percent=42, checkpoint=A)
        reports = len(api.patches)
        lease.fail("Transient", "connection reset", checkpoint=B)
    finally:
        lease.close()
    assert len(api.patches) == reports + 1
    fence = [op["op"] for op in api.patches[-1]][:2]
    assert fence == ["test", "test"]
    written = api.written()
    assert list(written) == ["/status/progress", "/status/result"]
    progress, result = written["/status/progress"], written["/status/result"]
    assert progress == {
        "epoch": 3,
        "percent": 42.0,
        "checkpoint": B,
        "reportTime": result["reportTime"],
    }
    assert (result["epoch"], result["status"], result["errorId"]) == (3, "FAILED", "Transient")


def test_fail_carries_a_checkpoint_whose_report_was_not_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease, api = started(monkeypatch)
    try:
        api.failures.append(ApiException(status=503))
        assert lease.progress(checkpoint=A) is False  # only a heartbeat would send it again
        lease.fail("Transient", "connection reset")
    finally:
        lease.close()
    assert api.written()["/status/progress"]["checkpoint"] == A
    assert api.written()["/status/result"]["status"] == "FAILED"


def test_fail_with_a_checkpoint_of_none_starts_the_next_attempt_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease, api = started(monkeypatch, checkpoint=A)
    try:
        lease.fail("BadState", "start over", checkpoint=None)
    finally:
        lease.close()
    assert api.written()["/status/progress"]["checkpoint"] is None


def test_an_attempt_hands_on_the_checkpoint_it_was_given_until_it_sets_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease, api = started(monkeypatch, checkpoint=A)
    try:
        assert api.written(0)["/status/progress"]["checkpoint"] == A  # the acknowledgement
        lease.fail("Transient", "failed before any progress")
    finally:
        lease.close()
    assert api.written()["/status/progress"]["checkpoint"] == A


@pytest.mark.parametrize("outcome", ["succeed", "skip"])
def test_other_results_are_written_alone(monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
    lease, api = started(monkeypatch)
    try:
        lease.progress(checkpoint=A)
        getattr(lease, outcome)()
    finally:
        lease.close()
    assert list(api.written()) == ["/status/result"]
