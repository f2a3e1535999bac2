"""`kubectl tasklease` and `kubectl wait` against real Tasks, through the real kubectl.

kubectl finds the plugin as users' kubectl does: the executable `kubectl-tasklease` that
the package installs beside this interpreter, first on PATH. The runner is the SDK with a
ServiceAccount token, the operator a real process; no kubelet runs here, so runner pods
stay Pending without a node.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasklease.runner import TaskLease
from tasklease.runner.pool import PoolRunner
from tests.conftest import Kubectl
from tests.integration.chart_support import service_account_token, token_client
from tests.integration.support import Cluster, OperatorProcess, identity_from_pod
from tests.readme import readme_lines
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

Run = Callable[..., subprocess.CompletedProcess[str]]
WAIT_MARKER = "<!-- tests/integration/test_kubectl_plugin.py runs these lines as they are -->"
NOT_FOUND = 'Error from server (NotFound): tasks.tasklease.io "nope" not found\n'


@pytest.fixture
def plugin_env(control_plane: Any, tmp_path: Path) -> dict[str, str]:
    """kubectl's environment: the plugin first on PATH, the control plane's kubeconfig, and
    kubectl's discovery cache in the test's folder (not one per random port in ~/.kube)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["KUBECONFIG"] = str(control_plane.kubeconfig)
    env["KUBECACHEDIR"] = str(tmp_path / "kube-cache")
    return env


@pytest.fixture
def run_kubectl(control_plane: Any, plugin_env: dict[str, str]) -> Run:
    """`run_kubectl(*args, env=None)`: the real kubectl, its output captured as text."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(control_plane.binaries.kubectl), *args],
            env=env or plugin_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


@pytest.fixture
def start_kubectl(
    control_plane: Any, plugin_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., tuple[subprocess.Popen[str], Path]]]:
    """`start_kubectl(*args) -> (process, output file)`: a kubectl left running (a watch, a
    wait), stdout and stderr into one file; stopped after the test if still running."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], Path]:
        output = tmp_path / f"kubectl-{len(started)}.out"
        with output.open("w") as sink:
            process = subprocess.Popen(
                [str(control_plane.binaries.kubectl), *args],
                env=plugin_env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
            )
        started.append(process)
        return process, output

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_runner(cluster: Cluster, control_plane: Any, account: str, pod_name: str) -> TaskLease:
    """The SDK acknowledging as the runner pod `pod_name`, with a ServiceAccount token."""
    token = service_account_token(cluster.core, cluster.namespace, account)
    pod = wait_for(f"runner pod {pod_name}", lambda: cluster.pod(pod_name))
    lease = TaskLease(
        identity_from_pod(pod),
        api_client=token_client(control_plane, token),
        heartbeat_interval_s=1.0,
    )
    return lease.start()


def table_rows(text: str) -> list[list[str]]:
    """A kubectl table's cells (3 spaces or more apart; single spaces inside a cell)."""
    return [re.split(r" {3,}", line.strip()) for line in text.strip().splitlines()]


def assert_conditions_follow_the_generation(task: dict[str, Any]) -> None:
    """Every condition says which spec it was written for (Kubernetes API conventions), and
    a final Task's are for its current spec, so `kubectl wait` trusts them."""
    generation = task["metadata"]["generation"]
    conditions = task["status"]["conditions"]
    assert conditions and all(c["observedGeneration"] == generation for c in conditions), (
        generation,
        conditions,
    )
    assert task["status"]["observedGeneration"] == generation


