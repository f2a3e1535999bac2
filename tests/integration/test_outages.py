"""Outages of the API server and of the operator do not cost live runners their leases, and
do not keep dead ones alive (design invariant 3).

The tests that stop the API server run on a control plane of their own, not the session's,
with the chart installed: the operator is a real process under the chart's operator
ServiceAccount, the runners are the SDK under its runner ServiceAccount with tokens bound to
their pods (as a kubelet's are), heartbeating from threads of the test. Both are refused
alike while a restarted API server loads its authorizer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tasklease.api.times import parse_rfc3339
from tasklease.executor import LocalExecutor
from tasklease.runner import TaskLease
from tests.conftest import CRDS_DIR
from tests.integration.chart_support import (
    RUNNER_SA,
    Helm,
    installed,
    scoped_values,
    service_account_token,
    token_client,
    write_token_kubeconfig,
)
from tests.integration.support import Cluster, OperatorProcess, identity_from_pod
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

NAMESPACE = "outages"
WINDOW = "6s"
OUTAGE_S = 9.0  # longer than the lease window
# Longer than the operator's leader-election renew deadline (10 s) and lease (15 s): the
# leader steps down, the standby takes over when the API server is back.
STANDBY_OUTAGE_S = 20.0
FIRST_SIGHT_GRACE_S = 2.0
# Each operator of the crash loop lives this long after its listing: less than the 10 s
# windows, more than the 4 s grace a lease first seen keeps (two 2 s heartbeat intervals).
CRASH_LOOP_LIFETIME_S = 6.0


TEMPLATE = {
    "spec": {
        "serviceAccountName": RUNNER_SA,
        "containers": [{"name": "runner", "image": "tasklease:0.1.0"}],
    }
}


@pytest.fixture
def own_plane(control_plane_binaries: Any, tmp_path: Path) -> Iterator[Any]:
    from tasklease.controlplane import ControlPlane

    with ControlPlane.start(binaries=control_plane_binaries) as plane:
        plane.apply_crds(CRDS_DIR)
        plane.kubectl("create", "namespace", NAMESPACE)
        wait_for(
            "the namespace's default ServiceAccount",
            lambda: (
                plane.kubectl(
                    "-n", NAMESPACE, "get", "serviceaccount", "default", check=False
                ).returncode
                == 0
            ),
        )
        yield plane


@dataclass
class Charted:
    """The chart installed on the test's own control plane."""

    plane: Any
    cluster: Cluster
    operator_kubeconfig: Path
    operator_env: dict[str, str]
    tmp: Path

    def operator(self, role: str = "operator") -> OperatorProcess:
        return OperatorProcess(
            kubeconfig=self.operator_kubeconfig,
            namespace=NAMESPACE,
            log_path=self.tmp / f"{role}.log",
            extra_env={**self.operator_env, "HOSTNAME": role},
        )

    def runner(self, name: str) -> TaskLease:
        """The SDK as the runner pod of Task `name`'s first attempt would run it."""
        pod = self.cluster.pod(f"{name}-1")
        token = service_account_token(self.cluster.core, NAMESPACE, RUNNER_SA, pod=pod)
        return TaskLease(
            identity_from_pod(pod),
            api_client=token_client(self.plane, token),
            heartbeat_interval_s=1.0,
        )


@contextlib.contextmanager
def charted(plane: Any, helm_binary: Path, tmp_path: Path, **values: Any) -> Iterator[Charted]:
    helm = Helm(helm_binary, kubeconfig=plane.kubeconfig, home=tmp_path / "helm")
    api = config.new_client_from_config(config_file=str(plane.kubeconfig))
    cluster = Cluster(api, NAMESPACE)
    try:
        with installed(
            helm, NAMESPACE, tmp_path, scoped_values(NAMESPACE, **values), release="outages"
        ) as release:
            (deployment,) = [d for d in release.documents if d["kind"] == "Deployment"]
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            env = {
                e["name"]: e["value"]
                for e in container.get("env", [])
                if e["name"].startswith("TASKLEASE_LEADER_ELECTION")
            }
            token = service_account_token(cluster.core, NAMESPACE, release.operator_sa)
            kubeconfig = write_token_kubeconfig(
                tmp_path / "operator.kubeconfig", plane, token, release.operator_sa
            )
            yield Charted(plane, cluster, kubeconfig, env, tmp_path)
    finally:
        api.close()


