"""`make soak`: a bounded robustness run, in the manner of etcd's robustness tests.

Traffic of every shape (Tasks with a pod per attempt, Tasks for a worker pool) runs on a
local control plane whose API server keeps an audit log, against two operator replicas
with leader election, while faults are injected at random:

- a runner process stopped (SIGSTOP) and resumed later as a zombie, or killed (SIGKILL);
- an operator replica killed (`kill -9`), and failpoints armed in both replicas that kill
  them between the writes of a hand-out (`tasklease.operator.failpoints`);
- the API server restarted, cleanly or with `kill -9`, for less or more than a lease window;
- the node cut off from the API server: the local executor and its runners reach the API
  server through a relay (`soak/relay.py`) that is cut for up to three windows, as a network
  partition of one node looks (the operator sees all along, and hands the tasks on).

The runners are real: the local executor (`tasklease.executor`) runs each runner pod's
command (the wrapper, `tasklease run`) as a process with the pod's ServiceAccount token, and
the pool runners are such pods too. When the traffic has ended and every fault is undone,
the soak waits for every Task to be final, reads the audit log (the ground truth: a write
whose client died may be logged and still be committed) and checks the history's
invariants (`soak.checker`). It prints a table and, last, one JSON line; a history with
violations is saved under `tests/fixtures/soak/` as `failing-<seed>.json`, which a unit
test of the checker replays.

    python -m soak.run --tasks 60 --seconds 120 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubernetes import client, config

from soak.audit import apiserver_args, audit_log_path
from soak.checker import Report, check
from soak.history import History, read_audit_log, served_again
from soak.relay import Relay
from tasklease.api.models import GROUP, PLURAL, VERSION
from tasklease.controlplane import ControlPlane
from tasklease.controlplane.kubeconfig import write_kubeconfig
from tasklease.controlplane.pki import issue_client_cert
from tasklease.controlplane.process import OperatorProcess
from tasklease.executor import LocalExecutor
from tasklease.operator.failpoints import AFTER_LEASE_WRITE, AFTER_POD_CREATE, AFTER_STATUS_WRITE

logger = logging.getLogger("soak")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "soak"
NAMESPACE = "soak"
WORKER_GROUP = "soak"
RUNNER_SA = "tasklease-runner"
POOL_SA = "tasklease-pool-runner"
FINAL = frozenset({"Succeeded", "Failed", "Skipped", "Canceled"})
WINDOW_S = 6
HEARTBEAT_S = 1
MAX_ATTEMPTS = 8
# Whole seconds in the API server's records of a restarted operator's first sightings: it
# may end a lease up to ~1 s early, by design (api/written.py).
CLOCK_TOLERANCE_S = 1.5


@dataclass
class Config:
    tasks: int = 60
    seconds: float = 120.0  # how long the traffic and the faults go on
    pool_share: float = 0.3
    pool_runners: int = 2
    operator_kills: int = 6
    apiserver_restarts: int = 2
    node_partitions: int = 2
    runner_faults: int = 12
    failpoint_probability: float = 0.02
    detection_bound_s: float = 5.0
    settle_timeout_s: float = 240.0
    seed: int = 1
    keep: Path | None = None  # keep the run's folder (logs, audit log) here


@dataclass
class Outcome:
    report: Report
    faults: Counter[str] = field(default_factory=Counter)
    history_path: Path | None = None

    def summary(self, config: Config) -> dict[str, Any]:
        report = self.report
        return {
            "tasks": config.tasks,
            "seed": config.seed,
            "faults": dict(sorted(self.faults.items())),
            "accepted_runner_writes": report.accepted_runner_writes,
            "accepted_stale_or_foreign_writes": report.accepted_stale_or_foreign_writes,
            "double_pods": report.double_pods,
            "false_reassignments": report.false_reassignments,
            "detection_p50_s": report.detection_percentile(50),
            "detection_p99_s": report.detection_percentile(99),
            "tasks_not_final": report.tasks_not_final,
            "violations": len(report.violations),
        }


# --- the cluster's parts ----------------------------------------------------------------


def _rbac(api: client.ApiClient) -> None:
    """The runners' ServiceAccounts and Roles, as the chart grants them."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    rules = {
        RUNNER_SA: [
            {"apiGroups": [GROUP], "resources": ["tasks"], "verbs": ["get", "watch"]},
            {"apiGroups": [GROUP], "resources": ["tasks/status"], "verbs": ["get", "patch"]},
        ],
        POOL_SA: [
            {"apiGroups": [GROUP], "resources": ["tasks"],
             "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": [GROUP], "resources": ["tasks/status"], "verbs": ["get", "patch"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["create", "get", "patch", "update", "delete"],
            },
        ],
    }  # fmt: skip
    for name, granted in rules.items():
        core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": name}})
        rbac.create_namespaced_role(NAMESPACE, {"metadata": {"name": name}, "rules": granted})
        rbac.create_namespaced_role_binding(
            NAMESPACE,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
            },
        )