def test_kubectl_plugin_get_describe_cancel_rerun_logs(
    cluster: Cluster,
    operator_process: OperatorProcess,
    control_plane: Any,
    runner_account: str,
    namespace: str,
    run_kubectl: Run,
    plugin_env: dict[str, str],
    tmp_path: Path,
) -> None:
    cluster.create_task("orders", parameters={"day": "2026-11-28"})
    cluster.wait_epoch("orders", 1)
    lease = start_runner(cluster, control_plane, runner_account, "orders-1")
    try:
        assert lease.progress(percent=40, message="loading partition 4")
        cluster.wait_phase("orders", "Running")
        cluster.wait_events("orders", "Acknowledged")

        # get: the namespace from -n, and from the context when no -n is given.
        listed = run_kubectl("tasklease", "get", "-n", namespace)
        assert listed.returncode == 0, listed.stderr
        header, row = table_rows(listed.stdout)
        assert header == ["NAME", "PHASE", "ATTEMPT", "HOLDER", "PROGRESS", "LAST REPORT", "AGE"]
        assert row[:5] == ["orders", "Running", "1/3", "orders-1", "[####......] 40%"]
        assert re.fullmatch(r"\d+s", row[5]) and re.fullmatch(r"\d+s", row[6]), row
        kubeconfig = yaml.safe_load(Path(plugin_env["KUBECONFIG"]).read_text())
        context = kubeconfig["contexts"][0]
        kubeconfig["contexts"].append(
            {"name": "in-test", "context": {**context["context"], "namespace": namespace}}
        )
        own = tmp_path / "kubeconfig"
        own.write_text(yaml.safe_dump(kubeconfig))
        no_env = {k: v for k, v in plugin_env.items() if k != "KUBECONFIG"}
        by_context = run_kubectl(
            "tasklease", "--kubeconfig", str(own), "--context", "in-test", "get", env=no_env
        )
        assert table_rows(by_context.stdout)[1][:2] == ["orders", "Running"], by_context
        everywhere = table_rows(run_kubectl("tasklease", "get", "-A").stdout)
        assert everywhere[0][:2] == ["NAMESPACE", "NAME"]
        assert [namespace, "orders", "Running"] in [r[:3] for r in everywhere]
        as_json = run_kubectl("tasklease", "get", "orders", "-n", namespace, "-o", "yaml")
        assert yaml.safe_load(as_json.stdout)["status"]["progress"]["percent"] == 40
        missing = run_kubectl("tasklease", "get", "nope", "-n", namespace)
        assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", NOT_FOUND)

        # describe: spec, status, the attempt timeline, the current attempt, Events.
        described = run_kubectl("tasklease", "describe", "orders", "-n", namespace)
        assert described.returncode == 0, described.stderr
        text = described.stdout
        assert re.search(r"^  Parameters: +day=2026-11-28$", text, re.MULTILINE), text
        assert re.search(r"^  Phase: +Running$", text, re.MULTILINE), text
        assert "  epoch 1, holder orders-1, since " in text
        timeline = table_rows(text.split("Attempts:\n")[1].split("Conditions:")[0])
        assert [r[:3] for r in timeline] == [["ATTEMPT", "EPOCH", "HOLDER"], ["1", "1", "orders-1"]]
        assert re.search(r"^  Leased +True +Running ", text, re.MULTILINE), text
        events = [r[1] for r in table_rows(text.split("Events:\n")[1])[2:]]
        assert events[:2] == ["HandedOut", "Acknowledged"], text

        # logs: kubectl logs of the holder pod. Without a node it has no logs, so kubectl
        # prints nothing and succeeds; its own refusal of a wrong container passes through.
        logs = run_kubectl("tasklease", "logs", "orders", "-n", namespace)
        assert (logs.returncode, logs.stdout) == (0, ""), logs.stderr
        assert logs.stderr == "pod/orders-1 holds task orders (epoch 1)\n"
        wrong = run_kubectl("tasklease", "logs", "orders", "-n", namespace, "-c", "nosuch")
        assert wrong.returncode == 1
        assert wrong.stderr.splitlines() == [
            "pod/orders-1 holds task orders (epoch 1)",
            "error: container nosuch is not valid for pod orders-1 out of: runner",
        ]

        # rerun refuses a Task that is not final.
        early = run_kubectl("tasklease", "rerun", "orders", "-n", namespace)
        assert early.returncode == 1
        assert early.stderr.startswith('error: task "orders" is Running, not final'), early
        lease.succeed()
    finally:
        lease.close()
    finished = cluster.wait_phase("orders", "Succeeded")
    assert finished["progress"]["percent"] == 40

    no_holder = run_kubectl("tasklease", "logs", "orders", "-n", namespace)
    assert no_holder.returncode == 1
    assert no_holder.stderr.startswith('error: task "orders" has no holder (Succeeded)')
    assert f"last attempt ran in pod orders-1: kubectl logs orders-1 -n {namespace}" in (
        no_holder.stderr
    )

    # rerun: a new Task with the spec kept, none of the lease or the status.
    rerun = run_kubectl("tasklease", "rerun", "orders", "-n", namespace)
    assert rerun.returncode == 0, rerun.stderr
    created = re.fullmatch(
        r"task\.tasklease\.io/(orders-rerun-[a-z0-9]{5}) created\n", rerun.stdout
    )
    assert created, rerun.stdout
    original = cluster.task("orders")
    copy = cluster.task(created.group(1))
    assert copy["spec"] == original["spec"]
    assert cluster.wait_epoch(created.group(1), 1)["attempt"] == 1  # its own first attempt
    named = run_kubectl("tasklease", "rerun", "orders", "--name", "orders-again", "-n", namespace)
    assert named.stdout == "task.tasklease.io/orders-again created\n", named.stderr
    cluster.wait_epoch("orders-again", 1)

    # cancel: spec.cancel by a merge patch; a final Task is left as it is.
    canceled = run_kubectl("tasklease", "cancel", "orders-again", "-n", namespace)
    assert canceled.stdout == "task.tasklease.io/orders-again canceled\n", canceled.stderr
    cluster.wait_phase("orders-again", "Canceled")
    again = cluster.task("orders-again")
    assert again["spec"]["cancel"] is True and again["metadata"]["generation"] == 2
    assert_conditions_follow_the_generation(again)
    done = run_kubectl("tasklease", "cancel", "orders", "-n", namespace)
    assert done.stdout == "task.tasklease.io/orders unchanged: already Succeeded\n", done.stderr
    assert cluster.task("orders")["metadata"]["generation"] == 1
    assert_conditions_follow_the_generation(cluster.task("orders"))
    gone = run_kubectl("tasklease", "cancel", "nope", "-n", namespace)
    assert (gone.returncode, gone.stderr) == (1, NOT_FOUND)


