"""Runners that are not the test process: the kubectl-only script and `tasklease run`.

`test_kubectl_only_runner*` run `examples/kubectl-runner.sh` with the control plane's own
kubectl, as the runner pod the operator created would. The `test_wrapper_*` tests go all
the way through a pod: the local executor runs each runner pod's command
(`python -m tasklease run -- sh -c ...`) as a process, authenticated as the pod's
ServiceAccount, so the lease is held by the wrapper exactly as in a cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import watch

from tasklease.controlplane.process import die_with_parent
from tests.integration.support import (
    Cluster,
    OperatorProcess,
    pod_env,
    shell,
    wait_for,
    wrapped,
)

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBECTL_RUNNER = REPO_ROOT / "examples" / "kubectl-runner.sh"


def attempt_outcomes(status: dict[str, Any]) -> list[str | None]:
    return [a.get("outcome") for a in status.get("attempts", [])]


# --- the kubectl-only runner --------------------------------------------------------------


def run_kubectl_runner(
    control_plane: Any, env: dict[str, str], home: Path
) -> subprocess.Popen[str]:
    kubectl_dir = str(Path(control_plane.binaries.kubectl).parent)
    home.mkdir(exist_ok=True)
    return subprocess.Popen(
        ["sh", str(KUBECTL_RUNNER)],
        env={
            "PATH": os.pathsep.join([kubectl_dir, "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(home),  # kubectl's discovery cache stays in the test's tmp dir
            "KUBECONFIG": str(control_plane.kubeconfig),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent(os.getpid()),
    )


def runner_env(cluster: Cluster, pod_name: str) -> dict[str, str]:
    pod = wait_for(f"runner pod {pod_name}", lambda: cluster.pod(pod_name))
    return {name: str(value) for name, value in pod_env(pod).items()}


def test_kubectl_only_runner(
    cluster: Cluster, operator_process: OperatorProcess, control_plane: Any, tmp_path: Path
) -> None:
    cluster.create_task(
        "by-kubectl",
        heartbeatInterval="1s",
        ackTimeout="10s",
        reportProgressTimeout="10s",
        parameters={"steps": "2", "stepSeconds": "3"},
    )
    cluster.wait_epoch("by-kubectl", 1)
    env = runner_env(cluster, "by-kubectl-1")
    process = run_kubectl_runner(control_plane, env, tmp_path / "home")
    try:
        status = cluster.wait_phase("by-kubectl", "Running", timeout=20)
        assert status["progress"]["epoch"] == 1

        # The background loop heartbeats between the steps' own reports.
        def beat() -> str:
            progress = cluster.status("by-kubectl").get("progress") or {}
            return str(progress.get("fields", {}).get("beat", ""))

        wait_for(
            "a heartbeat from the background loop",
            lambda: beat().startswith("heartbeat-"),
            timeout=10,
        )
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "reported FINISHED" in stderr

    status = cluster.wait_phase("by-kubectl", "Succeeded")
    assert status["result"]["status"] == "FINISHED"
    assert status["result"]["epoch"] == 1
    assert status["progress"]["percent"] == 100
    assert status["progress"]["message"] == "step 2 of 2"
    assert attempt_outcomes(status) == ["Succeeded"]


def test_kubectl_only_runner_with_a_stale_epoch_is_refused(
    cluster: Cluster, operator_process: OperatorProcess, control_plane: Any, tmp_path: Path
) -> None:
    cluster.create_task("moved-on", ackTimeout="2s", reportProgressTimeout="30s")
    cluster.wait_epoch("moved-on", 1)
    first = runner_env(cluster, "moved-on-1")
    cluster.wait_epoch("moved-on", 2, timeout=20)  # nobody acknowledged: handed out again
    # Keep epoch 2 where it is for the rest of the test.
    cluster.patch_spec("moved-on", {"ackTimeout": "5m", "reportProgressTimeout": "10m"})
    second = runner_env(cluster, "moved-on-2")
    before = cluster.status("moved-on")
    assert "progress" not in before and "result" not in before

    # The runner of epoch 1 wakes up late; then one with the right holder but a wrong epoch.
    wrong_epoch = {**second, "TASKLEASE_EPOCH": "99"}
    for index, env in enumerate((first, wrong_epoch)):
        process = run_kubectl_runner(control_plane, env, tmp_path / f"home-{index}")
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 143, stderr
        assert "lease lost" in stderr and "rejected our request" in stderr
        assert "acknowledged" not in stderr

    after = cluster.status("moved-on")
    assert "progress" not in after and "result" not in after
    assert after["epoch"] == 2 and after["phase"] == "Assigned"
    assert cluster.annotations("moved-on")["tasklease.io/holder"] == "moved-on-2"


# --- the wrapper, through the local executor ----------------------------------------------


def pid_of(executor: Any, namespace: str, pod: str) -> int:
    pid: int = wait_for(
        f"the process of pod {pod}", lambda: executor.pid_of(namespace, pod), timeout=30
    )
    return pid


def test_wrapper_runner_finishes_task(
    cluster: Cluster, operator_process: OperatorProcess, executor: Any
) -> None:
    script = shell(
        "echo hello from the program\n"
        'for i in 1 2 3; do progress "$i/4\\nstep $i\\nrows=${i}0\\n"; sleep 1; done\n'
        "progress '4/4\\nall done\\nrows=40\\ncheckpoint={\"row\": 40}\\n'\n"
        "echo finishing >&2\n"
    )
    cluster.create_task("wrapped", template=wrapped(script), heartbeatInterval="1s")
    seen: list[float] = []

    def finished() -> dict[str, Any] | None:
        status = cluster.status("wrapped")
        percent = (status.get("progress") or {}).get("percent")
        if percent is not None and percent not in seen:
            seen.append(percent)
        return status if status.get("phase") == "Succeeded" else None

    status = wait_for("task wrapped to succeed", finished, timeout=60, interval=0.2)
    assert status["result"]["status"] == "FINISHED"
    assert status["result"]["epoch"] == 1
    progress = status["progress"]
    assert progress["percent"] == 100
    assert progress["message"] == "all done"
    assert progress["fields"] == {"rows": "40"}
    assert progress["checkpoint"] == {"row": 40}
    assert attempt_outcomes(status) == ["Succeeded"]
    assert any(0 < percent < 100 for percent in seen), seen  # progress came while it ran
    logs = wait_for(
        "the pod's logs", lambda: executor.logs(cluster.namespace, "wrapped-1"), timeout=10
    )
    assert "hello from the program" in logs and "finishing" in logs


def test_checkpoint_of_a_wrapped_program_that_fails_reaches_the_next_attempt(
    cluster: Cluster, operator_process: OperatorProcess, executor: Any
) -> None:
    """The program writes a checkpoint and exits 1 at once, before the wrapper's next poll
    of the progress file: the checkpoint goes in the FAILED result's write, and the next
    attempt (through the executor, as the pod's ServiceAccount with the runner's rights)
    resumes from it."""
    script = shell(
        'if [ "$TASKLEASE_ATTEMPT" = 1 ]; then\n'
        '  progress \'3/10\\nfailing\\ncheckpoint={"row": 30}\\n\'; echo "disk full" >&2; exit 1\n'
        "fi\n"
        'progress "1/1\\nresumed from $TASKLEASE_CHECKPOINT\\n"\n'
    )
    cluster.create_task("fails-wrapped", template=wrapped(script), heartbeatInterval="1s")
    status = cluster.wait_phase("fails-wrapped", "Succeeded", timeout=60)
    assert attempt_outcomes(status) == ["Failed", "Succeeded"]
    assert "ExitCode1" in status["attempts"][0]["message"]
    assert status["progress"]["message"] == 'resumed from {"row": 30}'


def test_hung_wrapper_runner_is_replaced(
    cluster: Cluster, operator_process: OperatorProcess, executor: Any
) -> None:
    script = shell(
        'if [ "$TASKLEASE_ATTEMPT" = 1 ]; then progress "10%\\nworking\\n"; sleep 600; fi\n'
        'progress "1/1\\nfinished on attempt $TASKLEASE_ATTEMPT\\n"\n'
    )
    cluster.create_task(
        "hangs",
        template=wrapped(script),
        ackTimeout="3s",
        reportProgressTimeout="3s",
        heartbeatInterval="1s",
    )
    wait_for(
        "attempt 1 to report 10 %",
        lambda: (cluster.status("hangs").get("progress") or {}).get("percent") == 10,
        timeout=30,
    )
    pid = pid_of(executor, cluster.namespace, "hangs-1")
    os.kill(pid, signal.SIGSTOP)  # the whole wrapper hangs: no more heartbeats
    stopped_at = time.monotonic()
    try:
        status = cluster.wait_epoch("hangs", 2, timeout=30)
        assert time.monotonic() - stopped_at >= 2.0
        assert attempt_outcomes(status)[0] == "ProgressTimeout"
        status = cluster.wait_phase("hangs", "Succeeded", timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
    assert attempt_outcomes(status) == ["ProgressTimeout", "Succeeded"]
    assert status["result"]["epoch"] == 2
    assert status["progress"]["message"] == "finished on attempt 2"


class PodExits:
    """Records the exit codes a pod's container status shows, from a watch (the operator
    may delete the pod soon after it ends)."""

    def __init__(self, cluster: Cluster, pod_name: str) -> None:
        self.codes: list[int] = []
        self._cluster = cluster
        self._pod_name = pod_name
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = self._watch.stream(
            self._cluster.core.list_namespaced_pod,
            self._cluster.namespace,
            field_selector=f"metadata.name={self._pod_name}",
            timeout_seconds=20,
        )
        # The watch ends by itself, or with the control plane at the end of the session.
        with contextlib.suppress(Exception):
            for event in stream:
                for container in event["object"].status.container_statuses or []:
                    terminated = container.state.terminated if container.state else None
                    if terminated is not None and terminated.exit_code not in self.codes:
                        self.codes.append(terminated.exit_code)

    def stop(self) -> None:
        self._watch.stop()


def test_killed_runner_is_replaced_at_once(
    cluster: Cluster, operator_process: OperatorProcess, executor: Any
) -> None:
    script = shell(
        'if [ "$TASKLEASE_ATTEMPT" = 1 ]; then progress "10%\\n"; sleep 600; fi\n'
        'progress "1/1\\nfinished on attempt $TASKLEASE_ATTEMPT\\n"\n'
    )
    # Timeouts far longer than the test: only the dead-pod path can end the attempt.
    cluster.create_task(
        "killed",
        template=wrapped(script),
        ackTimeout="5m",
        reportProgressTimeout="5m",
        heartbeatInterval="1s",
        retry={"maxAttempts": 3, "backoff": {"initial": "0s"}},
    )
    wait_for(
        "attempt 1 to report 10 %",
        lambda: (cluster.status("killed").get("progress") or {}).get("percent") == 10,
        timeout=30,
    )
    exits = PodExits(cluster, "killed-1")
    pid = pid_of(executor, cluster.namespace, "killed-1")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        status = cluster.wait_epoch("killed", 2, timeout=20)
        assert time.monotonic() - killed_at < 10
        assert attempt_outcomes(status)[0] == "PodFailed"
        wait_for("the pod's exit code", lambda: exits.codes, timeout=10)
        assert exits.codes == [137]
    finally:
        exits.stop()
    status = cluster.wait_phase("killed", "Succeeded", timeout=60)
    assert attempt_outcomes(status) == ["PodFailed", "Succeeded"]
    assert status["result"]["epoch"] == 2