def _work(seconds: int) -> str:
    """A runner program: `seconds` of work, one checkpoint a second, resumed from the last."""
    return (
        f'i=${{TASKLEASE_CHECKPOINT:-0}}; while [ "$i" -lt {seconds} ]; do i=$((i + 1)); '
        f'printf "%s/{seconds}\\nstep %s\\ncheckpoint=%s\\n" "$i" "$i" "$i" '
        f'> "$TASKLEASE_PROGRESS_FILE"; sleep 1; done'
    )


def _task(name: str, rng: random.Random, *, pool: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ackTimeout": f"{WINDOW_S}s",
        "reportProgressTimeout": f"{WINDOW_S}s",
        "heartbeatInterval": f"{HEARTBEAT_S}s",
        "retry": {"maxAttempts": MAX_ATTEMPTS, "backoff": {"initial": "1s", "max": "2s"}},
    }
    if pool:
        spec["workerGroup"] = WORKER_GROUP
        spec["parameters"] = {"seconds": str(rng.randint(2, 6))}
    else:
        spec["template"] = {
            "spec": {
                "serviceAccountName": RUNNER_SA,
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {
                        "name": "runner",
                        "image": "tasklease:0.1.0",
                        "command": [
                            "tasklease",
                            "run",
                            "--",
                            "sh",
                            "-c",
                            _work(rng.randint(4, 12)),
                        ],
                    }
                ],
            }
        }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Task",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


# A pool task's work: as many seconds as its `seconds` parameter says (TASKLEASE_PARAMETERS is
# the parameters as JSON).
POOL_WORK = (
    'sleep "$(echo "$TASKLEASE_PARAMETERS" | sed -n \'s/.*"seconds": *"\\([0-9]*\\)".*/\\1/p\')"'
)


def _pool_runner(index: int) -> dict[str, Any]:
    work = POOL_WORK
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pool-runner-{index}",
            "namespace": NAMESPACE,
            "labels": {"tasklease.io/role": "pool-runner"},
        },
        "spec": {
            "serviceAccountName": POOL_SA,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "runner",
                    "image": "tasklease:0.1.0",
                    "command": [
                        "tasklease", "run", "--worker-group", WORKER_GROUP, "--", "sh", "-c", work,
                    ],
                    "env": [
                        {
                            "name": "TASKLEASE_POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        # In a cluster the runner reads it from its ServiceAccount's mount.
                        {"name": "TASKLEASE_NAMESPACE", "value": NAMESPACE},
                    ],
                }
            ],
        },
    }  # fmt: skip


class _Operators:
    """Two replicas with leader election, each with a user of its own in the audit log,
    restarted after they die (as a kubelet restarts a container)."""

    def __init__(self, plane: ControlPlane, folder: Path, failpoints: float) -> None:
        self.replicas: list[OperatorProcess] = []
        self.users: set[str] = set()
        self._user_of: list[str] = []  # by replica
        self.died: list[tuple[str, datetime]] = []
        armed = ",".join(
            f"{name}={failpoints}"
            for name in (AFTER_LEASE_WRITE, AFTER_STATUS_WRITE, AFTER_POD_CREATE)
        )
        for index in range(2):
            user = f"tasklease-operator-{index}"
            cert = issue_client_cert(
                plane.pki, f"operator-{index}", common_name=user, organization="system:masters"
            )
            kubeconfig = folder / f"operator-{index}.kubeconfig"
            write_kubeconfig(
                kubeconfig, server=plane.server, ca=plane.pki.ca.cert, cert=cert.cert,
                key=cert.key, user=user,
            )  # fmt: skip
            self.users.add(user)
            self._user_of.append(user)
            self.replicas.append(
                OperatorProcess(
                    kubeconfig=kubeconfig,
                    namespace=NAMESPACE,
                    log_path=folder / f"operator-{index}.log",
                    extra_env={
                        "TASKLEASE_LEADER_ELECTION": "true",
                        "TASKLEASE_LEADER_ELECTION_NAMESPACE": NAMESPACE,
                        "TASKLEASE_FAILPOINTS": armed if failpoints > 0 else "",
                    },
                )
            )
        self.deaths = 0

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    def kill(self, replica: OperatorProcess) -> None:
        replica.kill()
        self.died.append((self._user_of[self.replicas.index(replica)], datetime.now(UTC)))

    def restart_the_dead(self) -> None:
        for index, replica in enumerate(self.replicas):
            if not replica.alive:
                self.deaths += 1
                # A killed replica is recorded twice (killed, then found dead): the checker
                # takes the earlier.
                self.died.append((self._user_of[index], datetime.now(UTC)))
                replica.process = None
                replica.start()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


