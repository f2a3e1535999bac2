"""API server outages do not count against leases (design invariant 3).

These tests stop the API server, so each runs on a control plane of its own, not the
session's: the operator is a real process, the runners are the SDK with real
ServiceAccount tokens, heartbeating from threads of the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config

from tasklease.runner import TaskLease
from tests.conftest import CRDS_DIR
from tests.integration.chart_support import service_account_token, token_client
from tests.integration.support import Cluster, OperatorProcess, identity_from_pod
from tests.integration.test_runner_resilience import RUNNER, bind_runner, runner_role
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

NAMESPACE = "outages"
WINDOW = "8s"
OUTAGE_S = 15.0  # longer than the lease window


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


def _report_time(cluster: Cluster, name: str) -> datetime:
    progress = cluster.status(name).get("progress") or {}
    return datetime.fromisoformat(progress.get("reportTime", "1970-01-01T00:00:00Z"))
