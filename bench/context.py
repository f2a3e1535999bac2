"""What the phases of `make bench` share: the settings, the findings, and one `BenchRun`
handed to each phase in turn (the clients, the load generator, the operator, the profiler).

A phase reads and writes the findings; what one phase measures for a later one to use (the
operator's RSS with no Tasks, what the steady heartbeats cost) is returned and passed on by
the orchestrator (bench/run.py), so that the order the phases depend on is visible there.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from bench.loadgen import Api, Generator
from bench.operator_process import BenchOperator
from bench.procstat import MACHINE, CpuDelta, CpuSnapshot, snapshot
from bench.profiler import Profiler

NAMESPACE: Final = "bench"
JOBS_NAMESPACE: Final = "bench-jobs"
PROBE_NAMESPACE: Final = "bench-probe"
REPO_ROOT: Final = Path(__file__).resolve().parents[1]
APISERVER: Final = ("kube-apiserver", "etcd")
CONTROL_PLANE: Final = ("kube-apiserver", "etcd", "kube-controller-manager")
MIB: Final = 1024 * 1024
# Requests per hand-out the operator makes (lease, status, pod, Event): sizes the default
# timeouts so the bulk hand-out fits in the ack window.
REQUESTS_PER_HANDOUT: Final = 4


def log(text: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def wall(monotonic: float) -> str:
    """A monotonic instant as local wall-clock time, for reading logs side by side."""
    return datetime.fromtimestamp(time.time() - (time.monotonic() - monotonic)).strftime(
        "%H:%M:%S.%f"
    )[:-3]


@dataclass
class Settings:
    tasks: int
    heartbeat_s: float
    timeout_s: float
    ack_timeout_s: float
    qps: float
    burst: int
    workers: int
    window_s: float
    push_s: float
    push_concurrency: int
    push_rounds: int
    victims_percent: float
    concurrency: int
    jobs: bool
    output_dir: Path
    profile: bool
    profile_native: bool
    seed: int
    heartbeat_cost_writes: int  # per variant and round; 0 skips the phase
    heartbeat_cost_rounds: int
    apiserver_args: list[str]
    kcm_args: list[str]
    operator_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Findings:
    """Everything measured, for the table, the JSON line and details.json."""

    figures: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> process -> cores
    watch_lag: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase -> p50, p99


@dataclass
class BenchRun:
    """One run's clients and processes, and where its phases write what they measure."""

    settings: Settings
    plane: Any  # tasklease.controlplane.ControlPlane
    api: Api  # the admin's, shared with the generator
    gen: Generator
    operator: BenchOperator
    profiler: Profiler
    control_plane_pids: dict[str, int]
    found: Findings

    def cpu(self) -> CpuSnapshot:
        """CPU seconds so far of the control plane, the generator (this process), the
        operator when it runs, and the whole machine."""
        pids = {**self.control_plane_pids, "generator": os.getpid()}
        if self.operator.alive:
            pids["operator"] = self.operator.pid
        return snapshot(pids, now=time.monotonic())

    def record_cpu(self, phase: str, delta: CpuDelta) -> None:
        cores = {name: delta.cores(name) for name in delta.cpu_s}
        machine = cores.pop(MACHINE, None)
        if machine is not None:
            # Everything else on this shared machine (other engineers' test runs included).
            cores["others"] = max(machine - sum(cores.values()), 0.0)
        self.found.cpu[phase] = cores

    def enter(self, phase: str) -> None:
        """Label what the generator counts from now on (reassignments, watch lag) `phase`."""
        self.gen.phase = phase
        self.found.notes.setdefault("phase_started", {})[phase] = wall(time.monotonic())


def prepare_cluster(plane: Any) -> None:
    """The CRDs and the bench's namespaces, each with its default ServiceAccount (pods
    cannot be created before it exists)."""
    plane.apply_crds(REPO_ROOT / "crds")
    for namespace in (NAMESPACE, JOBS_NAMESPACE, PROBE_NAMESPACE):
        plane.kubectl("create", "namespace", namespace)
    deadline = time.monotonic() + 60
    for namespace in (NAMESPACE, JOBS_NAMESPACE):
        while plane.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no default ServiceAccount in {namespace}")
            time.sleep(0.2)