@dataclass(frozen=True)
class _Restart:
    """An API server restart: stopped from `began`, a new process from `restarted` on,
    its /readyz answering at `ready`."""

    began: datetime
    restarted: datetime
    ready: datetime


class _Faults:
    """Injects the faults at random times over the traffic window, and undoes them."""

    def __init__(
        self,
        config: Config,
        rng: random.Random,
        plane: ControlPlane,
        executor: LocalExecutor,
        operators: _Operators,
        core: client.CoreV1Api,
        relay: Relay,
    ) -> None:
        self._config, self._rng = config, rng
        self._plane, self._executor, self._operators, self._core = plane, executor, operators, core
        self._relay = relay
        self._heal_at: float | None = None
        self.counts: Counter[str] = Counter()
        self.restarts: list[_Restart] = []
        self._stopped: dict[int, float] = {}  # SIGSTOPped pid -> when to resume it

    def plan(self) -> list[tuple[float, str]]:
        config, rng = self._config, self._rng
        kinds = (
            ["operator_kill"] * config.operator_kills
            + ["apiserver_restart"] * config.apiserver_restarts
            + ["node_partition"] * config.node_partitions
            + [rng.choice(["runner_stop", "runner_kill"]) for _ in range(config.runner_faults)]
        )
        return sorted((rng.uniform(5.0, config.seconds), kind) for kind in kinds)

    def inject(self, kind: str) -> None:
        match kind:
            case "operator_kill":
                victim = self._rng.choice(self._operators.replicas)
                if victim.alive:
                    self._operators.kill(victim)
                    self.counts[kind] += 1
            case "apiserver_restart":
                down_s = self._rng.choice([1.0, 3.0, 2.0 * WINDOW_S, 3.0 * WINDOW_S])
                clean = self._rng.random() < 0.5
                began = datetime.now(UTC)
                self._plane.restart_apiserver(down_for_s=down_s, clean=clean)
                self.restarts.append(
                    _Restart(began, began + timedelta(seconds=down_s), datetime.now(UTC))
                )
                self.counts[f"apiserver_restart_{'clean' if clean else 'kill'}"] += 1
            case "node_partition":
                if self._heal_at is None:
                    self._relay.cut()
                    self._heal_at = time.monotonic() + self._rng.uniform(WINDOW_S, 3 * WINDOW_S)
                    self.counts[kind] += 1
            case "runner_stop" | "runner_kill":
                pid = self._a_runner()
                if pid is None:
                    return
                if kind == "runner_kill":
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGSTOP)
                    self._stopped[pid] = time.monotonic() + self._rng.uniform(2.0, 4.0 * WINDOW_S)
                self.counts[kind] += 1

    def _a_runner(self) -> int | None:
        pods = self._core.list_namespaced_pod(NAMESPACE, label_selector="tasklease.io/role")
        pids = [
            pid
            for pod in pods.items
            if (pid := self._executor.pid_of(NAMESPACE, pod.metadata.name)) is not None
            and pid not in self._stopped
        ]
        return self._rng.choice(pids) if pids else None

    def resume_due(self, *, all_of_them: bool = False) -> None:
        now = time.monotonic()
        if self._heal_at is not None and (all_of_them or self._heal_at <= now):
            self._relay.heal()
            self._heal_at = None
        for pid, when in list(self._stopped.items()):
            if all_of_them or when <= now:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGCONT)
                del self._stopped[pid]


