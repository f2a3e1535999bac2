"""`make demo`: tasklease doing its main job on a local control plane.

Starts etcd + kube-apiserver + kube-controller-manager, installs the CRD, runs the operator
(a real subprocess) and the local pod executor, applies the Tasks in `examples/demo/`, and
shows a live table until every Task is final:

- `load-orders` runs to Succeeded, reporting progress through the wrapper's progress file;
- `rebuild-index`'s first runner is frozen with SIGSTOP half way: its pod stays "Running"
  (a Kubernetes Job would wait forever), the operator sees the reports stop and hands the
  task to a new pod, which resumes from the checkpoint and finishes;
- `import-customers` fails with an error its retry policy calls non-retryable.

Exit status 0 when all three ended as described. `--keep` leaves the cluster up afterwards
for exploring with kubectl (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasklease.api.models import GROUP, PLURAL, VERSION
from tasklease.controlplane.process import die_with_parent

NAMESPACE = "demo"
HUNG_TASK = "rebuild-index"
EXPECTED = {"load-orders": "Succeeded", HUNG_TASK: "Succeeded", "import-customers": "Failed"}
FREEZE_AT_PERCENT = 30.0
DEADLINE_S = 240.0


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


@dataclass
class _Story:
    """What happened, for the summary."""

    frozen_pod: str | None = None
    frozen_pid: int | None = None
    frozen_at: float | None = None
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(f"{datetime.now(UTC):%H:%M:%S} {text}")


def _age(stamp: str | None) -> str:
    if not stamp:
        return "-"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
    return f"{max(seconds, 0):.0f}s"


def _table(tasks: list[dict[str, Any]]) -> str:
    rows = [("TASK", "PHASE", "PROGRESS", "HOLDER", "ATTEMPT", "LAST REPORT", "MESSAGE")]
    for task in sorted(tasks, key=lambda t: t["metadata"]["name"]):
        status = task.get("status") or {}
        progress = status.get("progress") or {}
        percent = progress.get("percent")
        rows.append(
            (
                task["metadata"]["name"],
                status.get("phase", "-"),
                f"{percent:.0f}%" if isinstance(percent, int | float) else "-",
                status.get("holder") or "-",
                str(status.get("attempt", 0)),
                _age(progress.get("reportTime")),
                (progress.get("message") or "")[:40],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def _summary(tasks: dict[str, dict[str, Any]], story: _Story, elapsed_s: float) -> str:
    def attempts(name: str) -> list[dict[str, Any]]:
        return list((tasks[name].get("status") or {}).get("attempts") or [])

    hung = attempts(HUNG_TASK)
    first = hung[0] if hung else {}
    failed = tasks["import-customers"].get("status") or {}
    failure = next(
        (c.get("message", "") for c in failed.get("conditions", []) if c["type"] == "Complete"),
        "",
    )
    return (
        f"In {elapsed_s:.0f} s: load-orders ran to "
        f"{(tasks['load-orders'].get('status') or {}).get('phase')} with its progress reported "
        f"through the progress file. rebuild-index's first runner {story.frozen_pod} was frozen "
        f"with SIGSTOP while its pod stayed Running; the operator saw its reports stop and ended "
        f"attempt 1 as {first.get('outcome')} ({first.get('message')}), handed the task to "
        f"{hung[-1].get('holder') if hung else '?'} (epoch "
        f"{hung[-1].get('epoch') if hung else '?'}), which resumed from the checkpoint and "
        f"finished: {(tasks[HUNG_TASK].get('status') or {}).get('phase')} after {len(hung)} "
        f"attempts. import-customers ended {failed.get('phase')} after "
        f"{failed.get('attempt')} attempt: {failure}"
    )


def run(*, keep: bool, state_dir: Path, out: Callable[[str], None]) -> int:
    from kubernetes import client, config, utils

    from tasklease.controlplane import ControlPlane
    from tasklease.executor import LocalExecutor

    examples = _repo_root() / "examples"
    out("starting the local control plane (etcd, kube-apiserver, kube-controller-manager)")
    with ControlPlane.start(state_dir / "controlplane") as plane:
        plane.apply_crds(_repo_root() / "crds")
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        _wait(lambda: _has_default_sa(core), "the default ServiceAccount")
        utils.create_from_yaml(api, str(examples / "runner-rbac.yaml"), namespace=NAMESPACE)

        operator_log = (state_dir / "operator.log").open("wb")
        env = dict(
            os.environ,
            KUBECONFIG=str(plane.kubeconfig),
            TASKLEASE_NAMESPACES=NAMESPACE,
            TASKLEASE_METRICS_PORT="0",
            TASKLEASE_HEALTH_PORT="0",
        )
        operator = subprocess.Popen(
            [sys.executable, "-m", "tasklease", "operator"],
            env=env,
            stdout=operator_log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(os.getpid()),
        )
        out(f"operator running (pid {operator.pid}, log {state_dir / 'operator.log'})")
        try:
            with LocalExecutor(plane.kubeconfig, state_dir / "executor") as executor:
                out("local pod executor running (node tasklease-local)")
                for manifest in sorted((examples / "demo").glob("*.yaml")):
                    plane.kubectl("apply", "-n", NAMESPACE, "-f", str(manifest))
                    out(f"applied {manifest.relative_to(_repo_root())}")
                code = _watch(custom, executor, out)
            if keep and code == 0:
                out(
                    f"\nthe cluster stays up; in another shell:\n"
                    f"  export KUBECONFIG={plane.kubeconfig}\n"
                    f"  kubectl get tasks -n {NAMESPACE}\n"
                    f"  kubectl describe task -n {NAMESPACE} {HUNG_TASK}\n"
                    "press Ctrl-C to stop it."
                )
                _wait_for_interrupt()
            return code
        finally:
            operator.terminate()
            try:
                operator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                operator.kill()
            operator_log.close()


def _watch(custom: Any, executor: Any, out: Callable[[str], None]) -> int:
    story = _Story()
    started = time.monotonic()
    tty = sys.stdout.isatty()
    last_table = ""
    tasks: dict[str, dict[str, Any]] = {}
    while time.monotonic() - started < DEADLINE_S:
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
        tasks = {t["metadata"]["name"]: t for t in listed["items"]}
        _freeze_hung_runner(tasks.get(HUNG_TASK), executor, story, out)
        table = _table(list(tasks.values()))
        if tty:
            sys.stdout.write("\x1b[2J\x1b[H" + table + "\n\n" + "\n".join(story.notes[-6:]) + "\n")
            sys.stdout.flush()
        elif table != last_table:
            out(table + "\n")
        last_table = table
        phases = {name: (t.get("status") or {}).get("phase") for name, t in tasks.items()}
        if len(tasks) == len(EXPECTED) and all(
            phase in ("Succeeded", "Failed", "Skipped", "Canceled") for phase in phases.values()
        ):
            break
        time.sleep(0.5)
    else:
        table = _table(list(tasks.values()))
        out(f"demo: not all tasks were final after {DEADLINE_S:.0f} s:\n{table}")
        return 1
    if story.frozen_pid is not None:
        # The pod was deleted and its process killed by the executor; nothing to resume.
        story.note(f"frozen runner pid {story.frozen_pid} was stopped by the executor")
    elapsed = time.monotonic() - started
    out("\n" + _table(list(tasks.values())) + "\n")
    phases = {name: (t.get("status") or {}).get("phase") for name, t in tasks.items()}
    wrong = {name: phase for name, phase in phases.items() if EXPECTED.get(name) != phase}
    hung_attempts = (tasks[HUNG_TASK].get("status") or {}).get("attempts") or []
    if not hung_attempts or hung_attempts[0].get("outcome") != "ProgressTimeout":
        wrong[HUNG_TASK] = "first attempt did not end with ProgressTimeout"
    out(_summary(tasks, story, elapsed))
    if wrong:
        out(f"demo: unexpected outcome: {wrong}")
        return 1
    return 0


def _freeze_hung_runner(
    task: dict[str, Any] | None, executor: Any, story: _Story, out: Callable[[str], None]
) -> None:
    if task is None or story.frozen_pod is not None:
        return
    status = task.get("status") or {}
    progress = status.get("progress") or {}
    if status.get("phase") != "Running" or (progress.get("percent") or 0) < FREEZE_AT_PERCENT:
        return
    pod = status.get("holder")
    pid = executor.pid_of(NAMESPACE, pod) if pod else None
    if pid is None:
        return
    os.kill(pid, signal.SIGSTOP)
    story.frozen_pod, story.frozen_pid, story.frozen_at = pod, pid, time.monotonic()
    story.note(
        f"froze {pod} (pid {pid}) with SIGSTOP at {progress.get('percent'):.0f}%: "
        "its pod is still Running, its heartbeats stop"
    )
    out(story.notes[-1])


def _has_default_sa(core: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_service_account("default", NAMESPACE)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def _wait(probe: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _wait_for_interrupt() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()


def _interrupt(signum: int, frame: Any) -> None:
    # SIGTERM stops the demo the same orderly way as Ctrl-C: every `finally` runs.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasklease.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--keep", action="store_true", help="keep the cluster up at the end")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".tasklease/demo"),
        help="where the kubeconfig, logs and pod logs go (default: .tasklease/demo)",
    )
    args = parser.parse_args(argv)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    state_dir = args.state_dir.resolve()

    def out(text: str) -> None:
        print(text, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(keep=args.keep, state_dir=state_dir, out=out)
    except KeyboardInterrupt:
        out("demo: interrupted")
        return 130