def test_kubectl_plugin_logs_of_a_pool_task_names_the_pool_runners_pod(
    cluster: Cluster, operator_process: OperatorProcess, namespace: str, run_kubectl: Run
) -> None:
    """A pool runner serves many tasks: its logs are not the task's, so the plugin names its
    pod instead of showing them."""
    cluster.core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "warm-a"},
            "spec": {"containers": [{"name": "runner", "image": "busybox"}]},
        },
    )
    cluster.create_pool_task("shard-7", "etl")
    cluster.wait_offered("shard-7")
    runner = PoolRunner(
        "etl", namespace=namespace, pod_name="warm-a", api_client=cluster.api_client
    )
    with runner:
        task = runner.poll_for_task(timeout_s=10)
        assert task is not None
        logs = run_kubectl("tasklease", "logs", "shard-7", "-n", namespace)
        task.close()
    assert (logs.returncode, logs.stdout) == (1, "")
    assert logs.stderr.startswith(
        'error: task "shard-7" is a pool task held by pool runner pod warm-a: '
        f"kubectl logs warm-a -n {namespace}; "
    ), logs.stderr


def test_kubectl_plugin_watch_ends_when_the_task_is_final(
    cluster: Cluster,
    operator_process: OperatorProcess,
    control_plane: Any,
    runner_account: str,
    namespace: str,
    start_kubectl: Callable[..., tuple[subprocess.Popen[str], Path]],
    run_kubectl: Run,
) -> None:
    """A line per visible change while the Task runs; exit 0 when it Succeeded, 1 when it
    ended otherwise."""
    cluster.create_task("watched")
    cluster.wait_epoch("watched", 1)
    watch, output = start_kubectl("tasklease", "watch", "watched", "-n", namespace)
    wait_for("watch's first line", lambda: "watched  Assigned" in output.read_text())
    lease = start_runner(cluster, control_plane, runner_account, "watched-1")
    try:
        lease.progress(percent=50, message="half way")
        wait_for("the report in watch's output", lambda: "[#####.....] 50%" in output.read_text())
        assert watch.poll() is None
        lease.succeed()
    finally:
        lease.close()
    assert watch.wait(timeout=30) == 0, output.read_text()
    last = output.read_text().splitlines()[-1]
    assert last.startswith("watched  Succeeded  attempt 1/3"), last
    assert last.endswith("the runner reported FINISHED"), last
    # A final Task: one line, at once.
    again = run_kubectl("tasklease", "watch", "watched", "-n", namespace)
    assert again.returncode == 0 and len(again.stdout.splitlines()) == 1, again

    cluster.create_task("doomed", retry={"maxAttempts": 3, "nonRetryableErrors": ["BadInput"]})
    cluster.wait_epoch("doomed", 1)
    impatient = run_kubectl("tasklease", "watch", "doomed", "-n", namespace, "--timeout=1s")
    assert impatient.returncode == 1
    assert impatient.stderr == (
        "error: timed out waiting for task.tasklease.io/doomed to be final (it is Assigned)\n"
    )
    watch, output = start_kubectl("tasklease", "watch", "doomed", "-n", namespace)
    lease = start_runner(cluster, control_plane, runner_account, "doomed-1")
    try:
        lease.fail("BadInput", "no such day")
    finally:
        lease.close()
    assert watch.wait(timeout=30) == 1, output.read_text()
    assert output.read_text().splitlines()[-1].startswith("doomed  Failed  attempt 1/3")


