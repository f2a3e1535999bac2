"""A runner keeps its lease through failures that are not a loss, and gives it up by itself
when it cannot report (design invariant 4).

The runner is the SDK (or the wrapper) authenticated as a ServiceAccount with a real token,
talking to the real API server, directly or through a relay the test can cut.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from soak.relay import Relay
from tasklease.controlplane.process import die_with_parent
from tasklease.runner import TaskLease
from tests.integration.chart_support import (
    service_account_token,
    token_client,
    write_token_kubeconfig,
)
from tests.integration.support import (
    RUNNER,
    Cluster,
    OperatorProcess,
    bind_runner,
    identity_from_pod,
    pod_env,
    unbind_runner,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


def test_transient_api_errors_do_not_abandon_the_lease(
    cluster: Cluster, operator_process: OperatorProcess, control_plane: Any, runner_account: str
) -> None:
    """Refusals that prove nothing (here 403s, as right after an API server restart while
    its RBAC loads: the runner can neither write nor read its Task) leave the lease held;
    the reports resume when they are allowed again, and the task is never handed on."""
    cluster.create_task("steady", ackTimeout="30s", reportProgressTimeout="30s")
    cluster.wait_epoch("steady", 1)
    pod = cluster.pod("steady-1")
    token = service_account_token(cluster.core, cluster.namespace, runner_account)
    api = token_client(control_plane, token)
    lease = TaskLease(identity_from_pod(pod), api_client=api, heartbeat_interval_s=0.5).start()
    try:
        cluster.wait_phase("steady", "Running")
        unbind_runner(cluster)
        wait_for(
            "a report refused with 403",
            lambda: "403" in (lease.last_report_error or "") or lease.lost,
            timeout=20,
        )
        assert lease.progress(percent=10) is False
        assert not lease.lost and not lease.canceled, lease.cancel_reason
        bind_runner(cluster)
        wait_for("the reports to resume", lambda: lease.progress(percent=20), timeout=20)
        assert not lease.lost and not lease.canceled
        lease.succeed()
    finally:
        lease.close()
    status = cluster.wait_phase("steady", "Succeeded")
    assert [attempt["outcome"] for attempt in status["attempts"]] == ["Succeeded"]
    assert status["progress"]["percent"] == 20


def test_a_failed_test_is_a_lost_lease(
    cluster: Cluster, operator_process: OperatorProcess, control_plane: Any, runner_account: str
) -> None:
    """The refusal that does prove a loss: the fenced write's `test` fails because the
    lease moved on (here, nobody acknowledged and epoch 2 was handed out)."""
    cluster.create_task("moved", ackTimeout="2s", reportProgressTimeout="30s")
    cluster.wait_epoch("moved", 1)
    first = identity_from_pod(cluster.pod("moved-1"))
    cluster.wait_epoch("moved", 2, timeout=20)
    token = service_account_token(cluster.core, cluster.namespace, runner_account)
    lease = TaskLease(first, api_client=token_client(control_plane, token), heartbeat_interval_s=5)
    try:
        lease.start()
        assert lease.lost and lease.canceled
        assert "test failed" in (lease.cancel_reason or ""), lease.cancel_reason
    finally:
        lease.close()


def test_partitioned_runner_stops_its_program_by_itself(
    cluster: Cluster,
    operator_process: OperatorProcess,
    control_plane: Any,
    runner_account: str,
    tmp_path: Path,
) -> None:
    """The wrapper is cut off from the API server (its requests hang): it stops its program
    after a whole reportProgressTimeout without a delivered report, while still cut off,
    about when the operator hands the task on, instead of working on beside the new pod."""
    cluster.create_task(
        "cut-off", ackTimeout="5s", reportProgressTimeout="5s", heartbeatInterval="1s"
    )
    cluster.wait_epoch("cut-off", 1)
    env = {name: str(value) for name, value in pod_env(cluster.pod("cut-off-1")).items()}
    token = service_account_token(cluster.core, cluster.namespace, runner_account)
    stopped = tmp_path / "stopped"
    host, port = control_plane.server.removeprefix("https://").rsplit(":", 1)
    with Relay((host, int(port))) as relay:
        kubeconfig = write_token_kubeconfig(
            tmp_path / "kubeconfig",
            control_plane,
            token,
            RUNNER,
            server=f"https://127.0.0.1:{relay.port}",
        )
        program = f'trap "echo stopped > {stopped}; exit 143" TERM; while :; do sleep 0.1; done'
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "tasklease", "run", "--grace-period", "5", "--",
             "sh", "-c", program],
            env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=die_with_parent(os.getpid()),
        )  # fmt: skip
        try:
            cluster.wait_phase("cut-off", "Running", timeout=20)
            relay.cut()
            output, _ = wrapper.communicate(timeout=60)  # still cut off when it ends
        finally:
            if wrapper.poll() is None:
                wrapper.kill()
                wrapper.communicate()
    assert wrapper.returncode == 143, output
    assert stopped.read_text().strip() == "stopped", output
    # Which window: reportProgressTimeout once the wrapper saw a report delivered, its
    # ackTimeout when the answers to its first reports came too late for it (a loaded
    # machine) although the API server applied them. Both are the same 5 s here.
    assert re.search(
        r"no report reached the API server for spec\.(reportProgressTimeout|ackTimeout) \(5s\)",
        output,
    ), output
    # The operator, which could see all along, handed the task to a new pod meanwhile.
    status = cluster.wait_epoch("cut-off", 2, timeout=20)
    assert status["attempts"][0]["outcome"] == "ProgressTimeout"
