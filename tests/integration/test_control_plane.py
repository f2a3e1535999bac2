"""The local control plane itself: the controllers tasklease relies on run, RBAC and
impersonation work, failures explain themselves, and no process outlives its owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasklease.controlplane import Binaries, ControlPlane, ControlPlaneError
from tasklease.controlplane.cluster import COMPONENTS
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

TASK_CRD = "tasks.tasklease.io"


def gone(kubectl: Any, *args: str) -> Callable[[], bool]:
    def check() -> bool:
        result = kubectl("get", *args, check=False)
        if result.returncode == 0:
            return False
        assert "NotFound" in result.stderr, result.stderr
        return True

    return check


def component_pids(marker: Path) -> list[int]:
    """Processes of ours (by binary name) whose command line mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # exited while we looked
        if Path(argv[0]).name in COMPONENTS and any(str(marker) in arg for arg in argv):
            found.append(int(entry.name))
    return found


def test_namespace_deletion_removes_its_objects(kubectl: Any, namespace: str) -> None:
    kubectl("create", "configmap", "doomed", "-n", namespace, "--from-literal=a=b")
    if kubectl("get", "crd", TASK_CRD, check=False).returncode == 0:
        task = {
            "apiVersion": "tasklease.io/v1alpha1",
            "kind": "Task",
            "metadata": {"name": "doomed", "namespace": namespace},
            "spec": {"workerGroup": "test"},
        }
        kubectl("create", "-f", "-", input=json.dumps(task))

    kubectl("delete", "namespace", namespace, "--wait=false")

    # The namespace controller waits a fixed 5 s before emptying a namespace; the namespace
    # object goes only after everything in it is gone.
    wait_for("the namespace to go", gone(kubectl, "namespace", namespace), timeout=60)


def test_garbage_collector_deletes_dependents(kubectl: Any, namespace: str) -> None:
    kubectl("create", "configmap", "owner", "-n", namespace)
    uid = kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}")
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid.stdout}
            ],
        },
    }
    kubectl("create", "-f", "-", input=json.dumps(dependent))

    kubectl("delete", "configmap", "owner", "-n", namespace)

    wait_for("the garbage collector", gone(kubectl, "configmap", "dependent", "-n", namespace))


def test_default_service_account_is_created(kubectl: Any) -> None:
    namespace = f"t-sa-{os.getpid()}-{time.monotonic_ns() % 100_000}"
    kubectl("create", "namespace", namespace)
    try:
        wait_for(
            "the default ServiceAccount",
            lambda: not gone(kubectl, "serviceaccount", "default", "-n", namespace)(),
        )

        # Its tokens are signed and accepted: the service-account key and issuer line up.
        token = kubectl("create", "token", "default", "-n", namespace).stdout.strip()
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        result = kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review))
        status = json.loads(result.stdout)["status"]
        assert status["authenticated"] is True
        assert status["user"]["username"] == f"system:serviceaccount:{namespace}:default"
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false")


def test_rbac_applies_to_impersonated_users(kubectl: Any, namespace: str) -> None:
    whoami = kubectl("auth", "whoami", "--as=alice", "--as-group=team", "-o", "json")
    user = json.loads(whoami.stdout)["status"]["userInfo"]
    assert user["username"] == "alice"
    assert "team" in user["groups"]

    denied = kubectl("get", "configmaps", "-n", namespace, "--as=alice", check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()

    # `view` is an aggregated ClusterRole: this also proves the aggregation controller runs.
    kubectl(
        "create", "rolebinding", "alice-view", "-n", namespace, "--clusterrole=view", "--user=alice"
    )
    wait_for(
        "alice to be allowed to view",
        lambda: (
            kubectl("get", "configmaps", "-n", namespace, "--as=alice", check=False).returncode == 0
        ),
        timeout=10,
    )


@pytest.mark.parametrize("component", ["etcd", "kube-apiserver"])
def test_component_failure_shows_log_tail(
    control_plane_binaries: Binaries, tmp_path: Path, component: str
) -> None:
    state_dir = tmp_path / "broken"

    with pytest.raises(ControlPlaneError) as failure:
        ControlPlane.start(
            state_dir,
            binaries=control_plane_binaries,
            extra_args={component: ["--no-such-flag"]},
            timeout=60,
        )

    message = str(failure.value)
    assert message.startswith(f"{component} exited with code")
    assert "Last 40 lines of its log" in message
    assert "no-such-flag" in message  # the component's own complaint, from its log
    assert component_pids(state_dir) == []
    assert not state_dir.exists()


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_no_process_left_behind_after_stop(
    control_plane_binaries: Binaries, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """SIGKILL leaves Python no chance to clean up (PR_SET_PDEATHSIG does it); SIGTERM must
    stop everything in order and remove the state dir."""
    state_dir = tmp_path / "state"
    stdout_path, stderr_path = tmp_path / "up.out", tmp_path / "up.err"
    env = {**os.environ, "KUBEBUILDER_ASSETS": str(control_plane_binaries.directory)}
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        up = subprocess.Popen(
            [sys.executable, "-m", "tasklease.controlplane", "up", "--state-dir", str(state_dir)],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    try:
        wait_for(
            "the control plane to be up, or its command to end",
            lambda: up.poll() is not None or "export KUBECONFIG=" in stdout_path.read_text(),
            timeout=120,
        )
        assert up.poll() is None, stderr_path.read_text()
        assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in stdout_path.read_text()
        assert len(component_pids(state_dir)) == len(COMPONENTS)

        up.send_signal(stop_signal)
        returncode = up.wait(timeout=60)

        wait_for("every component to exit", lambda: component_pids(state_dir) == [], timeout=10)
        if stop_signal == signal.SIGTERM:
            assert returncode == 0, stderr_path.read_text()
            assert not state_dir.exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in component_pids(state_dir):
            os.kill(pid, signal.SIGKILL)


def test_applied_crds_are_served_once_applied(
    control_plane: ControlPlane, kubectl: Any, namespace: str, tmp_path: Path
) -> None:
    """`apply_crds` returns once the new CRD is Established: an object of it can be created
    at once (`kubectl wait --for=condition=established` could fail instead, on a CRD whose
    status had no conditions yet)."""
    group = f"{namespace}.example.com"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"probes.{group}"},
        "spec": {
            "group": group,
            "names": {"plural": "probes", "singular": "probe", "kind": "Probe"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                }
            ],
        },
    }
    manifest = tmp_path / "crd.json"
    manifest.write_text(json.dumps(crd))
    try:
        control_plane.apply_crds(manifest)
        probe = {"apiVersion": f"{group}/v1", "kind": "Probe", "metadata": {"name": "p"}}
        kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(probe))
    finally:
        kubectl("delete", "crd", f"probes.{group}", "--wait=false", check=False)
