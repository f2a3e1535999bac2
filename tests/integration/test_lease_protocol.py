"""The lease protocol end to end, on a real API server with the operator as a process.

Each test plays the runner pod's part with the SDK from the test process, using the
identity the operator put into that pod; there is no kubelet here, so a test that needs a
pod to fail reports that through the pod's status itself.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import watch

from tasklease.api.models import GROUP, PLURAL, VERSION
from tasklease.api.times import parse_rfc3339
from tasklease.runner import LeaseLost, TaskLease
from tests.integration.chart_support import service_account_token, token_client
from tests.integration.support import (
    FAST_SPEC,
    RUNNER_TEMPLATE,
    Cluster,
    OperatorProcess,
    bind_runner,
    identity_from_pod,
    pod_env,
    raw_fenced_patch,
    unbind_runner,
    wait_for,
)

pytestmark = pytest.mark.cluster


def attempt_outcomes(status: dict[str, Any]) -> list[str | None]:
    return [a.get("outcome") for a in status.get("attempts", [])]


def test_handout_creates_runner_pod(cluster: Cluster, operator_process: OperatorProcess) -> None:
    created = cluster.create_task("hand", parameters={"table": "orders", "day": "2026-11-28"})
    status = cluster.wait_epoch("hand", 1)

    annotations = cluster.annotations("hand")
    assert annotations["tasklease.io/epoch"] == "1"
    assert annotations["tasklease.io/holder"] == "hand-1"
    assert annotations["tasklease.io/acquire-time"]
    assert status["phase"] == "Assigned"
    assert status["holder"] == "hand-1"
    assert status["attempt"] == 1

    pod = wait_for("runner pod hand-1", lambda: cluster.pod("hand-1"))
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid) == ("Task", "hand", created["metadata"]["uid"])
    assert owner.controller is True
    assert pod.metadata.labels["tasklease.io/task"] == "hand"
    assert pod.metadata.labels["tasklease.io/epoch"] == "1"
    assert pod.spec.restart_policy == "Never"
    env = {e.name: e for e in pod.spec.containers[0].env}
    assert env["TASKLEASE_TASK"].value == "hand"
    assert env["TASKLEASE_NAMESPACE"].value == cluster.namespace
    assert env["TASKLEASE_EPOCH"].value == "1"
    assert json.loads(env["TASKLEASE_PARAMETERS"].value) == {"table": "orders", "day": "2026-11-28"}
    assert env["TASKLEASE_POD_NAME"].value_from.field_ref.field_path == "metadata.name"
    assert "TASKLEASE_CHECKPOINT" not in env  # first attempt: nothing to resume from

    cluster.wait_events("hand", "HandedOut")
    assert len(cluster.pods("hand")) == 1


def test_first_report_acknowledges(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task("ack")
    cluster.wait_epoch("ack", 1)
    runner = cluster.runner("ack", epoch=1)
    with runner:
        status = cluster.wait_phase("ack", "Running")
        assert status["progress"]["epoch"] == 1
        leased = next(c for c in status["conditions"] if c["type"] == "Leased")
        assert (leased["status"], leased["reason"]) == ("True", "Running")
        cluster.wait_events("ack", "Acknowledged")
        runner.succeed()


def test_ack_timeout_reassigns(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task("silent", ackTimeout="2s", reportProgressTimeout="30s")
    cluster.wait_epoch("silent", 1)
    handed_out = time.monotonic()

    status = cluster.wait_epoch("silent", 2, timeout=20)
    waited = time.monotonic() - handed_out
    assert waited >= 1.5, f"reassigned after {waited:.1f}s, before ackTimeout (2s)"
    assert attempt_outcomes(status) == ["AckTimeout", None]
    assert cluster.annotations("silent")["tasklease.io/holder"] == "silent-2"
    wait_for("pod silent-1 to be deleted", lambda: cluster.live_pod("silent-1") is None)
    assert cluster.pod("silent-2") is not None
    cluster.wait_events("silent", "AckTimeout")


def test_progress_timeout_reassigns_hung_runner(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task("hung", ackTimeout="3s", reportProgressTimeout="3s", heartbeatInterval="1s")
    cluster.wait_epoch("hung", 1)
    # A runner that acknowledges and then hangs: no heartbeat thread worth the name.
    runner = cluster.runner("hung", epoch=1, heartbeat_interval_s=3600)
    runner.start()
    cluster.wait_phase("hung", "Running")
    last_report = time.monotonic()

    status = cluster.wait_epoch("hung", 2, timeout=20)
    silent_for = time.monotonic() - last_report
    assert silent_for >= 2.5, f"reassigned {silent_for:.1f}s after the last report, before 3s"
    assert attempt_outcomes(status) == ["ProgressTimeout", None]
    # The hung pod was alive the whole time (phase Pending/Running): Kubernetes Jobs would
    # never have replaced it. The operator stops it.
    wait_for("hung pod to be deleted", lambda: cluster.live_pod("hung-1") is None)
    runner.close()


@pytest.mark.parametrize("fate", ["failed", "evicted", "deleted"])
def test_dead_pod_reassigns_without_waiting(
    cluster: Cluster, operator_process: OperatorProcess, fate: str
) -> None:
    # Timeouts far longer than the test: only the dead-pod path can end the attempt.
    cluster.create_task(
        "dies", ackTimeout="5m", reportProgressTimeout="10m", heartbeatInterval="1m"
    )
    cluster.wait_epoch("dies", 1)
    runner = cluster.runner("dies", epoch=1, heartbeat_interval_s=3600)
    runner.start()
    cluster.wait_phase("dies", "Running")

    started = time.monotonic()
    if fate == "failed":
        cluster.set_pod_phase("dies-1", "Failed", reason="Error")
        expected = "PodFailed"
    elif fate == "evicted":
        cluster.set_pod_phase("dies-1", "Failed", reason="Evicted")
        expected = "PodFailed"
    else:
        cluster.core.delete_namespaced_pod("dies-1", cluster.namespace, grace_period_seconds=0)
        expected = "PodLost"

    status = cluster.wait_epoch("dies", 2, timeout=15)
    assert time.monotonic() - started < 10
    assert attempt_outcomes(status) == [expected, None]
    if fate == "evicted":
        assert "Evicted" in status["attempts"][0]["message"]
    # The dead runner's lease is gone: its writes are refused.
    assert not runner.report()
    assert runner.lost


def test_result_finished_succeeds(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task("fin")
    cluster.wait_epoch("fin", 1)
    with cluster.runner("fin", epoch=1) as runner:
        runner.progress(percent=50, message="half way", fields={"rows": "500"})
        runner.progress(percent=100, message="done")
    status = cluster.wait_phase("fin", "Succeeded")
    assert status["result"]["status"] == "FINISHED"
    assert status["progress"]["percent"] == 100
    assert attempt_outcomes(status) == ["Succeeded"]
    assert status["completionTime"]
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "Succeeded")
    wait_for("lease released", lambda: "tasklease.io/holder" not in cluster.annotations("fin"))
    cluster.wait_events("fin", "Succeeded")


def test_result_false_skips(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task("nothing-to-do")
    cluster.wait_epoch("nothing-to-do", 1)
    with cluster.runner("nothing-to-do", epoch=1) as runner:
        runner.skip("input partition is empty")
    status = cluster.wait_phase("nothing-to-do", "Skipped")
    assert attempt_outcomes(status) == ["Skipped"]


def test_non_retryable_error_fails_at_once(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task(
        "bad-input",
        retry={"maxAttempts": 3, "nonRetryableErrors": ["BadInput"], "backoff": {"initial": "0s"}},
    )
    cluster.wait_epoch("bad-input", 1)
    with cluster.runner("bad-input", epoch=1) as runner:
        runner.fail("BadInput", "column 'day' is missing")
    status = cluster.wait_phase("bad-input", "Failed")
    assert status["attempt"] == 1
    assert attempt_outcomes(status) == ["Failed"]
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert "BadInput" in complete["message"] and "nonRetryableErrors" in complete["message"]
    # The operator's last acts on a finished task: the lease released and the Event sent.
    # From a final phase nothing hands out again, so no second pod can come after them.
    wait_for(
        "the lease released",
        lambda: "tasklease.io/holder" not in cluster.annotations("bad-input"),
    )
    cluster.wait_events("bad-input", "Failed")
    assert len(cluster.pods("bad-input")) == 1  # no second attempt


def test_retries_exhausted_fails_task(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task("flaky", retry={"maxAttempts": 2, "backoff": {"initial": "0s"}})
    for epoch in (1, 2):
        cluster.wait_epoch("flaky", epoch)
        with cluster.runner("flaky", epoch=epoch) as runner:
            runner.fail("Timeout", f"upstream timed out on attempt {epoch}")
    status = cluster.wait_phase("flaky", "Failed")
    assert status["attempt"] == 2
    assert attempt_outcomes(status) == ["Failed", "Failed"]
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert "retries exhausted" in complete["message"]
    assert "upstream timed out on attempt 2" in complete["message"]


def test_exception_in_runner_block_becomes_failed_with_stack_trace(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task("boom", retry={"maxAttempts": 1})
    cluster.wait_epoch("boom", 1)
    with pytest.raises(ZeroDivisionError), cluster.runner("boom", epoch=1):
        _ = 1 / 0
    status = cluster.wait_phase("boom", "Failed")
    assert status["result"]["errorId"] == "ZeroDivisionError"
    assert "Traceback" in status["result"]["errorStackTrace"]


def test_retry_waits_for_backoff(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task(
        "patient", retry={"maxAttempts": 2, "backoff": {"initial": "3s", "jitter": 0}}
    )
    cluster.wait_epoch("patient", 1)
    with cluster.runner("patient", epoch=1) as runner:
        runner.fail("Transient", "try again later")
    failed_at = time.monotonic()
    pending = cluster.wait_phase("patient", "Pending")
    assert pending["nextAttemptTime"]
    cluster.wait_epoch("patient", 2, timeout=15)
    assert time.monotonic() - failed_at >= 2.5


def test_cancel_reaches_runner(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task("stopme", heartbeatInterval="1s")
    cluster.wait_epoch("stopme", 1)
    runner = cluster.runner("stopme", epoch=1, heartbeat_interval_s=0.3)
    with runner:
        cluster.wait_phase("stopme", "Running")
        assert not runner.canceled
        cluster.patch_spec("stopme", {"cancel": True})
        wait_for("the runner to learn it was canceled", lambda: runner.canceled, timeout=10)
        status = cluster.wait_phase("stopme", "Canceled")
        assert attempt_outcomes(status) == ["Canceled"]
        wait_for("the runner pod to be deleted", lambda: cluster.live_pod("stopme-1") is None)
    cluster.wait_events("stopme", "Canceled")


def test_zombie_runner_is_fenced(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task(
        "contested", ackTimeout="3s", reportProgressTimeout="3s", heartbeatInterval="1s"
    )
    cluster.wait_epoch("contested", 1)
    zombie = cluster.runner("contested", epoch=1, heartbeat_interval_s=3600)
    zombie.start()
    zombie.progress(percent=10, checkpoint={"row": 1})
    cluster.wait_phase("contested", "Running")
    cluster.wait_epoch("contested", 2, timeout=20)  # the zombie went silent: lease expired

    successor = cluster.runner("contested", epoch=2)
    successor.start()
    successor.progress(percent=60, message="successor at work")
    cluster.wait_phase("contested", "Running")

    # The zombie wakes up and writes as if nothing happened.
    assert zombie.progress(percent=99, message="zombie") is False
    assert zombie.lost and zombie.canceled
    with pytest.raises(LeaseLost):
        zombie.succeed()
    # The same write made by hand, to see the API server's own refusal.
    refusal = raw_fenced_patch(
        cluster,
        "contested",
        epoch=1,
        holder="contested-1",
        operations=[
            {"op": "add", "path": "/status/result", "value": {"epoch": 1, "status": "FINISHED"}}
        ],
    )
    assert refusal is not None and refusal.status == 422, refusal

    status = cluster.status("contested")
    assert status["progress"]["epoch"] == 2
    assert status["progress"]["message"] == "successor at work"
    assert "result" not in status
    successor.succeed()
    successor.close()
    assert cluster.wait_phase("contested", "Succeeded")["result"]["epoch"] == 2


def test_operator_restart_loses_nothing(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    timeout_s = 6.0
    timings = {"reportProgressTimeout": "6s", "ackTimeout": "6s", "heartbeatInterval": "1s"}
    cluster.create_task("steady", **timings)
    cluster.create_task("quiet", **timings)
    cluster.create_task("done", **timings)
    for name in ("steady", "quiet", "done"):
        cluster.wait_epoch(name, 1)
    steady = cluster.runner("steady", epoch=1, heartbeat_interval_s=0.5)
    steady.start()
    quiet = cluster.runner("quiet", epoch=1, heartbeat_interval_s=3600)
    quiet.start()
    with cluster.runner("done", epoch=1) as done:
        done.progress(percent=100)
    for name, phase in (("steady", "Running"), ("quiet", "Running"), ("done", "Succeeded")):
        cluster.wait_phase(name, phase)

    operator_process.kill()
    quiet_since = time.monotonic()
    quiet.progress(percent=5)  # its last report, made while the operator is down
    quiet_since = time.monotonic()
    # Made while the operator is down: a new task, and a hand-out interrupted half way
    # (lease written, status and pod not yet) as a crash between the two writes leaves it.
    cluster.create_task("newborn", **timings)
    cluster.create_task("halfway", **timings)
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        PLURAL,
        "halfway",
        {
            "metadata": {
                "annotations": {
                    "tasklease.io/epoch": "1",
                    "tasklease.io/holder": "halfway-1",
                    "tasklease.io/acquire-time": "2026-01-01T00:00:00Z",
                }
            }
        },
    )
    time.sleep(4)  # down for most of the progress timeout
    operator_process.start()
    restarted = time.monotonic()

    cluster.wait_epoch("newborn", 1)
    halfway = cluster.wait_epoch("halfway", 1)
    assert halfway["holder"] == "halfway-1"  # completed, not handed out again
    assert cluster.annotations("halfway")["tasklease.io/epoch"] == "1"

    # The silent runner's window runs from its last report as the API server recorded it
    # (the operator being down does not hide it), not from the restart; and the restarted
    # operator leaves it a grace of two heartbeat intervals to report once more.
    status = cluster.wait_epoch("quiet", 2, timeout=30)
    reassigned = time.monotonic()
    assert attempt_outcomes(status) == ["ProgressTimeout", None]
    assert reassigned - quiet_since >= timeout_s - 1.0, (
        f"reassigned {reassigned - quiet_since:.1f}s after its last report: window cut short"
    )
    grace_s = 2 * 1.0  # heartbeatInterval 1s
    assert reassigned - restarted >= grace_s - 0.5, (
        f"reassigned {reassigned - restarted:.1f}s after the restart: no grace to report"
    )
    # The heartbeating runner was never disturbed.
    steady_status = cluster.status("steady")
    assert steady_status["phase"] == "Running" and steady_status["epoch"] == 1
    assert cluster.status("done")["phase"] == "Succeeded"
    # No epoch ever got a second pod.
    for name in ("steady", "quiet", "done", "newborn", "halfway"):
        epochs = [p.metadata.labels["tasklease.io/epoch"] for p in cluster.pods(name)]
        assert len(epochs) == len(set(epochs)), f"{name} has two pods for one epoch: {epochs}"
    steady.succeed()
    steady.close()
    quiet.close()
    cluster.wait_phase("steady", "Succeeded")


def test_checkpoint_reaches_next_attempt(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task("resumable")
    cluster.wait_epoch("resumable", 1)
    with cluster.runner("resumable", epoch=1) as first:
        assert first.checkpoint is None
        first.progress(percent=42, checkpoint={"row": 42, "file": "part-0007"})
        first.fail("Transient", "connection reset")
    cluster.wait_epoch("resumable", 2)
    second = cluster.runner("resumable", epoch=2)
    assert second.checkpoint == {"row": 42, "file": "part-0007"}
    with second:
        second.progress(percent=100, checkpoint={"row": 100})
    cluster.wait_phase("resumable", "Succeeded")


def test_checkpoint_sent_with_a_failure_reaches_the_next_attempt(
    cluster: Cluster, operator_process: OperatorProcess, control_plane: Any, runner_account: str
) -> None:
    """fail(checkpoint=B) after progress(checkpoint=A): the next attempt resumes from B,
    which went in the same write as the failure (temporalio/temporal#11363 lost it). Then
    a checkpoint whose progress report was refused (403: the runner's RBAC unbound for a
    moment) still reaches the attempt after, carried by a fail() without one. The runners
    write as the runner ServiceAccount, with the runner Role's rights only."""
    runner_api = token_client(
        control_plane, service_account_token(cluster.core, cluster.namespace, runner_account)
    )
    cluster.create_task("fails-forward", retry={"maxAttempts": 3, "backoff": {"initial": "0s"}})
    cluster.wait_epoch("fails-forward", 1)
    with cluster.runner("fails-forward", epoch=1, api_client=runner_api) as first:
        assert first.progress(percent=40, checkpoint={"row": 40})
        first.fail("Transient", "connection reset", checkpoint={"row": 57})
    assert not first.lost, first.cancel_reason

    status = cluster.wait_epoch("fails-forward", 2)
    assert status["result"]["status"] == "FAILED" and status["result"]["epoch"] == 1
    # No background heartbeat: only fail() may deliver what the refused report held.
    second = cluster.runner(
        "fails-forward", epoch=2, api_client=runner_api, heartbeat_interval_s=3600
    )
    assert second.checkpoint == {"row": 57}
    env = pod_env(cluster.pod("fails-forward-2"))
    assert json.loads(env["TASKLEASE_CHECKPOINT"]) == {"row": 57}
    with second:
        unbind_runner(cluster)
        wait_for("reports refused with 403", lambda: not second.report() and not second.lost)
        assert second.progress(checkpoint={"row": 80}) is False
        assert cluster.status("fails-forward")["progress"]["checkpoint"] == {"row": 57}
        bind_runner(cluster)
        second.fail("Transient", "disk full")  # retried until the Role applies again
    assert not second.lost, second.cancel_reason

    cluster.wait_epoch("fails-forward", 3)
    third = cluster.runner("fails-forward", epoch=3, api_client=runner_api)
    assert third.checkpoint == {"row": 80}
    with third:
        third.progress(percent=100)
    status = cluster.wait_phase("fails-forward", "Succeeded")
    assert attempt_outcomes(status) == ["Failed", "Failed", "Succeeded"]


def test_heartbeat_costs_operator_no_write(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task("beat", heartbeatInterval="1s", reportProgressTimeout="30s")
    cluster.wait_epoch("beat", 1)
    runner = cluster.runner("beat", epoch=1, heartbeat_interval_s=3600)
    runner.start()
    cluster.wait_phase("beat", "Running")
    # The acknowledgement's one status write is in (phase Running); its Event and the
    # hand-out's are sent in the background: wait for both before counting.
    cluster.wait_events("beat", "HandedOut", "Acknowledged")
    events_before = len(cluster.events("beat"))
    start_rv = cluster.task("beat")["metadata"]["resourceVersion"]

    seen: list[dict[str, Any]] = []

    def collect() -> None:
        stream = watch.Watch()
        for event in stream.stream(
            cluster.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            cluster.namespace,
            PLURAL,
            field_selector="metadata.name=beat",
            resource_version=start_rv,
            timeout_seconds=8,
        ):
            seen.append(event["object"])

    watcher = threading.Thread(target=collect)
    watcher.start()
    heartbeats = 10
    for index in range(heartbeats):
        assert runner.progress(percent=index * 10)
        time.sleep(0.4)  # the runner's heartbeat interval: the load under test
    watcher.join()

    writers = []
    for obj in seen:
        managers = sorted(obj["metadata"].get("managedFields", []), key=lambda m: m["time"])
        writers.append(managers[-1]["manager"] if managers else "?")
    assert len(seen) == heartbeats, f"expected only the runner's {heartbeats} writes: {writers}"
    assert all(obj["status"]["phase"] == "Running" for obj in seen)
    assert len(cluster.events("beat")) == events_before, "the operator posted Events"
    assert operator_process.alive
    runner.succeed()
    runner.close()


def test_invalid_task_reported_not_crashed(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    # The schema keeps the pod template open; the models refuse a template that would
    # spoof the lease identity the operator hands each runner.
    container = {
        "name": "runner",
        "image": "busybox",
        "env": [{"name": "TASKLEASE_EPOCH", "value": "7"}],
    }
    template = {"spec": {"containers": [container]}}
    cluster.create_task("wrong", template=template)
    invalid = wait_for(
        "an Invalid condition",
        lambda: next(
            (
                c
                for c in cluster.status("wrong").get("conditions", [])
                if c["type"] == "Invalid" and c["status"] == "True"
            ),
            None,
        ),
    )
    assert "spec.template.spec.containers[0].env[0].name" in invalid["message"]
    assert "TASKLEASE_EPOCH" in invalid["message"]
    cluster.wait_events("wrong", "InvalidSpec")
    assert cluster.pods("wrong") == []

    # The operator lives on: a valid task is handed out, and fixing the spec heals the other.
    cluster.create_task("right")
    cluster.wait_epoch("right", 1)
    container["env"] = [{"name": "MY_SETTING", "value": "7"}]
    cluster.patch_spec("wrong", {"template": template})
    status = cluster.wait_epoch("wrong", 1)
    invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
    assert invalid["status"] == "False"
    assert operator_process.alive


def test_attempt_timeout_reassigns(cluster: Cluster, operator_process: OperatorProcess) -> None:
    cluster.create_task("slow", attemptTimeout="3s")
    cluster.wait_epoch("slow", 1)
    runner = cluster.runner("slow", epoch=1, heartbeat_interval_s=0.5)
    with runner:
        status = cluster.wait_epoch("slow", 2, timeout=20)
        assert attempt_outcomes(status) == ["AttemptTimeout", None]
        wait_for("the slow runner to learn it lost the lease", lambda: runner.lost, timeout=5)


def test_active_deadline_fails_task(cluster: Cluster, operator_process: OperatorProcess) -> None:
    # The deadline runs from the Task's creation: create it once the operator watches, so
    # that a slow start cannot spend it before the first hand-out.
    wait_for("the operator to watch", lambda: "watching" in operator_process.log())
    cluster.create_task("bounded", activeDeadline="5s")
    cluster.wait_epoch("bounded", 1)
    runner = cluster.runner("bounded", epoch=1, heartbeat_interval_s=0.5)
    with runner:
        status = cluster.wait_phase("bounded", "Failed", timeout=20)
        assert attempt_outcomes(status) == ["DeadlineExceeded"]
        wait_for("the runner to learn it lost the lease", lambda: runner.lost, timeout=5)


def test_late_after_marks_late_and_goes_on(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task("tardy", lateAfter="2s")
    cluster.wait_epoch("tardy", 1)
    runner = cluster.runner("tardy", epoch=1, heartbeat_interval_s=0.5)
    with runner:
        late = wait_for(
            "a Late condition",
            lambda: next(
                (
                    c
                    for c in cluster.status("tardy").get("conditions", [])
                    if c["type"] == "Late" and c["status"] == "True"
                ),
                None,
            ),
            timeout=15,
        )
        assert "lateAfter" in late["message"]
        # Late is a warning, not an end: the attempt goes on (Assigned or already Running).
        assert cluster.status("tardy")["phase"] in ("Assigned", "Running")
        cluster.wait_phase("tardy", "Running")
        assert not runner.canceled
    cluster.wait_phase("tardy", "Succeeded")
    assert cluster.wait_events("tardy", "Late").count("Late") == 1


def test_deleting_task_removes_its_pods(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task("short-lived")
    cluster.wait_epoch("short-lived", 1)
    wait_for("its pod", lambda: cluster.pod("short-lived-1"))
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "short-lived"
    )
    # No finalizer of ours: the Task goes at once; the garbage collector takes its pods.
    wait_for(
        "the pod to be garbage-collected", lambda: cluster.pod("short-lived-1") is None, timeout=30
    )


def test_foreign_phase_write_does_not_steer_the_operator(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    """A user sets status.phase Succeeded on a running task (the status subresource is open
    to whoever may patch it): the operator neither releases the lease nor deletes the live
    pod; it puts the phase back with a Warning, and the runner's result still decides."""
    cluster.create_task("overwritten", reportProgressTimeout="30s")
    cluster.wait_epoch("overwritten", 1)
    runner = cluster.runner("overwritten", epoch=1, heartbeat_interval_s=1.0)
    runner.start()
    try:
        cluster.wait_phase("overwritten", "Running")
        cluster.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, cluster.namespace, PLURAL, "overwritten",
            {"status": {"phase": "Succeeded"}},
        )  # fmt: skip
        cluster.wait_events("overwritten", "StatusOverwritten")
        status = cluster.wait_phase("overwritten", "Running")
        assert status.get("completionTime") is None
        assert cluster.annotations("overwritten")["tasklease.io/holder"] == "overwritten-1"
        assert cluster.live_pod("overwritten-1") is not None
        assert runner.progress(percent=50) and not runner.lost
        runner.succeed()
    finally:
        runner.close()
    status = cluster.wait_phase("overwritten", "Succeeded")
    assert status["result"]["status"] == "FINISHED" and status.get("completionTime")
    assert attempt_outcomes(status) == ["Succeeded"]


@pytest.mark.parametrize("skew_h", [1, -1])
def test_last_report_column_ignores_the_runner_clock(
    cluster: Cluster, operator_process: OperatorProcess, kubectl: Any, skew_h: int
) -> None:
    """A runner whose clock is an hour ahead or behind: the reportTime it writes is on the API
    server's clock (read from its answers), so LAST REPORT shows seconds, not `<invalid>`
    or an hour. (The lease never depended on it: the operator times reports itself.)"""
    name = f"skewed-{'ahead' if skew_h > 0 else 'behind'}"
    cluster.create_task(name, reportProgressTimeout="30s")
    cluster.wait_epoch(name, 1)
    pod = wait_for(f"pod {name}-1", lambda: cluster.pod(f"{name}-1"))
    off = timedelta(hours=skew_h)
    runner = TaskLease(
        identity_from_pod(pod), api_client=cluster.api_client, wall=lambda: datetime.now(UTC) + off
    )
    runner.start()
    try:
        for percent in (10, 20):
            assert runner.progress(percent=percent)
        task = cluster.task(name)
        written = parse_rfc3339(task["status"]["progress"]["reportTime"])
        assert abs((written - datetime.now(UTC)).total_seconds()) < 5, written
        table = kubectl("get", "task", name, "-n", cluster.namespace).stdout.splitlines()
        assert table[0].split()[-3:] == ["LAST", "REPORT", "AGE"], table[0]
        age = table[1].split()[-2]  # the LAST REPORT column, as kubectl shows it
        assert age.endswith("s") and age[:-1].isdigit(), table
    finally:
        runner.close()


def test_rejected_pod_template_is_reported_not_retried_in_a_loop(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    """A pod template the API server refuses as invalid (a container without an image): the
    task fails at once, with outcome PodRejected, a Warning Event FailedCreate carrying the
    API server's message, and its conditions; the operator logs it once, no traceback."""
    template = {"spec": {"containers": [{"name": "runner", "command": ["true"]}]}}
    cluster.create_task("no-image", template=template)
    status = cluster.wait_phase("no-image", "Failed")
    (attempt,) = status["attempts"]
    assert attempt["outcome"] == "PodRejected"
    assert "spec.containers[0].image" in attempt["message"], attempt
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "True" and complete["reason"] == "Failed"
    # Events go out from a queue of their own, after the status write.
    events = wait_for(
        "the FailedCreate Event",
        lambda: {e.reason: e for e in cluster.events("no-image")},
        until=lambda found: "FailedCreate" in found,
    )
    assert "spec.containers[0].image" in events["FailedCreate"].message
    assert events["FailedCreate"].type == "Warning"
    assert cluster.pods("no-image") == []
    log = operator_process.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("refused pod no-image-1") == 1, log[-3000:]


def test_refused_pod_create_that_can_clear_is_retried_with_backoff(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    """A pod refused for a reason that can clear by itself (its ServiceAccount does not exist
    yet): shown on the Task (condition and Warning Event) while it lasts, tried again with
    backoff, and the task runs once the ServiceAccount is there."""
    template = {
        "spec": {
            "serviceAccountName": "comes-later",
            "containers": [{"name": "runner", "image": "busybox", "command": ["true"]}],
        }
    }
    cluster.create_task("later", template=template, ackTimeout="60s", reportProgressTimeout="60s")

    def refused() -> bool:
        leased = next(
            (c for c in cluster.status("later").get("conditions", []) if c["type"] == "Leased"),
            None,
        )
        return leased is not None and leased["reason"] == "FailedCreate"

    wait_for("the refusal on the Task", refused, timeout=30)
    cluster.wait_events("later", "FailedCreate")
    assert cluster.pods("later") == []
    cluster.core.create_namespaced_service_account(
        cluster.namespace, {"metadata": {"name": "comes-later"}}
    )
    wait_for("the pod, created once the ServiceAccount exists", lambda: cluster.pods("later"),
             timeout=60)  # fmt: skip
    with cluster.runner("later", epoch=1) as runner:
        runner.progress(percent=50)
    status = cluster.wait_phase("later", "Succeeded")
    assert [a["outcome"] for a in status["attempts"]] == ["Succeeded"]
    assert "Traceback" not in operator_process.log()


def test_handout_leaves_managed_fields_to_the_lease_and_status_writers(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    """What each heartbeat makes the API server decode and rewrite: after a hand-out, the
    operator's and the runner's managedFields entries only; a Task applied server-side keeps
    every entry (its applier's ownership is what a later apply prunes by)."""
    cluster.create_task("compact")
    applied = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Task",
        "metadata": {"name": "applied"},
        "spec": {**FAST_SPEC, "template": RUNNER_TEMPLATE},
    }
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        PLURAL,
        "applied",
        applied,
        field_manager="gitops",
        _content_type="application/apply-patch+yaml",
    )

    def managers(name: str) -> dict[tuple[str, str, str], dict[str, Any]]:
        entries = cluster.task(name)["metadata"]["managedFields"]
        return {(e["manager"], e["operation"], e.get("subresource", "")): e for e in entries}

    seen = {}
    for name in ("compact", "applied"):
        cluster.wait_epoch(name, 1)
        with cluster.runner(name, epoch=1) as runner:
            runner.progress(percent=10)
            cluster.wait_phase(name, "Running")
            seen[name] = managers(name)

    assert set(seen["compact"]) == {
        ("tasklease-operator", "Update", ""),
        ("tasklease-operator", "Update", "status"),
        ("tasklease-runner", "Update", "status"),
    }, sorted(seen["compact"])
    lease = seen["compact"][("tasklease-operator", "Update", "")]
    assert {
        "f:tasklease.io/holder",
        "f:tasklease.io/epoch",
        "f:tasklease.io/acquire-time",
    } <= set(lease["fieldsV1"]["f:metadata"]["f:annotations"])
    assert lease["time"]  # a restarted operator's lease age
    assert ("gitops", "Apply", "") in seen["applied"]