# --- the run ------------------------------------------------------------------------------


@contextlib.contextmanager
def _folder(config: Config) -> Iterator[Path]:
    if config.keep is not None:
        config.keep.mkdir(parents=True, exist_ok=True)
        yield config.keep
        return
    with tempfile.TemporaryDirectory(prefix="tasklease-soak-") as folder:
        yield Path(folder)


def run(config: Config) -> Outcome:
    rng = random.Random(config.seed)
    with _folder(config) as folder:
        audit_dir = folder / "audit"
        audit_dir.mkdir(exist_ok=True)
        with ControlPlane.start(
            folder / "plane", extra_args={"kube-apiserver": apiserver_args(audit_dir)}
        ) as plane:
            outcome = _run_on(plane, folder, config, rng)
        writes = read_audit_log(audit_log_path(audit_dir))
        history = History(
            writes=writes,
            final_tasks=outcome.final_tasks,
            # Down from the stop to the first write the new process served.
            blind=[
                (r.began, served_again(writes, restarted_at=r.restarted, ready_at=r.ready))
                for r in outcome.restarts
            ],
            operator_users=outcome.operator_users,
            operator_deaths=outcome.operator_deaths,
            detection_bound_s=config.detection_bound_s,
        )
        report = check(history, clock_tolerance_s=CLOCK_TOLERANCE_S)
        result = Outcome(report=report, faults=outcome.faults)
        if report.violations:
            FIXTURES.mkdir(parents=True, exist_ok=True)
            result.history_path = FIXTURES / f"failing-{config.seed}.json"
            _failing_part(history, report).save(result.history_path, expected=report.violations)
        return result


def _failing_part(history: History, report: Report) -> History:
    """The history of the Tasks with violations, if the checker finds them all there too
    (a violation may depend on other Tasks' writes: then the whole history)."""
    wanted = {(v.invariant, v.task) for v in report.violations}
    part = history.restricted_to({task for _, task in wanted})
    again = check(part, clock_tolerance_s=CLOCK_TOLERANCE_S)
    return part if wanted <= {(v.invariant, v.task) for v in again.violations} else history


@dataclass
class _Observed:
    final_tasks: list[dict[str, Any]]
    restarts: list[_Restart]
    operator_users: set[str]
    operator_deaths: list[tuple[str, datetime]]
    faults: Counter[str]


def _run_on(plane: ControlPlane, folder: Path, config: Config, rng: random.Random) -> _Observed:
    plane.apply_crds(REPO_ROOT / "crds")
    plane.kubectl("create", "namespace", NAMESPACE)
    api = config_client(plane)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    _wait(lambda: _exists(core, "default"), "the namespace's default ServiceAccount", 60)
    _rbac(api)
    operators = _Operators(plane, folder, config.failpoint_probability)
    host, port = plane.server.removeprefix("https://").rsplit(":", 1)
    relay = Relay((host, int(port)))
    # The node (the executor, and the runners it gives the same server) behind the relay.
    node_kubeconfig = folder / "node.kubeconfig"
    node_kubeconfig.write_text(
        plane.kubeconfig.read_text().replace(plane.server, f"https://127.0.0.1:{relay.port}")
    )
    with relay, LocalExecutor(node_kubeconfig, folder / "executor", all_pods=True) as executor:
        operators.start()
        faults = _Faults(config, rng, plane, executor, operators, core, relay)
        pool_runners = [_pool_runner(i) for i in range(config.pool_runners)]
        names = [f"t-{i:04d}" for i in range(config.tasks)]
        arrivals = sorted(rng.uniform(0.0, config.seconds * 0.8) for _ in names)
        planned = faults.plan()
        started = time.monotonic()
        try:
            while arrivals or planned:
                elapsed = time.monotonic() - started
                while arrivals and arrivals[0] <= elapsed:
                    arrivals.pop(0)
                    name = names[config.tasks - len(arrivals) - 1]
                    pool = rng.random() < config.pool_share
                    _create(custom, _task(name, rng, pool=pool))
                while planned and planned[0][0] <= elapsed:
                    _, kind = planned.pop(0)
                    _guard(lambda kind=kind: faults.inject(kind), f"fault {kind}")
                _keep_up(core, pool_runners, operators, faults)
                time.sleep(0.2)
            faults.resume_due(all_of_them=True)
            deadline = time.monotonic() + config.settle_timeout_s
            while time.monotonic() < deadline:
                _keep_up(core, pool_runners, operators, faults)
                if all(_phase(task) in FINAL for task in _tasks(custom)):
                    break
                time.sleep(1.0)
            final = _tasks(custom)
        finally:
            faults.resume_due(all_of_them=True)
            operators.stop()
    counts = Counter(faults.counts)
    counts["operator_deaths_seen"] = operators.deaths
    return _Observed(final, faults.restarts, operators.users, operators.died, counts)