def test_kubectl_wait_for_complete(
    cluster: Cluster,
    operator_process: OperatorProcess,
    control_plane: Any,
    runner_account: str,
    namespace: str,
    start_kubectl: Callable[..., tuple[subprocess.Popen[str], Path]],
    kubectl: Kubectl,
) -> None:
    """`kubectl wait --for=condition=Complete` and `--for=jsonpath={.status.phase}=Succeeded`
    wait for a running Task and return when it succeeds. Complete is True for every final
    phase (its reason says which), so a failed Task completes too."""
    cluster.create_task("waited")
    cluster.wait_epoch("waited", 1)
    lease = start_runner(cluster, control_plane, runner_account, "waited-1")
    try:
        cluster.wait_phase("waited", "Running")
        common = ("wait", "task/waited", "-n", namespace, "--timeout=60s")
        complete, complete_out = start_kubectl(*common, "--for=condition=Complete")
        phase, phase_out = start_kubectl(*common, "--for=jsonpath={.status.phase}=Succeeded")
        assert complete.poll() is None and phase.poll() is None
        lease.succeed()
    finally:
        lease.close()
    assert complete.wait(timeout=60) == 0, complete_out.read_text()
    assert phase.wait(timeout=60) == 0, phase_out.read_text()
    for out in (complete_out, phase_out):
        assert out.read_text() == "task.tasklease.io/waited condition met\n"
    task = cluster.task("waited")
    assert task["status"]["phase"] == "Succeeded"
    assert_conditions_follow_the_generation(task)
    # A spec edited after the end raises the generation; the operator observes it, so a
    # wait started afterwards still finds the Task Complete.
    cluster.patch_spec("waited", {"priority": 7})
    edited = kubectl(*common, "--for=condition=Complete")
    assert edited.stdout == "task.tasklease.io/waited condition met\n"
    task = cluster.task("waited")
    assert task["metadata"]["generation"] == 2
    assert_conditions_follow_the_generation(task)

    cluster.create_task("failing", retry={"maxAttempts": 3, "nonRetryableErrors": ["BadInput"]})
    cluster.wait_epoch("failing", 1)
    lease = start_runner(cluster, control_plane, runner_account, "failing-1")
    try:
        lease.fail("BadInput", "no such day")
    finally:
        lease.close()
    failed = kubectl("wait", "task/failing", "-n", namespace, "--for=condition=Complete")
    assert failed.stdout == "task.tasklease.io/failing condition met\n"
    task = cluster.task("failing")
    complete_condition = next(c for c in task["status"]["conditions"] if c["type"] == "Complete")
    assert (task["status"]["phase"], complete_condition["reason"]) == ("Failed", "Failed")
    assert_conditions_follow_the_generation(task)


def test_the_readmes_kubectl_wait_lines_run_as_written(
    cluster: Cluster,
    operator_process: OperatorProcess,
    control_plane: Any,
    runner_account: str,
    namespace: str,
    plugin_env: dict[str, str],
    run_kubectl: Run,
    tmp_path: Path,
) -> None:
    """The README's `kubectl wait` lines, as a user runs them in a shell whose context's
    namespace holds the Task: started while it runs, they return once it succeeds."""
    lines = readme_lines(WAIT_MARKER)
    task = re.search(r"task/([a-z0-9-]+)", lines[0])
    assert task is not None, lines
    env = dict(plugin_env, KUBECONFIG=str(tmp_path / "kubeconfig"))
    (tmp_path / "kubeconfig").write_text(Path(control_plane.kubeconfig).read_text())
    configured = run_kubectl(
        "config", "set-context", "--current", f"--namespace={namespace}", env=env
    )
    assert configured.returncode == 0, configured.stderr
    cluster.create_task(task.group(1))
    cluster.wait_epoch(task.group(1), 1)
    lease = start_runner(cluster, control_plane, runner_account, f"{task.group(1)}-1")
    try:
        cluster.wait_phase(task.group(1), "Running")
        kubectl_dir = str(Path(control_plane.binaries.kubectl).parent)
        shell = subprocess.Popen(
            ["bash", "-ec", "\n".join(lines)],
            env=dict(env, PATH=f"{kubectl_dir}{os.pathsep}{env['PATH']}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lease.succeed()
    finally:
        lease.close()
    output, _ = shell.communicate(timeout=120)
    assert shell.returncode == 0, output
    met = f"task.tasklease.io/{task.group(1)} condition met"
    # `-o jsonpath` prints the phase with no newline after it, as in a user's shell.
    assert output == f"{met}\nSucceeded{met}\n", output