def test_apiserver_outage_longer_than_the_lease_reassigns_nothing(
    own_plane: Any, helm_binary: Path, tmp_path: Path
) -> None:
    with charted(own_plane, helm_binary, tmp_path) as chart:
        cluster = chart.cluster
        operator = chart.operator().start()
        names = [f"steady-{i}" for i in range(4)]
        leases: list[TaskLease] = []
        try:
            for name in names:
                cluster.create_task(
                    name, ackTimeout=WINDOW, reportProgressTimeout=WINDOW, template=TEMPLATE
                )
            for name in names:
                cluster.wait_epoch(name, 1)
                leases.append(chart.runner(name).start())
            for name in names:
                cluster.wait_phase(name, "Running")

            own_plane.restart_apiserver(down_for_s=OUTAGE_S)

            # The operator sees again once its watches are back (their retries back off,
            # so that may be some seconds after the API server); a reassignment would be
            # its first decision then. Each runner reports a couple of heartbeats after.
            wait_for(
                "the operator to see again",
                lambda: "the API server is visible again after" in operator.log(),
                timeout=60,
            )
            back = datetime.now(UTC) + timedelta(seconds=2)
            wait_for(
                "every runner to report after the operator could see again",
                lambda: _runners(cluster, names, leases),
                until=lambda runners: all(runner.reported > back for runner in runners),
                timeout=30,
            )
            for lease in leases:
                assert not lease.lost and not lease.canceled, lease.cancel_reason
            for name in names:
                status = cluster.status(name)
                assert status["epoch"] == 1 and status["phase"] == "Running", (name, status)
            for lease in leases:
                lease.succeed()
            for name in names:
                status = cluster.wait_phase(name, "Succeeded")
                assert [a["outcome"] for a in status["attempts"]] == ["Succeeded"]
        finally:
            for lease in leases:
                lease.close()
            operator.stop()


def test_standby_that_leads_after_an_outage_reassigns_nothing(
    own_plane: Any, helm_binary: Path, tmp_path: Path
) -> None:
    """The leader steps down in an outage longer than its renew deadline; the standby, which
    lived through the outage, takes over and lists leases the API server last wrote before
    it. Their ages leave the outage out: runners that start only after the grace a lease
    first seen keeps are not reassigned."""
    with charted(
        own_plane,
        helm_binary,
        tmp_path,
        operator={"replicas": 2},
        leaderElection={"enabled": True},
    ) as chart:
        cluster = chart.cluster
        leader, standby = replicas = [chart.operator("leader"), chart.operator("standby")]
        names = [f"handed-{i}" for i in range(3)]
        leases: list[TaskLease] = []
        try:
            leader.start()
            wait_for(
                "the first replica to lead", lambda: "leading (Lease" in leader.log(), timeout=60
            )
            standby.start()
            wait_for(
                "the standby to campaign", lambda: "waiting to lead" in standby.log(), timeout=60
            )
            for name in names:
                cluster.create_task(
                    name,
                    ackTimeout="10s",
                    reportProgressTimeout="10s",
                    heartbeatInterval="1s",
                    template=TEMPLATE,
                )
            for name in names:
                cluster.wait_epoch(name, 1)
            runners = [chart.runner(name) for name in names]

            own_plane.restart_apiserver(down_for_s=STANDBY_OUTAGE_S)

            wait_for("the leader to step down", lambda: not leader.alive, timeout=30)
            wait_for(
                "the standby to lead and list the Tasks",
                lambda: "watching 3 Tasks" in standby.log(),
                timeout=60,
            )
            # On purpose: let the grace that a lease first seen keeps (two 1 s heartbeats)
            # pass, as runner pods that the outage kept from starting would.
            time.sleep(FIRST_SIGHT_GRACE_S + 1.0)
            for runner in runners:
                leases.append(runner.start())
            for name in names:
                cluster.wait_phase(name, "Running")
            for lease in leases:
                assert not lease.lost and not lease.canceled, lease.cancel_reason
                lease.succeed()
            for name in names:
                status = cluster.wait_phase(name, "Succeeded")
                assert [a["outcome"] for a in status["attempts"]] == ["Succeeded"], (name, status)
        finally:
            for lease in leases:
                lease.close()
            for replica in replicas:
                replica.stop()


