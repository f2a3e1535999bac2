"""Worker pools on the real API server: claims, races, expiry, dead runners, a soak.

Pool runners are played from the test process with `tasklease.runner.pool.PoolRunner`
(each with its own name, as if it were its own pod); the operator is a real process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import pytest
from kubernetes import client

from tasklease.api.models import POOL_RUNNER_ROLE, ROLE_LABEL
from tasklease.controlplane.process import die_with_parent
from tasklease.runner.pool import PoolRunner
from tests.integration.support import Cluster, OperatorProcess, wait_for, watches_opened

pytestmark = pytest.mark.cluster

WORKER_GROUP = "etl"


def create_pool_task(cluster: Cluster, name: str, **spec: Any) -> None:
    cluster.create_pool_task(name, WORKER_GROUP, **spec)


def pool_runner(
    cluster: Cluster, name: str, *, api_client: client.ApiClient | None = None, **kwargs: Any
) -> PoolRunner:
    return PoolRunner(
        WORKER_GROUP,
        namespace=cluster.namespace,
        pod_name=name,
        api_client=api_client or cluster.api_client,
        **kwargs,
    )


def test_pool_runner_claims_and_finishes(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    create_pool_task(cluster, "shard-7", parameters={"shard": "7"})
    cluster.wait_offered("shard-7")

    # The offer is two writes (labels, then the condition): wait for the second as well.
    def waiting_for_runner() -> dict[str, Any] | None:
        task = cluster.task("shard-7")
        conditions = task["status"].get("conditions", [])
        leased = [c for c in conditions if c["type"] == "Leased"]
        return task if leased and leased[0]["reason"] == "WaitingForRunner" else None

    waiting = wait_for("the Leased condition to say WaitingForRunner", waiting_for_runner)
    assert waiting["status"]["phase"] == "Pending"

    with pool_runner(cluster, "warm-a") as runner:
        task = runner.poll_for_task(timeout_s=10)
        assert task is not None
        assert task.parameters == {"shard": "7"}
        assert task.epoch == 1
        with task:
            cluster.wait_phase("shard-7", "Running")
            task.progress(percent=100, message="indexed")
    status = cluster.wait_phase("shard-7", "Succeeded")
    assert [a["holder"] for a in status["attempts"]] == ["warm-a"]
    assert cluster.pods("shard-7") == []  # no pod per attempt for pool tasks
    cluster.wait_events("shard-7", "Claimed")


def test_poll_for_task_waits_and_returns_none_when_nothing_comes(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    # A client of the runner's own, whose watch requests the test sees.
    with client.ApiClient(cluster.api_client.configuration) as api:
        watching = watches_opened(api)
        with pool_runner(cluster, "idle", api_client=api) as runner:
            started = time.monotonic()
            assert runner.poll_for_task(timeout_s=2) is None
            assert time.monotonic() - started >= 1.5

            # A task created while a runner long-polls is claimed as soon as it is offered.
            result: list[Any] = []
            watching.clear()
            poller = threading.Thread(
                target=lambda: result.append(runner.poll_for_task(timeout_s=30))
            )
            poller.start()
            # Once it watches, it has listed (and found nothing): the task comes after.
            assert watching.wait(timeout=10), "the runner's long poll never began to watch"
            create_pool_task(cluster, "late-arrival")
            poller.join(timeout=35)
            assert result and result[0] is not None
            with result[0] as task:
                task.progress(percent=100)
    cluster.wait_phase("late-arrival", "Succeeded")


def test_pool_claim_race_has_one_winner(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    names = [f"contested-{i}" for i in range(5)]
    for name in names:
        create_pool_task(cluster, name)
    tasks = {name: cluster.wait_offered(name) for name in names}
    runners = [pool_runner(cluster, f"racer-{i}").start() for i in range(3)]
    try:
        for name in names:
            barrier = threading.Barrier(len(runners))
            won: list[str] = []

            def race(
                runner: PoolRunner,
                body: dict[str, Any] = tasks[name],
                barrier: threading.Barrier = barrier,
                won: list[str] = won,
            ) -> None:
                barrier.wait()
                if runner._claim(body) is not None:
                    won.append(runner.pod_name)

            threads = [threading.Thread(target=race, args=(r,)) for r in runners]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(won) == 1, f"{name}: winners {won}"
            assert cluster.annotations(name)["tasklease.io/holder"] == won[0]
            assert cluster.annotations(name)["tasklease.io/epoch"] == "1"
    finally:
        for runner in runners:
            runner.stop(release=True)


def test_pool_task_returns_to_pool_on_progress_timeout(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    create_pool_task(cluster, "stalls", ackTimeout="3s", reportProgressTimeout="3s")
    cluster.wait_offered("stalls")
    with pool_runner(cluster, "slowpoke") as first:
        zombie = first.poll_for_task(timeout_s=10)
        assert zombie is not None
        zombie._heartbeat_interval_s = 3600  # acknowledges, then never reports again
        zombie.start()
        cluster.wait_phase("stalls", "Running")
        back = cluster.wait_offered("stalls", timeout=20)
        assert back["status"]["attempt"] == 1
        assert back["status"]["attempts"][0]["outcome"] == "ProgressTimeout"
        assert back["metadata"]["annotations"]["tasklease.io/epoch"] == "1"

        with pool_runner(cluster, "fresh") as second:
            task = second.poll_for_task(timeout_s=10)
            assert task is not None and task.epoch == 2  # "reassigned in a subsequent poll"
            with task:
                assert zombie.progress(percent=99) is False  # fenced out
                assert zombie.lost
                task.progress(percent=100)
    status = cluster.wait_phase("stalls", "Succeeded")
    assert [a["outcome"] for a in status["attempts"]] == ["ProgressTimeout", "Succeeded"]
    assert status["result"]["epoch"] == 2


@pytest.mark.parametrize("death", ["lease-deleted", "lease-expired", "pod-deleted"])
def test_dead_pool_runner_releases_its_tasks_at_once(
    cluster: Cluster, operator_process: OperatorProcess, death: str
) -> None:
    # Task timeouts far beyond the test: only the runner's own liveness can free the tasks.
    for name in ("held-a", "held-b"):
        create_pool_task(cluster, name, ackTimeout="5m", reportProgressTimeout="10m")
        cluster.wait_offered(name)
    if death == "pod-deleted":
        cluster.core.create_namespaced_pod(
            cluster.namespace,
            {
                "metadata": {"name": "doomed", "labels": {ROLE_LABEL: POOL_RUNNER_ROLE}},
                "spec": {"containers": [{"name": "runner", "image": "tasklease:0.1.0"}]},
            },
        )
    runner = pool_runner(cluster, "doomed", lease_duration_s=2, renew_interval_s=0.5).start()
    held = [runner.poll_for_task(timeout_s=10) for _ in range(2)]
    assert all(h is not None for h in held)
    for handle in held:
        assert handle is not None
        handle._heartbeat_interval_s = 0.5
        handle.start()
    for name in ("held-a", "held-b"):
        cluster.wait_phase(name, "Running")

    started = time.monotonic()
    runner._stop.set()  # the runner process dies: no renewals, no release
    if death == "lease-deleted":
        from kubernetes import client

        client.CoordinationV1Api(cluster.api_client).delete_namespaced_lease(
            "doomed", cluster.namespace
        )
    elif death == "pod-deleted":
        cluster.core.delete_namespaced_pod("doomed", cluster.namespace, grace_period_seconds=0)
    for name in ("held-a", "held-b"):
        back = cluster.wait_offered(name, timeout=20)
        assert back["status"]["attempts"][0]["outcome"] == "RunnerLost"
    assert time.monotonic() - started < 15
    for handle in held:
        assert handle is not None
        handle.close()


def test_pool_runner_told_to_stop_releases_unfinished_tasks(
    cluster: Cluster, operator_process: OperatorProcess
) -> None:
    create_pool_task(cluster, "handed-back", ackTimeout="5m", reportProgressTimeout="10m")
    cluster.wait_offered("handed-back")
    runner = pool_runner(cluster, "leaving").start()
    task = runner.poll_for_task(timeout_s=10)
    assert task is not None
    task.start()
    cluster.wait_phase("handed-back", "Running")
    runner.stop(release=True)  # e.g. on SIGTERM: gives the task back and goes
    back = cluster.wait_offered("handed-back", timeout=15)
    assert back["status"]["attempts"][0]["outcome"] == "Released"
    assert task.progress(percent=50) is False  # no longer ours


def test_pool_soak(cluster: Cluster, operator_process: OperatorProcess) -> None:
    """3 pool runners, 30 tasks, one runner killed mid-run: every task ends Succeeded
    exactly once, no task ever has two holders, attempts never exceed maxAttempts."""
    count = 30
    for index in range(count):
        create_pool_task(
            cluster,
            f"soak-{index:02d}",
            ackTimeout="4s",
            reportProgressTimeout="4s",
            priority=index % 3,
        )
    successes: dict[str, list[tuple[str, int]]] = defaultdict(list)
    claims: dict[str, list[tuple[int, str]]] = defaultdict(list)
    lock = threading.Lock()
    killed = threading.Event()
    rng = random.Random(7)

    def work(name: str) -> None:
        runner = pool_runner(cluster, name, lease_duration_s=3, renew_interval_s=0.5).start()
        try:
            while True:
                task = runner.poll_for_task(timeout_s=3)
                if task is None:
                    if all_final():
                        return
                    continue
                with lock:
                    claims[task.identity.task].append((task.epoch, name))
                task._heartbeat_interval_s = 0.5
                task.start()
                for step in range(4):
                    if name == "victim" and claims_total() >= 6 and not killed.is_set():
                        killed.set()  # SIGKILL: no result, no release, no more renewals
                        runner._stop.set()
                        task._stop.set()
                        return
                    time.sleep(rng.uniform(0.05, 0.2))  # a step of the work
                    task.progress(percent=(step + 1) * 25)
                task.succeed()
                task.close()
                with lock:
                    successes[task.identity.task].append((name, task.epoch))
        finally:
            if not killed.is_set() or name != "victim":
                runner.stop(release=True)

    def claims_total() -> int:
        with lock:
            return sum(len(c) for c in claims.values())

    def all_final() -> bool:
        listed = cluster.custom.list_namespaced_custom_object(
            "tasklease.io", "v1alpha1", cluster.namespace, "tasks"
        )["items"]
        return all((t.get("status") or {}).get("phase") in ("Succeeded", "Failed") for t in listed)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("victim", "steady", "sturdy")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert killed.is_set(), "the victim runner was never killed"

    listed = cluster.custom.list_namespaced_custom_object(
        "tasklease.io", "v1alpha1", cluster.namespace, "tasks"
    )["items"]
    assert len(listed) == count
    for task in listed:
        name = task["metadata"]["name"]
        status = task["status"]
        assert status["phase"] == "Succeeded", (name, status)
        assert len(successes[name]) == 1, (name, successes[name])  # exactly once
        assert status["attempt"] <= 3
        epochs = [epoch for epoch, _ in claims[name]]
        assert epochs == sorted(set(epochs)), (name, claims[name])  # one holder per epoch
        holders = [a["holder"] for a in status["attempts"]]
        assert len(holders) == status["attempt"]
        assert successes[name][0][0] == holders[-1]
    lost = [
        t for t in listed if any(a.get("outcome") == "RunnerLost" for a in t["status"]["attempts"])
    ]
    assert lost, "killing the victim should have sent its task back to the pool"


def pool_wrapper(
    control_plane: Any, cluster: Cluster, name: str, script: str, *extra: str
) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        KUBECONFIG=str(control_plane.kubeconfig),
        TASKLEASE_NAMESPACE=cluster.namespace,
        TASKLEASE_POD_NAME=name,
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tasklease",
            "run",
            "--worker-group",
            "etl",
            "--poll-timeout",
            "5",
            "--grace-period",
            "2",
            *extra,
            "--",
            "sh",
            "-c",
            script,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=die_with_parent(os.getpid()),
    )


def test_wrapper_pool_mode_runs_claimed_tasks(
    control_plane: Any, cluster: Cluster, operator_process: OperatorProcess
) -> None:
    for name in ("pooled-1", "pooled-2"):
        create_pool_task(cluster, name, parameters={"n": name[-1]})
    script = 'printf "1/1\\ndone with %s\\n" "$TASKLEASE_TASK" > "$TASKLEASE_PROGRESS_FILE"'
    wrapper = pool_wrapper(control_plane, cluster, "wrapper-pool", script, "--max-tasks", "2")
    output, _ = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 0, output
    for name in ("pooled-1", "pooled-2"):
        status = cluster.wait_phase(name, "Succeeded")
        assert status["attempts"][-1]["holder"] == "wrapper-pool"
        assert status["progress"]["message"] == f"done with {name}"


def test_wrapper_pool_mode_releases_its_task_on_sigterm(
    control_plane: Any, cluster: Cluster, operator_process: OperatorProcess
) -> None:
    create_pool_task(cluster, "interrupted", ackTimeout="5m", reportProgressTimeout="10m")
    cluster.wait_offered("interrupted")
    wrapper = pool_wrapper(control_plane, cluster, "going-away", "sleep 300")
    try:
        cluster.wait_phase("interrupted", "Running")
        wrapper.send_signal(signal.SIGTERM)  # the pool pod is being deleted
        output, _ = wrapper.communicate(timeout=30)
        assert wrapper.returncode == 0, output
        back = cluster.wait_offered("interrupted", timeout=15)
        assert back["status"]["attempts"][0]["outcome"] == "Released"
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
