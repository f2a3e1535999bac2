"""Outages of the API server and of the operator do not cost live runners their leases, and
do not keep dead ones alive (design invariant 3).

The test that stops the API server runs on a control plane of its own, not the session's.
The operator is a real process; the runners are the SDK with real ServiceAccount tokens,
heartbeating from threads of the test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config

from tasklease.api.times import parse_rfc3339
from tasklease.runner import TaskLease
from tests.conftest import CRDS_DIR
from tests.integration.chart_support import service_account_token, token_client
from tests.integration.support import (
    RUNNER,
    Cluster,
    OperatorProcess,
    bind_runner,
    identity_from_pod,
    runner_role,
)
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


@pytest.fixture
def own_plane(control_plane_binaries: Any, tmp_path: Path) -> Iterator[Any]:
    from tasklease.controlplane import ControlPlane

    with ControlPlane.start(binaries=control_plane_binaries) as plane:
        plane.kubectl("apply", "--server-side", "-f", str(CRDS_DIR))
        plane.kubectl("wait", "--for", "condition=established", "crd", "--all", "--timeout=60s")
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


def test_apiserver_outage_longer_than_the_lease_reassigns_nothing(
    own_plane: Any, tmp_path: Path
) -> None:
    api = config.new_client_from_config(config_file=str(own_plane.kubeconfig))
    cluster = Cluster(api, NAMESPACE)
    runner_role(cluster)
    bind_runner(cluster)
    operator = OperatorProcess(
        kubeconfig=own_plane.kubeconfig, namespace=NAMESPACE, log_path=tmp_path / "operator.log"
    ).start()
    names = [f"steady-{i}" for i in range(4)]
    leases: list[TaskLease] = []
    try:
        for name in names:
            cluster.create_task(name, ackTimeout=WINDOW, reportProgressTimeout=WINDOW)
        token = service_account_token(cluster.core, NAMESPACE, RUNNER)
        for name in names:
            cluster.wait_epoch(name, 1)
            identity = identity_from_pod(cluster.pod(f"{name}-1"))
            runner_api = token_client(own_plane, token)
            leases.append(TaskLease(identity, api_client=runner_api, heartbeat_interval_s=1.0))
            leases[-1].start()
        for name in names:
            cluster.wait_phase(name, "Running")

        own_plane.restart_apiserver(down_for_s=OUTAGE_S)

        # The operator sees again once its watches are back (their retries back off, so
        # that may be some seconds after the API server); a reassignment would be its first
        # decision then. Each runner reports a couple of heartbeats after that.
        wait_for(
            "the operator to see again",
            lambda: "the API server is visible again after" in operator.log(),
            timeout=60,
        )
        back = datetime.now(UTC) + timedelta(seconds=2)
        wait_for(
            "every runner to report after the operator could see again",
            lambda: all(_report_time(cluster, name) > back for name in names),
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
        api.close()


def test_standby_that_leads_after_an_outage_reassigns_nothing(
    own_plane: Any, tmp_path: Path
) -> None:
    """The leader steps down in an outage longer than its renew deadline; the standby, which
    lived through the outage, takes over and lists leases the API server last wrote before
    it. Their ages leave the outage out: runners that start only after the grace a lease
    first seen keeps are not reassigned."""
    api = config.new_client_from_config(config_file=str(own_plane.kubeconfig))
    cluster = Cluster(api, NAMESPACE)
    runner_role(cluster)
    bind_runner(cluster)
    election = {
        "TASKLEASE_LEADER_ELECTION": "true",
        "TASKLEASE_LEADER_ELECTION_NAMESPACE": NAMESPACE,
    }
    replicas = [
        OperatorProcess(
            kubeconfig=own_plane.kubeconfig,
            namespace=NAMESPACE,
            log_path=tmp_path / f"{role}.log",
            extra_env=election,
        )
        for role in ("leader", "standby")
    ]
    leader, standby = replicas
    names = [f"handed-{i}" for i in range(3)]
    leases: list[TaskLease] = []
    try:
        leader.start()
        wait_for("the first replica to lead", lambda: "leading (Lease" in leader.log(), timeout=60)
        standby.start()
        wait_for("the standby to campaign", lambda: "waiting to lead" in standby.log(), timeout=60)
        for name in names:
            cluster.create_task(
                name, ackTimeout="10s", reportProgressTimeout="10s", heartbeatInterval="1s"
            )
        for name in names:
            cluster.wait_epoch(name, 1)
        token = service_account_token(cluster.core, NAMESPACE, RUNNER)
        identities = [identity_from_pod(cluster.pod(f"{name}-1")) for name in names]

        own_plane.restart_apiserver(down_for_s=STANDBY_OUTAGE_S)

        wait_for("the leader to step down", lambda: not leader.alive, timeout=30)
        wait_for(
            "the standby to lead and list the Tasks",
            lambda: "watching 3 Tasks" in standby.log(),
            timeout=60,
        )
        # On purpose: let the grace that a lease first seen keeps (two 1 s heartbeats) pass,
        # as runner pods that the outage kept from starting would.
        time.sleep(FIRST_SIGHT_GRACE_S + 1.0)
        for identity in identities:
            leases.append(
                TaskLease(
                    identity,
                    api_client=token_client(own_plane, token),
                    heartbeat_interval_s=1.0,
                )
            )
            leases[-1].start()
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
        api.close()


def _report_time(cluster: Cluster, name: str) -> datetime:
    progress = cluster.status(name).get("progress") or {}
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
