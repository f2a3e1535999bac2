"""The local pod executor against a real API server: pods bound, run as processes, reported
and deleted as a kubelet would, and nothing left running after it stops."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import TASK_LABEL
from tasklease.executor import LOCAL_EXECUTOR_LABEL, LocalExecutor
from tests.integration.support import wait_for, wait_phase

pytestmark = pytest.mark.cluster


@pytest.fixture
def executor(control_plane: Any, tmp_path: Path) -> Iterator[LocalExecutor]:
    """An executor taking every unscheduled pod (tests run one at a time), renewing its
    node Lease every second."""
    with LocalExecutor(
        control_plane.kubeconfig,
        tmp_path / "executor",
        all_pods=True,
        lease_renew_interval_s=1.0,
        stop_grace_s=2.0,
    ) as running:
        yield running


@pytest.fixture
def core(kube_config: Any) -> client.CoreV1Api:
    return client.CoreV1Api(kube_config)


def pod_manifest(
    name: str,
    script: str,
    *,
    env: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["sh", "-c", script],
                    "env": env or [],
                }
            ],
            **spec,
        },
    }


def read_pod(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        response = core.read_namespaced_pod(name, namespace, _preload_content=False)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    pod: dict[str, Any] = json.loads(response.data)
    return pod


def wait_pod_phase(
    core: client.CoreV1Api, namespace: str, name: str, *phases: str, timeout: float = 30.0
) -> dict[str, Any]:
    return wait_phase(
        f"pod {name}", lambda: read_pod(core, namespace, name), *phases, timeout=timeout
    )


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]
    assert "terminated" in state, state
    result: dict[str, Any] = state["terminated"]
    return result


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def test_failing_process_fails_the_pod_with_its_exit_code_and_keeps_its_output(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_pod(namespace, pod_manifest("fails", "echo hi; exit 3"))

    pod = wait_pod_phase(core, namespace, "fails", "Failed")

    assert pod["spec"]["nodeName"] == executor.node_name
    assert pod["status"]["podIP"] == "127.0.0.1"
    end = terminated(pod)
    assert end["exitCode"] == 3
    assert end["reason"] == "Error"
    assert end["startedAt"] and end["finishedAt"]
    assert "hi" in executor.logs(namespace, "fails")
    assert executor.log_path(namespace, "fails") == (
        executor.state_dir / "logs" / f"{namespace}_fails.log"
    )


def test_process_exiting_zero_succeeds_the_pod(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_pod(namespace, pod_manifest("works", "echo done; exit 0"))

    pod = wait_pod_phase(core, namespace, "works", "Succeeded")

    assert terminated(pod)["exitCode"] == 0
    assert terminated(pod)["reason"] == "Completed"
    conditions = {c["type"]: c for c in pod["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "PodCompleted"
    assert conditions["PodScheduled"]["status"] == "True"


def test_running_pod_is_reported_running_and_sigkill_fails_it_with_137(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_pod(namespace, pod_manifest("sleeper", "sleep 100"))

    pod = wait_pod_phase(core, namespace, "sleeper", "Running")
    status = pod["status"]
    assert status["podIP"] == "127.0.0.1"
    assert status["containerStatuses"][0]["state"]["running"]["startedAt"]
    assert status["containerStatuses"][0]["ready"] is True
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    for type_ in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
        assert conditions[type_] == "True", type_

    pid = executor.pid_of(namespace, "sleeper")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    pod = wait_pod_phase(core, namespace, "sleeper", "Failed", timeout=5.0)
    assert time.monotonic() - killed_at < 3.0
    assert terminated(pod)["exitCode"] == 137
    assert terminated(pod)["signal"] == signal.SIGKILL
    assert executor.pid_of(namespace, "sleeper") is None


def test_environment_has_values_downward_api_fields_and_referenced_data(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"color": "blue"}}
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}
    )
    env: list[dict[str, Any]] = [
        {"name": "GREETING", "value": "hello"},
        {"name": "PHRASE", "value": "$(GREETING) world, $$(GREETING)"},
        *(
            {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
            for name, path in [
                ("POD_NAME", "metadata.name"),
                ("POD_NAMESPACE", "metadata.namespace"),
                ("POD_UID", "metadata.uid"),
                ("NODE_NAME", "spec.nodeName"),
                ("ACCOUNT", "spec.serviceAccountName"),
                ("POD_IP", "status.podIP"),
                ("APP", "metadata.labels['app']"),
                ("NOTE", "metadata.annotations['note']"),
            ]
        ),
        {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
    ]
    manifest = pod_manifest("env", "env; echo ARG=$(GREETING)", env=env, labels={"app": "demo"})
    manifest["metadata"]["annotations"] = {"note": "from the test"}
    created = core.create_namespaced_pod(namespace, manifest)

    wait_pod_phase(core, namespace, "env", "Succeeded")

    output = executor.logs(namespace, "env").splitlines()
    seen = dict(line.split("=", 1) for line in output if "=" in line)
    assert seen["PHRASE"] == "hello world, $(GREETING)"
    assert seen["ARG"] == "hello"
    assert seen["POD_NAME"] == "env"
    assert seen["POD_NAMESPACE"] == namespace
    assert seen["POD_UID"] == created.metadata.uid
    assert seen["NODE_NAME"] == executor.node_name
    assert seen["ACCOUNT"] == "default"
    assert seen["POD_IP"] == "127.0.0.1"
    assert seen["APP"] == "demo"
    assert seen["NOTE"] == "from the test"
    assert seen["COLOR"] == "blue"
    assert seen["PASSWORD"] == "s3cret"
    assert seen["HOSTNAME"] == "env"
    assert seen["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert Path(seen["KUBECONFIG"]).is_relative_to(executor.state_dir)


def test_graceful_deletion_sends_sigterm_and_removes_the_pod(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    script = 'trap "echo got TERM; exit 0" TERM; echo ready; sleep 100 & wait'
    core.create_namespaced_pod(namespace, pod_manifest("graceful", script))
    wait_for("the trap", lambda: "ready" in executor.logs(namespace, "graceful"))

    core.delete_namespaced_pod("graceful", namespace, grace_period_seconds=5)
    deleted_at = time.monotonic()

    wait_for("the pod to go", lambda: read_pod(core, namespace, "graceful") is None, timeout=10)
    assert time.monotonic() - deleted_at < 4.0  # the process ended at once; no grace wait
    assert "got TERM" in executor.logs(namespace, "graceful")


def test_deletion_kills_a_process_ignoring_sigterm_after_the_grace_period(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    script = 'trap "" TERM; echo ready; sleep 100 & wait'
    core.create_namespaced_pod(namespace, pod_manifest("stubborn", script))
    wait_for("the trap", lambda: "ready" in executor.logs(namespace, "stubborn"))
    pid = executor.pid_of(namespace, "stubborn")
    assert pid is not None
    members = group_members(pid)

    core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=2)
    deleted_at = time.monotonic()

    wait_for("the pod to go", lambda: read_pod(core, namespace, "stubborn") is None, timeout=10)
    assert time.monotonic() - deleted_at >= 1.5
    assert not [member for member in members if process_alive(member)]


def test_node_is_registered_ready_and_its_lease_renewed(
    executor: LocalExecutor, kube_config: Any
) -> None:
    core = client.CoreV1Api(kube_config)
    node = core.read_node(executor.node_name)
    assert node.metadata.labels[LOCAL_EXECUTOR_LABEL] == "true"
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.status == "True"
    assert int(node.status.allocatable["pods"]) > 0
    assert node.status.capacity["cpu"] == str(os.cpu_count())
    assert not node.spec.taints

    leases = client.CoordinationV1Api(kube_config)
    first = leases.read_namespaced_lease(executor.node_name, "kube-node-lease").spec
    assert first.holder_identity == executor.node_name
    wait_for(
        "a lease renewal",
        lambda: (
            leases.read_namespaced_lease(executor.node_name, "kube-node-lease").spec.renew_time
            > first.renew_time
        ),
        timeout=5.0,
    )


def test_pod_process_authenticates_as_its_service_account_bound_to_the_pod(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    review = (
        "from kubernetes import client, config; config.load_kube_config(); "
        "body = {'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'}; "
        "print(client.AuthenticationV1Api().create_self_subject_review("
        "body, _preload_content=False).data.decode())"
    )
    manifest = pod_manifest("whoami", "")
    manifest["spec"]["containers"][0]["command"] = ["python", "-c", review]
    core.create_namespaced_pod(namespace, manifest)

    wait_pod_phase(core, namespace, "whoami", "Succeeded")

    output = executor.logs(namespace, "whoami").strip().splitlines()[-1]
    user = json.loads(output)["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{namespace}:default"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["whoami"]
    assert user["extra"]["authentication.kubernetes.io/node-name"] == [executor.node_name]


def test_pod_without_its_service_account_fails_with_a_clear_message(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "short-lived"}})
    gated = pod_manifest(
        "orphan",
        "exit 0",
        serviceAccountName="short-lived",
        schedulingGates=[{"name": "tasklease.io/test"}],
    )
    core.create_namespaced_pod(namespace, gated)
    core.delete_namespaced_service_account("short-lived", namespace)
    core.patch_namespaced_pod("orphan", namespace, {"spec": {"schedulingGates": None}})

    pod = wait_pod_phase(core, namespace, "orphan", "Failed")

    assert pod["spec"]["nodeName"] == executor.node_name
    assert pod["status"]["reason"] == "CreateContainerConfigError"
    assert "ServiceAccount" in pod["status"]["message"]
    assert "short-lived" in pod["status"]["message"]


def test_missing_command_or_executable_fails_the_pod_at_start(
    executor: LocalExecutor, core: client.CoreV1Api, namespace: str
) -> None:
    missing = pod_manifest("missing", "")
    missing["spec"]["containers"][0]["command"] = ["/nonexistent/program"]
    core.create_namespaced_pod(namespace, missing)
    no_command = pod_manifest("imageonly", "")
    del no_command["spec"]["containers"][0]["command"]
    core.create_namespaced_pod(namespace, no_command)

    pod = wait_pod_phase(core, namespace, "missing", "Failed")
    assert pod["status"]["reason"] == "StartError"
    assert "/nonexistent/program" in pod["status"]["message"]
    assert terminated(pod)["exitCode"] == 128

    pod = wait_pod_phase(core, namespace, "imageonly", "Failed")
    assert pod["status"]["reason"] == "CreateContainerConfigError"
    assert "no command" in pod["status"]["message"]


def test_default_executor_takes_only_tasklease_pods(
    control_plane: Any, core: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    node = f"tasklease-{namespace}"
    with LocalExecutor(control_plane.kubeconfig, tmp_path / "executor", node_name=node):
        core.create_namespaced_pod(namespace, pod_manifest("other", "exit 0"))
        core.create_namespaced_pod(
            namespace, pod_manifest("runner", "exit 0", labels={TASK_LABEL: "t"})
        )
        pod = wait_pod_phase(core, namespace, "runner", "Succeeded")
        assert pod["spec"]["nodeName"] == node
        other = read_pod(core, namespace, "other")
        assert other is not None
        assert not other["spec"].get("nodeName")


def test_no_pod_process_outlives_the_executor(
    control_plane: Any, core: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    with LocalExecutor(
        control_plane.kubeconfig, tmp_path / "executor", all_pods=True, stop_grace_s=1.0
    ) as executor:
        # The second child ignores SIGTERM: only SIGKILL ends it.
        script = "sleep 100 & sh -c 'trap \"\" TERM; sleep 100' & echo ready; wait"
        core.create_namespaced_pod(namespace, pod_manifest("busy", script))
        wait_for("the children", lambda: "ready" in executor.logs(namespace, "busy"))
        pid = executor.pid_of(namespace, "busy")
        assert pid is not None
        members: list[int] = wait_for(
            "three processes", lambda: m if len(m := group_members(pid)) >= 3 else None
        )

    assert not [member for member in members if process_alive(member)]
    pod = wait_pod_phase(core, namespace, "busy", "Failed", timeout=5.0)
    assert pod["status"]["reason"] == "Terminated"
    node = core.read_node(executor.node_name)
    assert next(c for c in node.status.conditions if c.type == "Ready").status == "False"


def test_pods_left_on_the_node_are_settled_when_an_executor_starts(
    control_plane: Any, core: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    node = f"tasklease-{namespace}"
    # Bound directly, as if an executor before this one had taken them and died.
    core.create_namespaced_pod(namespace, pod_manifest("lost", "sleep 100", nodeName=node))
    core.patch_namespaced_pod_status("lost", namespace, {"status": {"phase": "Running"}})
    core.create_namespaced_pod(namespace, pod_manifest("doomed", "sleep 100", nodeName=node))
    core.delete_namespaced_pod("doomed", namespace, grace_period_seconds=30)
    assert read_pod(core, namespace, "doomed") is not None  # waits for its node's kubelet

    with LocalExecutor(control_plane.kubeconfig, tmp_path / "executor", node_name=node) as ex:
        pod = wait_pod_phase(core, namespace, "lost", "Failed")
        assert pod["status"]["reason"] == "ContainerStatusUnknown"
        assert terminated(pod)["exitCode"] == 137
        wait_for("doomed to go", lambda: read_pod(core, namespace, "doomed") is None)
        assert ex.logs(namespace, "doomed") == ""  # never started


def test_cli_survives_nothing_of_a_killed_executor_and_stops_on_sigterm(
    control_plane: Any, core: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    from tasklease.executor.processes import kill_marked, marked_pids

    state = (tmp_path / "executor").resolve()
    node = f"tasklease-{namespace}"
    argv = [
        sys.executable,
        "-m",
        "tasklease.executor",
        f"--kubeconfig={control_plane.kubeconfig}",
        f"--state-dir={state}",
        f"--node-name={node}",
    ]
    log = (tmp_path / "cli.log").open("ab")
    first = subprocess.Popen(argv, stdout=log, stderr=log)
    second: subprocess.Popen[bytes] | None = None
    try:
        script = "sleep 100 & echo ready; wait"
        labels = {TASK_LABEL: "t"}
        core.create_namespaced_pod(namespace, pod_manifest("busy", script, labels=labels))
        pod = wait_pod_phase(core, namespace, "busy", "Running")
        main_pid = int(pod["status"]["containerStatuses"][0]["containerID"].split("://")[1])
        children: list[int] = wait_for(
            "the pod's processes", lambda: p if len(p := marked_pids(str(state))) >= 2 else None
        )

        first.kill()  # no code runs: PR_SET_PDEATHSIG takes the pod's main process along
        first.wait()
        wait_for("the main process to die", lambda: not process_alive(main_pid), timeout=5)

        second = subprocess.Popen(argv, stdout=log, stderr=log)
        pod = wait_pod_phase(core, namespace, "busy", "Failed")
        assert pod["status"]["reason"] == "ContainerStatusUnknown"
        # The orphaned `sleep` was found by its marker and killed when the executor came back.
        assert not [pid for pid in children if process_alive(pid)]

        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        ready = next(c for c in core.read_node(node).status.conditions if c.type == "Ready")
        assert ready.status == "False"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        kill_marked(str(state))
        log.close()


def test_executor_never_starts_a_deleted_pod(
    executor: LocalExecutor,
    core: client.CoreV1Api,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pods deleted while the executor is still busy starting the ones before them: their
    `seen` events wait in its queue behind the others', and by the time it gets to them the
    pods are gone. It must act on what it knows now, not on what the queue says: no process
    for a deleted pod (an operator's replaced runner would run beside its successor)."""
    # No token to request (which would fail for a deleted pod and hide the start).
    bound: dict[str, Any] = {
        "nodeName": executor.node_name,
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
    }
    caplog.set_level(logging.INFO, logger="tasklease.executor")
    busy = [f"busy-{i}" for i in range(30)]
    doomed = [f"doomed-{i}" for i in range(10)]
    for name in [*busy, *doomed]:
        core.create_namespaced_pod(namespace, pod_manifest(name, "sleep 30", **bound))
    for name in doomed:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    # The executor's queue is first in, first out: once a pod created after all of these
    # runs, every message about them has been handled.
    core.create_namespaced_pod(namespace, pod_manifest("sentinel", "sleep 30", **bound))
    wait_pod_phase(core, namespace, "sentinel", "Running", timeout=120)
    started = [name for name in doomed if executor.log_path(namespace, name).exists()]
    assert started == [], f"processes were started for deleted pods: {started}"
    tried = [r.getMessage() for r in caplog.records if "doomed" in r.getMessage()]
    assert tried == [], tried
    assert all(executor.log_path(namespace, name).exists() for name in busy)
