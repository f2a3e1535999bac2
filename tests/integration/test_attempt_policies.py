"""Attempt policies on the real API server, with the operator as a process and runner pods
run by the local executor: spec.replacementPolicy, evictions that do not count against
maxAttempts, and spec.ttlAfterFinished."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.times import parse_rfc3339
from tests.integration.support import Cluster, OperatorProcess, shell, wait_for, wrapped

pytestmark = pytest.mark.cluster

# A pod whose every process ignores SIGTERM (an ignored signal stays ignored across exec),
# writing "ATTEMPT TIME" lines to a file until SIGKILL ends it, after its grace period.
STUBBORN = (
    'trap "" TERM; while :; do echo "$TASKLEASE_ATTEMPT $(date +%s.%N)" >> {log}; sleep 0.1; done'
)


def outcomes(status: dict[str, Any]) -> list[str | None]:
    return [a.get("outcome") for a in status.get("attempts", [])]


def leased_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == "Leased")


def evict(cluster: Cluster, pod: str) -> None:
    """What `kubectl drain` does to each pod: the Eviction API."""
    cluster.core.create_namespaced_pod_eviction(
        pod,
        cluster.namespace,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=cluster.namespace)),
    )


def working_runner(*, finish_on_attempt: int | None) -> dict[str, Any]:
    """A wrapped runner that reports 10 % and works on, and finishes on the given attempt."""
    finish = (
        f'if [ "$TASKLEASE_ATTEMPT" = {finish_on_attempt} ]; then '
        'progress "1/1\\ndone on attempt $TASKLEASE_ATTEMPT\\n"; exit 0; fi\n'
        if finish_on_attempt is not None
        else ""
    )
    return wrapped(shell(f'{finish}progress "10%\\nworking\\n"; sleep 600\n'))


def wait_reported(cluster: Cluster, name: str, *, epoch: int) -> None:
    wait_for(
        f"epoch {epoch} of {name} to report 10 %",
        lambda: (
            (p := cluster.status(name).get("progress") or {}).get("epoch") == epoch
            and p.get("percent") == 10
        ),
        timeout=30,
    )


# --- spec.replacementPolicy ---------------------------------------------------------------


@pytest.mark.parametrize(("policy", "overlap"), [("AfterTermination", False), ("Overlap", True)])
def test_after_termination_policy_never_runs_two_attempts_at_once(
    cluster: Cluster,
    operator_process: OperatorProcess,
    executor: Any,
    tmp_path: Path,
    policy: str,
    overlap: bool,
) -> None:
    """Attempt 1 never acknowledges; its pod ignores SIGTERM for its 4 s grace period. Under
    AfterTermination attempt 2's process starts after attempt 1's last line; under Overlap
    (the contrast that shows the test can fail) the two run side by side."""
    log = tmp_path / "alive.log"
    template = {
        "spec": {
            "terminationGracePeriodSeconds": 4,
            "containers": [
                {
                    "name": "runner",
                    "image": "tasklease",
                    "command": ["sh", "-c", STUBBORN.format(log=log)],
                }
            ],
        }
    }
    cluster.create_task(
        "stubborn",
        template=template,
        ackTimeout="2s",
        reportProgressTimeout="2s",
        replacementPolicy=policy,
        retry={"maxAttempts": 2, "backoff": {"initial": "0s"}},
    )
    status = cluster.wait_phase("stubborn", "Failed", timeout=60)
    assert outcomes(status) == ["AckTimeout", "AckTimeout"], status

    def lines() -> list[list[str]]:
        return [line.split() for line in log.read_text().splitlines() if line.strip()]

    wait_for("attempt 2 to have run", lambda: any(a == "2" for a, _ in lines()), timeout=30)
    seen = lines()
    last_of_first = max(float(t) for attempt, t in seen if attempt == "1")
    first_of_second = min(float(t) for attempt, t in seen if attempt == "2")
    if overlap:
        assert first_of_second < last_of_first, (first_of_second, last_of_first)
    else:
        assert first_of_second > last_of_first, (first_of_second, last_of_first)
        cluster.wait_events("stubborn", "WaitingForTermination", timeout=10)


def test_unterminated_old_pod_is_reported_not_waited_on_silently(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    """A pod bound to a node nobody runs (an unreachable node): deleted, it stays, being
    deleted, forever. The Task says it waits for it, then that the pod is overdue; a forced
    deletion, as the message says, lets the next attempt start."""
    template = {
        "spec": {
            "nodeName": "unreachable-node",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "runner", "image": "tasklease"}],
        }
    }
    cluster.create_task(
        "stranded",
        template=template,
        ackTimeout="2s",
        reportProgressTimeout="2s",
        replacementPolicy="AfterTermination",
        retry={"maxAttempts": 2, "backoff": {"initial": "0s"}},
    )

    def reason_is(reason: str) -> Any:
        def probe() -> dict[str, Any] | None:
            status = cluster.status("stranded")
            leased = next((c for c in status.get("conditions", []) if c["type"] == "Leased"), None)
            return status if leased is not None and leased["reason"] == reason else None

        return probe

    status = wait_for("the wait to be shown", reason_is("WaitingForTermination"), timeout=30)
    assert status["phase"] == "Pending" and outcomes(status) == ["AckTimeout"], status
    assert "attempt 2 waits for pod stranded-1" in leased_condition(status)["message"]
    pod = cluster.pod("stranded-1")
    assert pod is not None and pod.metadata.deletion_timestamp is not None
    status = wait_for("the overdue pod to be reported", reason_is("TerminationOverdue"), timeout=40)
    message = leased_condition(status)["message"]
    assert "its node may be unreachable" in message, message
    assert "kubectl delete pod stranded-1 --grace-period=0 --force" in message, message
    cluster.wait_events("stranded", "WaitingForTermination", "TerminationOverdue", timeout=10)
    assert [p.metadata.name for p in cluster.pods("stranded")] == ["stranded-1"]

    cluster.core.delete_namespaced_pod("stranded-1", cluster.namespace, grace_period_seconds=0)
    status = cluster.wait_epoch("stranded", 2)
    assert status["attempt"] == 2


# --- disruptions --------------------------------------------------------------------------


def test_evicted_attempt_does_not_use_up_max_attempts(
    cluster: Cluster, operator_process: OperatorProcess, executor: Any
) -> None:
    cluster.create_task(
        "evicted", template=working_runner(finish_on_attempt=2), retry={"maxAttempts": 1}
    )
    wait_reported(cluster, "evicted", epoch=1)
    evict(cluster, "evicted-1")
    status = cluster.wait_phase("evicted", "Succeeded", timeout=60)
    assert outcomes(status) == ["Disrupted", "Succeeded"], status
    assert status["disruptions"] == 1
    first = status["attempts"][0]["message"]
    assert "EvictionByEvictionAPI" in first and "not counted" in first, first
    assert status["progress"]["message"] == "done on attempt 2"


def test_disruption_retries_are_capped(
    cluster: Cluster, operator_process: OperatorProcess, executor: Any
) -> None:
    cluster.create_task(
        "drained",
        template=working_runner(finish_on_attempt=None),
        retry={"maxAttempts": 1, "maxDisruptions": 1},
    )
    wait_reported(cluster, "drained", epoch=1)
    evict(cluster, "drained-1")
    cluster.wait_epoch("drained", 2)
    wait_reported(cluster, "drained", epoch=2)
    evict(cluster, "drained-2")
    status = cluster.wait_phase("drained", "Failed", timeout=60)
    first, second = outcomes(status)
    # The second one counts: ended as the pod's deletion or the runner's own FAILED showed it.
    assert first == "Disrupted" and second in ("PodLost", "Failed"), status
    assert status["disruptions"] == 1
    assert (
        "spec.retry.maxDisruptions (1) were already left out" in (status["attempts"][1]["message"])
    )


# --- spec.ttlAfterFinished ----------------------------------------------------------------


def test_finished_task_is_deleted_after_its_ttl(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    cluster.create_task("shortlived", ttlAfterFinished="3s")
    cluster.wait_epoch("shortlived", 1)
    with cluster.runner("shortlived", epoch=1) as runner:
        assert runner.progress(percent=100)
        runner.succeed()
    status = cluster.wait_phase("shortlived", "Succeeded")
    completed = parse_rfc3339(status["completionTime"]).timestamp()
    assert [p.metadata.name for p in cluster.pods("shortlived")] == ["shortlived-1"]
    last_present = [time.time()]

    def gone() -> bool:
        try:
            cluster.task("shortlived")
        except ApiException as error:
            if error.status == 404:
                return True
            raise
        last_present[0] = time.time()
        return False

    wait_for("the Task to be deleted", gone, timeout=30, interval=0.1)
    # Kept for its ttl (as far as polling can tell), not deleted at completion.
    assert last_present[0] - completed >= 2.0, last_present[0] - completed
    wait_for(
        "its runner pod to follow (owner references)",
        lambda: not cluster.pods("shortlived"),
        timeout=30,
    )