def _keep_up(
    core: client.CoreV1Api,
    pool_runners: list[dict[str, Any]],
    operators: _Operators,
    faults: _Faults,
) -> None:
    """What a kubelet and the Deployment controller would do: restart dead operators and
    pool runners; and resume stopped runners whose time has come."""
    faults.resume_due()
    _guard(operators.restart_the_dead, "restarting operators")
    for manifest in pool_runners:
        _guard(lambda manifest=manifest: _ensure_pod(core, manifest), "pool runner")


def _ensure_pod(core: client.CoreV1Api, manifest: dict[str, Any]) -> None:
    name = manifest["metadata"]["name"]
    try:
        pod = core.read_namespaced_pod(name, NAMESPACE)
    except client.ApiException as error:
        if error.status != 404:
            raise
        core.create_namespaced_pod(NAMESPACE, manifest)
        return
    if pod.status.phase in ("Succeeded", "Failed") and pod.metadata.deletion_timestamp is None:
        core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)


def _guard(action: Any, what: str) -> None:
    """Faults make the API server go away now and then: what the harness does then fails
    and is tried again at its next turn."""
    try:
        action()
    except Exception as error:
        logger.info("%s: %s (tried again later)", what, error)


def _create(custom: client.CustomObjectsApi, body: dict[str, Any]) -> None:
    for _ in range(60):
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
            return
        except client.ApiException as error:
            if error.status == 409:
                return  # created by an earlier try whose answer was lost
        except Exception:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"could not create task {body['metadata']['name']}")


def _tasks(custom: client.CustomObjectsApi) -> list[dict[str, Any]]:
    for _ in range(60):
        with contextlib.suppress(Exception):
            listed = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
            items: list[dict[str, Any]] = listed["items"]
            return items
        time.sleep(1.0)
    raise RuntimeError("cannot list the Tasks")


def _phase(task: dict[str, Any]) -> str:
    return str((task.get("status") or {}).get("phase") or "")


def _exists(core: client.CoreV1Api, service_account: str) -> bool:
    try:
        core.read_namespaced_service_account(service_account, NAMESPACE)
    except client.ApiException:
        return False
    return True


def _wait(probe: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def config_client(plane: ControlPlane) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(plane.kubeconfig))


# --- the report ---------------------------------------------------------------------------


def table(summary: dict[str, Any]) -> str:
    rows = [
        ("tasks", summary["tasks"]),
        *((f"fault: {kind}", count) for kind, count in summary["faults"].items()),
        ("accepted runner writes", summary["accepted_runner_writes"]),
        ("accepted stale or foreign writes", summary["accepted_stale_or_foreign_writes"]),
        ("pods beyond one per epoch", summary["double_pods"]),
        ("false reassignments", summary["false_reassignments"]),
        ("detection delay past the window, p50 (s)", summary["detection_p50_s"]),
        ("detection delay past the window, p99 (s)", summary["detection_p99_s"]),
        ("Tasks not final", summary["tasks_not_final"]),
        ("violations", summary["violations"]),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m soak.run", description=__doc__.split("\n\n")[0]
    )
    defaults = Config()
    for name, value in asdict(defaults).items():
        if name == "keep":
            parser.add_argument("--keep", type=Path, help="keep logs and the audit log here")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    # The executor's clients retry through every API server restart, loudly.
    for noisy in ("urllib3", "tasklease.executor"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = Config(**vars(args))
    outcome = run(config)
    summary = outcome.summary(config)
    print(table(summary))
    for violation in outcome.report.violations:
        print(f"VIOLATION {violation.invariant} {violation.task}: {violation.detail}")
    if outcome.history_path is not None:
        print(f"the failing history is saved in {outcome.history_path}")
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 1 if outcome.report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