@dataclass(frozen=True)
class _Runner:
    """A runner as a timed-out wait shows it: its Task's state and its own."""

    task: str
    epoch: int | None
    phase: str | None
    reported: datetime
    lost: str | None


def _runners(cluster: Cluster, names: list[str], leases: list[TaskLease]) -> list[_Runner]:
    runners = []
    for name, lease in zip(names, leases, strict=True):
        status = cluster.status(name)
        runners.append(
            _Runner(
                name,
                status.get("epoch"),
                status.get("phase"),
                _report_time(status),
                lease.cancel_reason if lease.lost else None,
            )
        )
    return runners


def _report_time(status: dict[str, Any]) -> datetime:
    progress = status.get("progress") or {}
    return parse_rfc3339(progress.get("reportTime", "1970-01-01T00:00:00Z"))


def test_crash_looping_operator_still_expires_dead_leases(
    cluster: Cluster, control_plane: Any, runner_account: str, tmp_path: Path
) -> None:
    """An operator killed every few seconds, faster than any lease window: a lease whose
    runner never reported is still taken back (each start used to grant a whole window
    again), and a lease whose runner reports through the crash loop is not."""
    dead = [f"no-runner-{i}" for i in range(3)]
    for name in [*dead, "alive"]:
        cluster.create_task(
            name, ackTimeout="10s", reportProgressTimeout="10s", heartbeatInterval="2s"
        )
    token = service_account_token(cluster.core, cluster.namespace, runner_account)
    runner: TaskLease | None = None
    operator = OperatorProcess(
        kubeconfig=control_plane.kubeconfig,
        namespace=cluster.namespace,
        log_path=tmp_path / "operator.log",
    )
    try:
        for cycle in range(3):
            operator.start()
            listings = cycle + 1
            wait_for(
                "the operator to list the Tasks",
                lambda: operator.log().count("watching 4 Tasks") >= listings,  # noqa: B023
                timeout=30,
            )
            if runner is None:
                cluster.wait_epoch("alive", 1)
                identity = identity_from_pod(cluster.pod("alive-1"))
                runner = TaskLease(
                    identity,
                    api_client=token_client(control_plane, token),
                    heartbeat_interval_s=1.0,
                ).start()
            time.sleep(CRASH_LOOP_LIFETIME_S)  # the crash loop's period: the fault injected
            operator.kill()
        for name in dead:
            attempts = cluster.status(name).get("attempts") or []
            assert attempts and attempts[0].get("outcome") == "AckTimeout", (name, attempts)
        assert runner is not None and not runner.lost, runner.cancel_reason if runner else None
        status = cluster.status("alive")
        assert status["epoch"] == 1 and status["phase"] == "Running", status
    finally:
        operator.stop()
        if runner is not None:
            runner.close()


def test_executor_finishes_a_graceful_deletion_the_api_server_was_down_for(
    own_plane: Any, tmp_path: Path
) -> None:
    """A pod's grace period ends while the API server is down: the executor (the local
    node's kubelet) kills the process, cannot remove the pod then, and does once the API
    server is back, as a kubelet finishes a deletion; the pod must not stay for ever."""
    api = config.new_client_from_config(config_file=str(own_plane.kubeconfig))
    core = client.CoreV1Api(api)
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stubborn"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["sh", "-c", 'trap "" TERM; sleep 600 & wait'],
                }
            ],
        },
    }
    with LocalExecutor(own_plane.kubeconfig, tmp_path / "executor", all_pods=True) as executor:
        core.create_namespaced_pod(NAMESPACE, manifest)
        wait_for("its process", lambda: executor.pid_of(NAMESPACE, "stubborn"), timeout=30)
        core.delete_namespaced_pod("stubborn", NAMESPACE)
        own_plane.restart_apiserver(down_for_s=5)  # the grace period ends meanwhile
        assert executor.pid_of(NAMESPACE, "stubborn") is None  # killed in the outage

        def gone() -> bool:
            return not [
                p
                for p in core.list_namespaced_pod(NAMESPACE).items
                if p.metadata.name == "stubborn"
            ]

        wait_for("the pod to be removed", gone, timeout=60, retrying=(Exception,))
    api.close()
