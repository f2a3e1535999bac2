"""`make bench`: the operator's cost and speed against the API server's, in one run.

    python -m bench.run [--tasks 1000] [--heartbeat-interval 5] [--timeout auto] ...

Starts a local control plane (etcd, kube-apiserver, kube-controller-manager with the Job
controller added), then, in order:

1. Job controller: N batch/v1 Jobs (parallelism 1) created in bulk; pods per second from the
   first create to the N-th pod seen by a watch.
2. Operator (a subprocess, `python -m tasklease operator`), warmed up with one Task that is
   then deleted: its RSS "with none".
3. Hand-out: N Tasks created in bulk; runner pods per second, same clock as (1). The load
   generator holds the runners' acknowledgements until the N-th pod is out (or 80% of the
   ack timeout passed for a pod), then acknowledges them all and heartbeats every interval.
4. Steady window: CPU-seconds of the operator, kube-apiserver and etcd over the same
   heartbeats; operator RSS at N.
5. Headroom: the generator pushes fenced reports as fast as it can with a fixed number in
   flight, with the operator killed ("alone", restarted afterwards) and running ("with"),
   alternately. A watch-lag probe measures throughout how late Task changes reach watchers.
6. Detection: a random 5% of runners stop; from each one's deadline (its last report the API
   server acknowledged + reportProgressTimeout) to the watch seeing the pod of the next epoch.
7. Restart: SIGKILL and restart of the operator with heartbeats flowing; seconds until its
   metrics count all N Tasks again; then one full timeout of watching for reassignments.

False reassignments (a pod of a new epoch for a Task whose runner never stopped) are counted
throughout. The table goes to stdout, progress to stderr, and the LAST stdout line is the
JSON object described in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench.loadgen import (
    Api,
    Generator,
    WatchLagProbe,
    create_all,
    job_manifest,
    task_manifest,
    wait_for,
)
from bench.procstat import (
    MACHINE,
    CpuDelta,
    find_components,
    rss_by_kind_mib,
    rss_bytes,
    snapshot,
)
from bench.report import (
    OPERATOR_REQUESTS,
    RESULT_KEYS,
    figures_table,
    format_table,
    format_value,
    metric_sum,
    missed_goals,
    parse_prometheus,
    per_thousand,
    percentile,
    ratio,
    request_latency_by_kind,
    result_json,
)

NAMESPACE: Final = "bench"
JOBS_NAMESPACE: Final = "bench-jobs"
PROBE_NAMESPACE: Final = "bench-probe"
REPO_ROOT: Final = Path(__file__).resolve().parents[1]
APISERVER: Final = ("kube-apiserver", "etcd")
MIB: Final = 1024 * 1024
# Requests per hand-out the operator makes (lease, status, pod, Event): sizes the default
# timeouts so the bulk hand-out fits in the ack window.
REQUESTS_PER_HANDOUT: Final = 4
# The operator's tasklease_report_age_seconds buckets (tasklease.operator.metrics).
REPORT_AGE_BOUNDS: Final = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0)
# CPU (cores) other processes on the machine may use during a headroom round that counts.
QUIET_OTHERS_CORES: Final = 0.15


def _wall(monotonic: float) -> str:
    """A monotonic instant as local wall-clock time, for reading logs side by side."""
    return datetime.fromtimestamp(time.time() - (time.monotonic() - monotonic)).strftime(
        "%H:%M:%S.%f"
    )[:-3]


def requests_text(requests: Mapping[str, Mapping[str, float]]) -> str:
    """'PATCH tasks 4 x 100.0ms, POST pods 4 x 50.0ms' (from request_latency_by_kind)."""
    return ", ".join(f"{k} {v['count']:.0f} x {v['mean_ms']}ms" for k, v in requests.items())


def log(text: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def histogram_quantile_bound(samples: Mapping[str, float], name: str, q: float) -> float | None:
    """The upper bound of the Prometheus histogram bucket holding quantile q."""
    buckets = []
    for key, value in samples.items():
        if key.startswith(f'{name}_bucket{{le="'):
            label = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if label == "+Inf" else float(label), value))
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= q * total:
            return bound
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- the operator process -------------------------------------------------------------------


class OperatorProcess:
    """`python -m tasklease operator` as a child that dies with us (PR_SET_PDEATHSIG)."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # monotonic

    def start(self) -> None:
        from tasklease.controlplane.process import die_with_parent

        self.started_at = time.monotonic()
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tasklease", "operator"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"the operator exited (code {code}); log tail:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: no cleanup runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Profiler:
    """py-spy on the operator, one recording at a time (`--profile DIR`)."""

    def __init__(self, folder: Path | None, *, native: bool = False) -> None:
        self.folder = folder
        self.native = native
        self.outputs: dict[str, Path] = {}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def start(self, name: str, pid: int, *, seconds: float | None = None) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        output = self.folder / f"{name}.txt"
        argv = [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--nolineno",
            # By default only the thread holding the GIL: CPU spent in Python. Without it,
            # threads parked in a queue or select() (thread pools, the metrics server) show
            # up as busy on this kernel. Native: every thread, named, with C frames (TLS,
            # the HTTP parser, pydantic_core), which run partly without the GIL; read the
            # main thread's stacks and leave out those ending in select().
            *(["--native", "--threads"] if self.native else ["--gil"]),
            "--format",
            "raw",
            "--output",
            str(output),
        ]
        if seconds is not None:
            argv += ["--duration", str(max(1, math.ceil(seconds)))]
        with (self.folder / f"{name}.py-spy.log").open("wb") as out:
            self._process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.outputs[name] = output

    def finish(self) -> None:
        """Stop the recording (SIGINT makes py-spy write its output) and wait for it."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the run --------------------------------------------------------------------------------


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
    apiserver_args: list[str]
    kcm_args: list[str]
    operator_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Findings:
    """Everything measured, for the table, the JSON line and --details."""

    figures: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> process -> cores
    watch_lag: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase -> p50, p99


class Bench:
    def __init__(self, settings: Settings, plane: Any, operator: OperatorProcess) -> None:
        self.s = settings
        self.plane = plane
        self.operator = operator
        self.metrics_port = int(operator.env["TASKLEASE_METRICS_PORT"])
        self.found = Findings()
        self.profiler = Profiler(
            settings.output_dir / "profiles" if settings.profile else None,
            native=settings.profile_native,
        )
        self.pids: dict[str, int] = {}
        self.steady_operator_s_per_report = 0.002
        self.steady_apiserver_cores = 1.0
        self.operator_listed_at = 0.0  # monotonic: every informer of the last restart listed
        self.push_ended_at = 0.0  # monotonic: the last headroom push's last report

    # --- helpers ------------------------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        pids = {**self.pids, "generator": os.getpid()}
        if self.operator.alive:
            pids["operator"] = self.operator.pid
        return pids

    def _cpu(self) -> Any:
        return snapshot(self._pids(), now=time.monotonic())

    def _record_cpu(self, phase: str, delta: CpuDelta) -> None:
        cores = {name: delta.cores(name) for name in delta.cpu_s}
        machine = cores.pop(MACHINE, None)
        if machine is not None:
            # Everything else on this shared machine (other engineers' test runs included).
            cores["others"] = max(machine - sum(cores.values()), 0.0)
        self.found.cpu[phase] = cores

    async def metrics(self) -> dict[str, float] | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response,
            ):
                if response.status != 200:
                    return None
                return parse_prometheus(await response.text())
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def tracked(self) -> float | None:
        samples = await self.metrics()
        if samples is None or not any(k.startswith("tasklease_tasks{") for k in samples):
            return None
        return metric_sum(samples, "tasklease_tasks")

    async def apiserver_samples(self) -> dict[str, float]:
        """The API server's own /metrics (as the admin); empty when it does not answer in
        time (a saturated API server at 50,000 Tasks did not, and the run died with it)."""
        try:
            status, data = await self.gen.api.call("GET", "/metrics")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log(f"the API server's /metrics did not answer ({exc!r}); its figures are left out")
            return {}
        return parse_prometheus(data.decode()) if status == 200 else {}

    async def all_synced(self) -> bool:
        """Every informer of the operator (Tasks, runner pods, pool runners' Leases) has
        listed: until then a restarted operator is still catching up, whatever it tracks."""
        samples = await self.metrics() or {}
        synced = [v for k, v in samples.items() if k.startswith("tasklease_informer_synced{")]
        return bool(synced) and all(v == 1 for v in synced)

    async def wait_listed(self, *, interval: float) -> float:
        """Until the (re)started operator has listed everything it watches; then (monotonic)."""
        self.operator_listed_at = await wait_for(
            "the restarted operator to list everything it watches",
            self.all_synced,
            within=max(120.0, self.s.tasks / 100),
            interval=interval,
            check=self.operator.check,
        )
        return self.operator_listed_at

    async def running(self) -> float:
        samples = await self.metrics() or {}
        return samples.get('tasklease_tasks{phase="Running"}', 0.0)

    async def _settle(
        self,
        what: str,
        quiet: Callable[[CpuDelta, float], bool],
        *,
        within: float,
        operator_running: bool,
    ) -> float:
        """Wait until `quiet(cpu over 2 s, reports acknowledged per second then)` holds;
        the seconds it took (at most `within`, and then a line says so)."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if operator_running:
                self.operator.check()
            before = self._cpu()
            acked = self.gen.counters.reports_acked
            await asyncio.sleep(2.0)
            delta = self._cpu().minus(before)
            if quiet(delta, (self.gen.counters.reports_acked - acked) / delta.seconds):
                return time.monotonic() - started
        log(f"{what} still busy after {within:.0f}s; going on")
        return time.monotonic() - started

    async def settle_operator(self, *, within: float = 60.0) -> float:
        """Wait until the operator has caught up with what it missed (a restart's listing, a
        push's burst): its CPU over a 2 s window is back to what the heartbeats flowing then
        cost it in the steady window (x1.5, +0.05 cores). Returns the seconds it took."""
        per_report_s = self.steady_operator_s_per_report
        return await self._settle(
            "operator",
            lambda delta, rate: delta.cores("operator") <= 1.5 * per_report_s * rate + 0.05,
            within=within,
            operator_running=True,
        )

    async def settle_apiserver(self, *, operator_running: bool, within: float = 60.0) -> float:
        """Wait until kube-apiserver + etcd are back to what the steady heartbeats cost them
        (over 2 s: x1.2, +0.1 cores): a push leaves them work to finish (its watch events,
        etcd's compaction of its writes), and a push that starts before that is done is
        slower for it. Returns the seconds it took."""
        steady = 1.2 * self.steady_apiserver_cores + 0.1
        return await self._settle(
            "API server",
            lambda delta, _rate: delta.total(APISERVER) / delta.seconds <= steady,
            within=within,
            operator_running=operator_running,
        )

    # --- phases ---------------------------------------------------------------------------

    def phase(self, gen: Generator, name: str) -> None:
        gen.phase = name
        self.found.notes.setdefault("phase_started", {})[name] = _wall(time.monotonic())

    async def run(self) -> None:
        s = self.s
        self.pids = find_components(
            self.plane.state_dir, ("kube-apiserver", "etcd", "kube-controller-manager")
        )
        missing = {"kube-apiserver", "etcd", "kube-controller-manager"} - set(self.pids)
        if missing:
            raise RuntimeError(f"control-plane processes not found in /proc: {sorted(missing)}")
        log(f"control plane pids: {self.pids}")
        async with Api(
            self.plane.server,
            ca=self.plane.admin_ca,
            cert=self.plane.admin_cert,
            key=self.plane.admin_key,
            connections=max(s.concurrency, s.push_concurrency),
        ) as api:
            gen = Generator(
                api,
                NAMESPACE,
                heartbeat_s=s.heartbeat_s,
                timeout_s=s.timeout_s,
                ack_timeout_s=s.ack_timeout_s,
                concurrency=s.concurrency,
                seed=s.seed,
            )
            self.gen = gen
            watches: list[asyncio.Task[None]] = []
            listed = asyncio.Event()
            watches.append(
                asyncio.create_task(
                    api.watch(
                        f"/api/v1/namespaces/{NAMESPACE}/pods",
                        label_selector="tasklease.io/task",
                        on_event=gen.on_pod,
                        listed=listed,
                    )
                )
            )
            await listed.wait()
            gen.start()
            # The probe has connections of its own: queued behind the generator's requests
            # it would measure the generator's backlog, not the API server's watch.
            probe_api = Api(
                self.plane.server,
                ca=self.plane.admin_ca,
                cert=self.plane.admin_cert,
                key=self.plane.admin_key,
                connections=2,
            )
            await probe_api.__aenter__()
            probe = WatchLagProbe(probe_api, PROBE_NAMESPACE)
            await probe.create()
            watches.append(asyncio.create_task(probe.run(lambda: gen.phase)))
            try:
                if s.jobs:
                    await self.job_controller(api, watches)
                await self.start_operator(api, gen)
                await self.handout(api, gen)
                await self.steady(gen)
                await self.headroom(gen)
                await self.detection(gen)
                await self.restart(gen)
            finally:
                with contextlib.suppress(Exception):
                    await self.diagnose(api, gen)
                await probe_api.__aexit__(None, None, None)
                for phase, lags in probe.by_phase().items():
                    self.found.watch_lag[phase] = {
                        "p50": percentile(lags, 50),
                        "p99": percentile(lags, 99),
                        "max": max(lags),
                        "samples": len(lags),
                    }
                self.profiler.finish()
                await gen.stop()
                for watch in watches:
                    watch.cancel()
                await asyncio.gather(*watches, return_exceptions=True)

    async def job_controller(self, api: Api, watches: list[asyncio.Task[None]]) -> None:
        s = self.s
        log(f"Job controller: creating {s.tasks} Jobs in {JOBS_NAMESPACE}")
        seen: dict[str, float] = {}
        done = asyncio.Event()
        last: list[float] = []

        def on_pod(kind: str, pod: dict[str, Any], at: float) -> None:
            name = pod["metadata"]["name"]
            if kind in ("ADDED", "LISTED") and name not in seen:
                seen[name] = at
                if len(seen) == s.tasks:
                    last.append(at)
                    done.set()

        listed = asyncio.Event()
        watches.append(
            asyncio.create_task(
                api.watch(
                    f"/api/v1/namespaces/{JOBS_NAMESPACE}/pods",
                    label_selector="batch.kubernetes.io/job-name",
                    on_event=on_pod,
                    listed=listed,
                )
            )
        )
        await listed.wait()
        before = self._cpu()
        bulk = await create_all(
            api,
            f"/apis/batch/v1/namespaces/{JOBS_NAMESPACE}/jobs",
            (json.dumps(job_manifest(f"j-{i:06d}")).encode() for i in range(s.tasks)),
            concurrency=s.concurrency,
        )
        if bulk.failed:
            raise RuntimeError(f"{bulk.failed} Jobs could not be created")
        try:
            await asyncio.wait_for(done.wait(), timeout=max(120.0, s.tasks / 5))
        except TimeoutError:
            raise RuntimeError(
                f"only {len(seen)} of {s.tasks} Job pods appeared; is job-controller running? "
                f"(kube-controller-manager log: {self.plane.log_path('kube-controller-manager')})"
            ) from None
        self._record_cpu("job controller", self._cpu().minus(before))
        elapsed = last[0] - bulk.started
        self.found.figures["job_controller_pods_per_s"] = s.tasks / elapsed
        self.found.notes["jobs_create_s"] = bulk.finished - bulk.started
        self.found.notes["jobs_all_pods_s"] = elapsed
        log(f"Job controller: {s.tasks} pods in {elapsed:.1f}s ({s.tasks / elapsed:.1f}/s)")

    async def start_operator(self, api: Api, gen: Generator) -> None:
        log("starting the operator")
        self.operator.start()
        await wait_for(
            "the operator's metrics endpoint",
            lambda: self._probe_tracked(lambda n: n == 0),
            within=60,
            check=self.operator.check,
        )
        # Warm-up: one Task through hand-out, acknowledgement and heartbeats, then deleted,
        # so that lazily loaded code and first-use caches are in the baseline RSS.
        self.phase(gen, "warm-up")
        gen.add_runner("warmup", counted=False)
        manifest = task_manifest(
            "warmup",
            heartbeat_s=1,
            timeout_s=self.s.timeout_s,
            ack_timeout_s=self.s.ack_timeout_s,
        )
        status, data = await api.call(
            "POST",
            f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks",
            json.dumps(manifest).encode(),
        )
        if status != 201:
            raise RuntimeError(f"warm-up Task: HTTP {status}: {data[:300]!r}")
        await wait_for(
            "the warm-up Task to run",
            self._warm_up_running,
            within=60,
            check=self.operator.check,
        )
        await asyncio.sleep(3)
        gen.forget("warmup")
        status, data = await api.call(
            "DELETE", f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks/warmup"
        )
        if status not in (200, 202):
            raise RuntimeError(f"deleting the warm-up Task: HTTP {status}: {data[:300]!r}")
        await wait_for(
            "the operator to forget the warm-up Task",
            lambda: self._probe_tracked(lambda n: n == 0),
            within=60,
            check=self.operator.check,
        )
        await asyncio.sleep(3)
        samples = []
        for _ in range(5):
            samples.append(rss_bytes(self.operator.pid))
            await asyncio.sleep(0.2)
        self.found.notes["rss_none_mib"] = min(samples) / MIB
        self.found.notes["rss_none_by_kind_mib"] = rss_by_kind_mib(self.operator.pid)
        log(f"operator up, RSS with no Tasks: {min(samples) / MIB:.1f} MiB")

    async def _probe_tracked(self, test: Any) -> bool:
        tracked = await self.tracked()
        return tracked is not None and bool(test(tracked))

    async def _warm_up_running(self) -> bool:
        return await self.running() >= 1

    async def handout(self, api: Api, gen: Generator) -> None:
        s = self.s
        self.phase(gen, "hand-out")
        for i in range(s.tasks):
            gen.add_runner(f"t-{i:06d}")
        gen.handout_target = s.tasks
        gen.hold_acks = True
        log(f"hand-out: creating {s.tasks} Tasks in {NAMESPACE}")
        if self.profiler.enabled:
            log("profiling the hand-out")
            self.profiler.start("hand-out", self.operator.pid)
        operator_before = await self.metrics() or {}
        before = self._cpu()
        bodies = (
            json.dumps(
                task_manifest(
                    f"t-{i:06d}",
                    heartbeat_s=s.heartbeat_s,
                    timeout_s=s.timeout_s,
                    ack_timeout_s=s.ack_timeout_s,
                )
            ).encode()
            for i in range(s.tasks)
        )
        bulk = await create_all(
            api,
            f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks",
            bodies,
            concurrency=s.concurrency,
        )
        if bulk.failed:
            raise RuntimeError(f"{bulk.failed} Tasks could not be created")
        log(f"hand-out: {s.tasks} Tasks created in {bulk.finished - bulk.started:.1f}s")
        limit = max(300.0, s.tasks * REQUESTS_PER_HANDOUT / s.qps * 3)
        await wait_for(
            f"{s.tasks} runner pods",
            gen.handout_done.is_set,
            within=limit,
            interval=0.5,
            check=self.operator.check,
        )
        self._record_cpu("hand-out", self._cpu().minus(before))
        self.profiler.finish()
        self._note_operator_requests("hand-out", operator_before, await self.metrics() or {})
        assert gen.handout_last_seen is not None
        elapsed = gen.handout_last_seen - bulk.started
        self.found.figures["handout_per_s"] = s.tasks / elapsed
        self.found.notes["tasks_create_s"] = bulk.finished - bulk.started
        self.found.notes["handout_all_pods_s"] = elapsed
        self.found.notes["acks_during_handout"] = gen.counters.acks_during_handout
        log(
            f"hand-out: {s.tasks} pods in {elapsed:.1f}s ({s.tasks / elapsed:.1f}/s); "
            f"{gen.counters.acks_during_handout} acks had to go before the last pod"
        )
        gen.release_acks()
        self.phase(gen, "acknowledge")
        started = time.monotonic()
        try:
            await wait_for(
                f"{s.tasks} Tasks Running",
                lambda: self._probe_running(s.tasks),
                within=max(300.0, s.tasks * 2 / s.qps * 6),
                interval=1.0,
                check=self.operator.check,
            )
        except TimeoutError:
            running = await self.running()
            self.found.notes["all_running_after_s"] = f"only {running:.0f} after the wait"
            log(f"WARNING: only {running:.0f} of {s.tasks} Tasks Running; measuring anyway")
            return
        self.found.notes["all_running_after_s"] = time.monotonic() - started
        log(f"all {s.tasks} Tasks Running {time.monotonic() - started:.1f}s after the acks")

    async def _probe_running(self, count: int) -> bool:
        return await self.running() >= count

    async def steady(self, gen: Generator) -> None:
        s = self.s
        self.phase(gen, "steady")
        # Let the acknowledgement burst pass and the heartbeats spread over the interval.
        await asyncio.sleep(s.heartbeat_s * 1.5)
        log(f"steady: measuring {s.window_s:.0f}s of heartbeats")
        gen.counters.lag_s.clear()
        gen.recording_lag = True
        acked_before = gen.counters.reports_acked
        before = self._cpu()
        await asyncio.sleep(s.window_s)
        delta = self._cpu().minus(before)
        heartbeats = gen.counters.reports_acked - acked_before
        gen.recording_lag = False
        self._record_cpu("steady", delta)
        rss = rss_bytes(self.operator.pid)
        operator_ms = per_thousand(delta.cpu_s["operator"] * 1000, heartbeats)
        apiserver_ms = per_thousand(delta.total(APISERVER) * 1000, heartbeats)
        figures = self.found.figures
        figures["operator_cpu_ms_per_1k_heartbeats"] = operator_ms
        figures["apiserver_cpu_ms_per_1k_heartbeats"] = apiserver_ms
        figures["cpu_ratio"] = ratio(operator_ms, apiserver_ms)
        rss_none = self.found.notes["rss_none_mib"]
        figures["rss_mib_per_1k_tasks"] = (rss / MIB - rss_none) / s.tasks * 1000
        self.steady_operator_s_per_report = delta.cpu_s["operator"] / max(heartbeats, 1)
        self.steady_apiserver_cores = delta.total(APISERVER) / delta.seconds
        notes = self.found.notes
        notes["steady_heartbeats"] = heartbeats
        notes["steady_heartbeats_per_s"] = heartbeats / delta.seconds
        notes["steady_expected_per_s"] = s.tasks / s.heartbeat_s
        if heartbeats / delta.seconds < 0.95 * s.tasks / s.heartbeat_s:
            notes["SATURATED"] = (
                "the API server stored fewer heartbeats than the runners sent: every "
                "figure of this run includes API server queueing"
            )
            log(f"WARNING: {notes['SATURATED']}")
        notes["generator_cpu_ms_per_1k_heartbeats"] = per_thousand(
            delta.cpu_s["generator"] * 1000, heartbeats
        )
        notes["kcm_cpu_ms_per_1k_heartbeats"] = per_thousand(
            delta.cpu_s["kube-controller-manager"] * 1000, heartbeats
        )
        notes["heartbeat_lag_p99_s"] = percentile(gen.counters.lag_s, 99)
        notes["rss_at_n_mib"] = rss / MIB
        notes["rss_at_n_by_kind_mib"] = rss_by_kind_mib(self.operator.pid)
        samples = await self.metrics() or {}
        # Events the hand-out and acknowledgement bursts brought past the operator's queue.
        notes["operator_events_dropped"] = metric_sum(samples, "tasklease_events_dropped_total")
        # Leases whose last report the operator saw more than ~2 intervals ago: it is
        # behind on its watch.
        bound = next((b for b in REPORT_AGE_BOUNDS if b >= 2 * s.heartbeat_s), None)
        if bound is not None:
            notes[f"operator_report_age_over_{bound:g}s"] = samples.get(
                "tasklease_report_age_seconds_count", 0.0
            ) - samples.get(f'tasklease_report_age_seconds_bucket{{le="{bound}"}}', 0.0)
        log(
            f"steady: {heartbeats} heartbeats ({heartbeats / delta.seconds:.0f}/s); operator "
            f"{delta.cores('operator'):.2f} cores, apiserver+etcd "
            f"{delta.cores('kube-apiserver') + delta.cores('etcd'):.2f} cores; "
            f"RSS {rss / MIB:.1f} MiB; {notes['operator_events_dropped']:.0f} Events dropped"
        )
        if self.profiler.enabled:
            log(f"profiling the steady state for {s.window_s:.0f}s")
            self.profiler.start("steady", self.operator.pid, seconds=s.window_s)
            await asyncio.sleep(s.window_s + 1)
            self.profiler.finish()

    async def _push(self, gen: Generator, *, alone: bool) -> tuple[float, CpuDelta]:
        s = self.s
        if alone:
            # Not SIGSTOP: a stopped process keeps its watch connections open, and the API
            # server stalls on the unread streams until it gives up on them, which made
            # the "alone" figure lower and erratic. Killed, its watches are gone.
            self.operator.kill()
            await asyncio.sleep(0.5)
        # Every push starts from an API server that finished the last one: otherwise only
        # the pushes with the operator follow a push at once (a push alone follows the
        # operator's restart and listing), and at 10,000 Tasks the ratio measured that order
        # (docs/performance.md, session 5).
        settled = await self.settle_apiserver(operator_running=not alone)
        before = self._cpu()
        started = time.monotonic()
        stored = await gen.push(s.push_s, concurrency=s.push_concurrency)
        self.push_ended_at = time.monotonic()
        elapsed = self.push_ended_at - started
        delta = self._cpu().minus(before)
        if alone:
            self.operator.start()
            await wait_for(
                f"the restarted operator to track {s.tasks} Tasks",
                lambda: self._probe_tracked(lambda n: n >= s.tasks),
                within=max(120.0, s.tasks / 100),
                interval=0.2,
                check=self.operator.check,
            )
            # Tracking every Task is not the end of its catch-up: at 50,000 the listing of
            # the runner pods went on into the next round and made it a measure of that.
            await self.wait_listed(interval=0.2)
        caught_up = await self.settle_operator()
        rate = stored / elapsed
        log(
            f"headroom {'alone' if alone else 'with the operator'}: {rate:.0f} reports/s "
            f"(apiserver+etcd {delta.cores('kube-apiserver') + delta.cores('etcd'):.2f} cores, "
            f"generator {delta.cores('generator'):.2f}, "
            f"operator {delta.cpu_s.get('operator', 0.0) / delta.seconds:.2f}, "
            f"machine {delta.cores(MACHINE):.2f}); "
            f"API server settled in {settled:.0f}s before it, operator in {caught_up:.0f}s after"
        )
        return rate, delta

    async def headroom(self, gen: Generator) -> None:
        s = self.s
        self.phase(gen, "headroom")
        alone: list[float] = []
        attached: list[float] = []
        quiet: list[bool] = []  # both halves of the round had the machine to themselves
        # Reports stored per CPU-second of kube-apiserver + etcd: what one report costs the
        # API server, whatever share of the machine it got.
        efficiency: dict[str, list[float]] = {"alone": [], "with": []}
        # One push left out, with the operator attached: the first push after the steady
        # window met an API server still working off what the heartbeats had queued
        # (docs/performance.md, session 5).
        warmup_rate, warmup = await self._push(gen, alone=False)
        self._record_cpu("push warm-up (left out)", warmup)
        self.found.notes["headroom_warmup_per_s"] = round(warmup_rate)
        for round_ in range(s.push_rounds):
            others: list[float] = []
            # With the operator first in odd rounds, alone first in even ones (ABBA): the
            # API server's rate drifts over a run (532, 497, 468 reports/s alone in one),
            # and always pushing "with" second charged that drift to the operator. An even
            # number of rounds ends with the operator attached, so detection follows a
            # push, not the restart that ends an "alone" push.
            for alone_now in (False, True) if round_ % 2 == 0 else (True, False):
                rate, delta = await self._push(gen, alone=alone_now)
                label = f"push {'alone' if alone_now else 'with operator'} #{round_ + 1}"
                (alone if alone_now else attached).append(rate)
                efficiency["alone" if alone_now else "with"].append(
                    rate * delta.seconds / delta.total(APISERVER)
                )
                self._record_cpu(label, delta)
                others.append(self.found.cpu[label].get("others", 0.0))
                if round_ == 0 and not alone_now:
                    self.found.notes["operator_cpu_ms_per_1k_reports_at_push"] = per_thousand(
                        delta.cpu_s["operator"] * 1000, rate * s.push_s
                    )
            quiet.append(max(others) <= QUIET_OTHERS_CORES)
        # On a shared machine another process's burst during one half of a round decides
        # the ratio; rounds where anything else used more than QUIET_OTHERS_CORES are left
        # out (all rounds count when none was quiet, and the table says so).
        rounds = [i for i, ok in enumerate(quiet) if ok] or list(range(len(quiet)))
        self.found.notes["headroom_rounds_used"] = (
            [i + 1 for i in rounds] if any(quiet) else "all (no quiet round: noisy)"
        )
        mean_alone = sum(alone[i] for i in rounds) / len(rounds)
        mean_attached = sum(attached[i] for i in rounds) / len(rounds)
        self.found.notes["headroom_alone_per_s"] = [round(r) for r in alone]
        self.found.notes["headroom_with_operator_per_s"] = [round(r) for r in attached]
        self.found.notes["reports_per_apiserver_cpu_s_alone"] = [
            round(e) for e in efficiency["alone"]
        ]
        self.found.notes["reports_per_apiserver_cpu_s_with"] = [
            round(e) for e in efficiency["with"]
        ]
        self.found.figures["headroom_ratio"] = ratio(mean_attached, mean_alone)
        if self.profiler.enabled:
            log("profiling a push with the operator attached")
            self.profiler.start("push", self.operator.pid, seconds=s.push_s)
            await gen.push(s.push_s, concurrency=s.push_concurrency)
            self.profiler.finish()
            await self.settle_operator()

    async def detection(self, gen: Generator) -> None:
        s = self.s
        self.phase(gen, "detection")
        runners = gen.counted
        count = max(1, round(len(runners) * s.victims_percent / 100))
        # A restarted operator gives every lease a full window from when it first sees it
        # (design invariant 3): a runner stopped before reporting to the current operator
        # process would be detected up to one interval "late" by design, and a report made
        # while it was still listing is first seen when the listing is delivered (at 10,000
        # Tasks, 24 stopped runners looked 1-2 s late for that reason). The same after a
        # push: the API server, saturated, delivers its watch events late (0.4 s p50, 2 s
        # p99 on a slow day), so a runner whose last report was a push's was seen late by
        # every watcher, and looked 0.5-1 s late here while the operator's own deadline-to-
        # pod time was 0.29 s. Start once every runner has made a steady report since the
        # last (re)start's listing and the last push.
        settled_at = max(self.operator.started_at, self.operator_listed_at, self.push_ended_at)
        ready_at = settled_at + s.heartbeat_s + 5.0
        if time.monotonic() < ready_at:
            log(
                f"detection: waiting {ready_at - time.monotonic():.0f}s for every runner to "
                "make a steady report since the last restart and push"
            )
            await asyncio.sleep(ready_at - time.monotonic())
        victims = gen.random.sample(runners, count)
        log(
            f"detection: stopping the heartbeats of {count} runners; their leases expire "
            f"{s.timeout_s:.0f}s after their last report"
        )
        requests_before = await self.apiserver_samples()
        operator_before = await self.metrics() or {}
        before = self._cpu()
        events = gen.stop_heartbeats(victims)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(event.wait() for event in events.values())),
                timeout=s.timeout_s + s.heartbeat_s + max(60.0, count / s.qps * 10),
            )
        except TimeoutError:
            left = sum(1 for event in events.values() if not event.is_set())
            log(f"detection: {left} of {count} stopped runners were never replaced")
            self.found.notes["detection_not_replaced"] = left
        self._record_cpu("detection", self._cpu().minus(before))
        # Every request the API server answered meanwhile (the stopped runners' replacements,
        # their aftermath, the other runners' heartbeats): where a slow reassignment waited.
        requests_after = await self.apiserver_samples()
        # Without both scrapes the difference would be the whole run's requests.
        requests = (
            request_latency_by_kind(requests_before, requests_after)
            if requests_before and requests_after
            else {}
        )
        self.found.notes["apiserver_requests_in_detection"] = requests
        log("detection: API server requests meanwhile: " + requests_text(requests))
        delays = gen.detection_delays()
        figures = self.found.figures
        figures["detection_p50_s"] = percentile(delays, 50)
        figures["detection_p99_s"] = percentile(delays, 99)
        self.found.notes["detection_samples"] = len(delays)
        self.found.notes["detection_max_s"] = max(delays) if delays else None
        self.found.notes["detection_min_s"] = min(delays) if delays else None
        # Per victim, in wall-clock time, to read beside the operator's log.
        self.found.notes["detection_by_task"] = {
            r.task: {
                "deadline": _wall(r.deadline),
                "pod_seen": _wall(r.seen),
                "delay_s": round(r.seen - r.deadline, 3),
            }
            for r in gen.reassignments
            if r.victim and r.deadline is not None
        }
        # The operator's own account of the same reassignments, from its deadline (its last
        # sighting of a report + the timeout): the decision (its timer and queue), then the
        # API server's answers as the operator waited for them, and any client-side budget.
        operator_samples = await self.metrics() or {}
        phase = {k: v - operator_before.get(k, 0.0) for k, v in operator_samples.items()}
        notes = self.found.notes
        for figure, metric in (
            ("operator_deadline_to_pod", "tasklease_reassignment_delay_seconds"),
            ("operator_deadline_to_decision", "tasklease_expiry_decision_delay_seconds"),
        ):
            observed = phase.get(f"{metric}_count", 0.0)
            if observed:
                notes[f"{figure}_mean_s"] = phase.get(f"{metric}_sum", 0.0) / observed
                notes[f"{figure}_p99_le_s"] = histogram_quantile_bound(phase, metric, 0.99)
        log(
            "detection: the operator's view: deadline to decision "
            f"{format_value(notes.get('operator_deadline_to_decision_mean_s'))}s mean, "
            f"to pod {format_value(notes.get('operator_deadline_to_pod_mean_s'))}s mean"
        )
        self._note_operator_requests("detection", operator_before, operator_samples)
        log(
            f"detection: {len(delays)} samples, p50 {format_value(figures['detection_p50_s'])}s, "
            f"p99 {format_value(figures['detection_p99_s'])}s"
        )
        try:
            await wait_for(
                "the replacements to run",
                lambda: self._probe_running(s.tasks),
                within=max(120.0, s.ack_timeout_s * 2),
                interval=1.0,
                check=self.operator.check,
            )
        except TimeoutError:
            log(f"WARNING: only {await self.running():.0f} of {s.tasks} Tasks Running; going on")

    def _note_operator_requests(
        self, phase: str, before: Mapping[str, float], after: Mapping[str, float]
    ) -> None:
        """The operator's requests in a phase, by kind and answer, and its waits for its
        client-side budgets: whether the phase was paced by the budget (QPS) or by the
        answers (the API server, and how many requests the workers keep in flight)."""
        key = phase.replace("-", "")
        notes = self.found.notes
        requests = request_latency_by_kind(before, after, metric=OPERATOR_REQUESTS)
        notes[f"operator_requests_in_{key}"] = requests
        waits = {}
        for budget in ("requests", "events"):
            waited = [
                after.get(f'tasklease_api_throttle_seconds_{part}{{budget="{budget}"}}', 0.0)
                - before.get(f'tasklease_api_throttle_seconds_{part}{{budget="{budget}"}}', 0.0)
                for part in ("count", "sum")
            ]
            waits[budget] = {"requests": waited[0], "seconds": round(waited[1], 1)}
        notes[f"operator_throttled_in_{key}"] = waits
        log(
            f"{phase}: the operator's requests: "
            + requests_text(requests)
            + "; waits for the client-side budget: "
            + ", ".join(
                f"{budget} {w['requests']:.0f} requests, {w['seconds']}s in all"
                for budget, w in waits.items()
            )
        )

    async def restart(self, gen: Generator) -> None:
        s = self.s
        self.phase(gen, "restart")
        await asyncio.sleep(s.heartbeat_s)
        log("restart: SIGKILL and restart of the operator")
        self.operator.kill()
        started = time.monotonic()
        self.operator.start()
        up = await wait_for(
            "the restarted operator's metrics",
            lambda: self._probe_tracked(lambda n: True),
            within=120,
            interval=0.05,
            check=self.operator.check,
        )
        done = await wait_for(
            f"the restarted operator to track {s.tasks} Tasks",
            lambda: self._probe_tracked(lambda n: n >= s.tasks),
            within=max(120.0, s.tasks / 100),
            interval=0.05,
            check=self.operator.check,
        )
        self.found.figures["restart_resume_s"] = done - started
        self.found.notes["restart_metrics_up_s"] = up - started
        log(f"restart: tracking all {s.tasks} Tasks {done - started:.2f}s after the restart")
        listed = await self.wait_listed(interval=0.05)
        self.found.notes["restart_all_listed_s"] = listed - started
        self.phase(gen, "after restart")
        before = self._cpu()
        rss_samples = []
        # Every lease gets a full window from its first sighting after the restart, so a
        # lease the restarted operator wrongly lets expire does so within this time.
        watch_for = s.timeout_s + s.heartbeat_s + 10.0
        log(f"restart: watching {watch_for:.0f}s for reassignments")
        deadline = time.monotonic() + watch_for
        while time.monotonic() < deadline:
            self.operator.check()
            await asyncio.sleep(min(5.0, max(deadline - time.monotonic(), 0.01)))
            rss_samples.append(rss_bytes(self.operator.pid))
        self._record_cpu("after restart", self._cpu().minus(before))
        self.found.notes["rss_after_restart_mib"] = min(rss_samples) / MIB if rss_samples else None
        if self.profiler.enabled:
            log("profiling one more restart")
            self.operator.kill()
            self.operator.start()
            self.profiler.start("restart", self.operator.pid)
            await wait_for(
                f"the restarted operator to track {s.tasks} Tasks",
                lambda: self._probe_tracked(lambda n: n >= s.tasks),
                within=max(120.0, s.tasks / 100),
                interval=0.05,
                check=self.operator.check,
            )
            await asyncio.sleep(1.0)
            self.profiler.finish()

    async def diagnose(self, api: Api, gen: Generator) -> None:
        """What the operator says about its reassignments, and the attempt history of Tasks
        whose runner never stopped but lost its lease (for the report)."""
        text = ""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response,
            ):
                text = await response.text()
        if text:
            (self.s.output_dir / "operator-metrics.txt").write_text(text)
            samples = parse_prometheus(text)
            self.found.notes["operator_reassignments_since_restart"] = {
                key.split('"')[1]: value
                for key, value in samples.items()
                if key.startswith("tasklease_reassignments_total{")
            }
        status, data = await api.call(
            "GET", f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks/t-000000"
        )
        if status == 200:
            (self.s.output_dir / "sample-task.json").write_bytes(data)
        false = gen.false_reassignments()
        examples = []
        for item in false[:10]:
            status, data = await api.call(
                "GET", f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks/{item.task}"
            )
            attempts = []
            if status == 200:
                for attempt in (json.loads(data).get("status") or {}).get("attempts") or []:
                    attempts.append(
                        f"epoch {attempt.get('epoch')} {attempt.get('startTime')}.."
                        f"{attempt.get('endTime')} {attempt.get('outcome')}: "
                        f"{attempt.get('message')}"
                    )
            runner = gen.by_task.get(item.task)
            examples.append(
                {
                    "task": item.task,
                    "phase": item.phase,
                    "epochs": f"{item.old_epoch}->{item.new_epoch}",
                    "seen_at": _wall(item.seen),
                    "last_ack_before_s": item.last_ack_age,
                    "runner_reports": runner.reports if runner else None,
                    "attempts": attempts,
                }
            )
        if examples:
            self.found.notes["false_reassignment_examples"] = examples
            (self.s.output_dir / "false-reassignments.json").write_text(
                json.dumps(examples, indent=2)
            )

    def conclude(self) -> None:
        gen = self.gen
        restart = gen.false_reassignments({"restart", "after restart"})
        others = gen.false_reassignments(
            {p for p in {r.phase for r in gen.reassignments}} - {"restart", "after restart"}
        )
        # Counted in Tasks: a Task that lost the lease of a runner that never stopped.
        self.found.figures["false_reassignments"] = len({r.task for r in others})
        self.found.figures["restart_false_reassignments"] = len({r.task for r in restart})
        by_phase: dict[str, int] = {}
        for item in others + restart:
            by_phase[item.phase] = by_phase.get(item.phase, 0) + 1
        self.found.notes["false_reassignments_by_phase"] = by_phase
        self.found.notes["false_reassignments_of_replacement_runners"] = sum(
            1 for item in others + restart if gen.by_task[item.task].victim
        )
        self.found.notes["refused_reports"] = gen.counters.refused
        self.found.notes["report_errors"] = gen.counters.errors
        self.found.notes["pods_found_by_relisting"] = gen.listed_pods
        figures = self.found.figures
        figures["tasks"] = self.s.tasks
        figures["handout_ratio"] = ratio(
            figures.get("handout_per_s"), figures.get("job_controller_pods_per_s")
        )


# --- output ---------------------------------------------------------------------------------


# Long notes that go to details.json only.
UNPRINTED_NOTES: Final = frozenset({"phase_started", "false_reassignment_examples"})

LABELS: Final = {
    "tasks": "active Tasks (N)",
    "operator_cpu_ms_per_1k_heartbeats": "operator CPU-ms / 1k heartbeats",
    "apiserver_cpu_ms_per_1k_heartbeats": "apiserver+etcd CPU-ms / 1k heartbeats",
    "cpu_ratio": "cpu_ratio (operator / apiserver)",
    "headroom_ratio": "headroom_ratio (with / alone)",
    "rss_mib_per_1k_tasks": "operator RSS MiB / 1k Tasks",
    "detection_p50_s": "detection p50 (s)",
    "detection_p99_s": "detection p99 (s)",
    "false_reassignments": "false reassignments",
    "handout_per_s": "hand-out, runner pods/s",
    "job_controller_pods_per_s": "Job controller, pods/s",
    "handout_ratio": "handout_ratio (operator / Jobs)",
    "restart_resume_s": "restart: all Tasks tracked (s)",
    "restart_false_reassignments": "restart: false reassignments",
}


def render(settings: Settings, found: Findings) -> str:
    parts = [
        "tasklease benchmark",
        format_table(
            [
                ["Tasks", str(settings.tasks)],
                [
                    "heartbeat / reportProgressTimeout / ackTimeout",
                    f"{settings.heartbeat_s:g}s / {settings.timeout_s:g}s / "
                    f"{settings.ack_timeout_s:g}s",
                ],
                ["client QPS / burst (operator and kcm)", f"{settings.qps:g} / {settings.burst}"],
                ["operator workers", str(settings.workers)],
                [
                    "push",
                    f"{settings.push_s:g}s x {settings.push_rounds} rounds each, "
                    f"{settings.push_concurrency} in flight",
                ],
                ["kube-apiserver extra flags", " ".join(settings.apiserver_args)],
                ["kube-controller-manager extra flags", " ".join(settings.kcm_args)],
                ["machine", f"{os.cpu_count()} CPUs, {platform.platform()}"],
            ]
        ),
        "",
        "CPU by phase (cores busy on average; others: the rest of this shared machine):",
        _cpu_table(found.cpu),
        "",
        "API server watch delay of a Task change (probe Task; s):",
        format_table(
            [
                [
                    phase,
                    format_value(lag["p50"]),
                    format_value(lag["p99"]),
                    format_value(lag["max"]),
                    str(lag["samples"]),
                ]
                for phase, lag in found.watch_lag.items()
            ],
            header=["phase", "p50", "p99", "max", "samples"],
        ),
        "",
        "details:",
        format_table(
            [
                [key, format_value(value)]
                for key, value in found.notes.items()
                if key not in UNPRINTED_NOTES
            ]
        ),
        "",
        figures_table(found.figures, LABELS),
    ]
    missed = missed_goals(found.figures)
    if missed:
        parts += ["", f"goals missed: {', '.join(missed)}"]
    false = (found.figures.get("false_reassignments") or 0) + (
        found.figures.get("restart_false_reassignments") or 0
    )
    if false:
        parts += [
            "",
            "!" * 78,
            f"!!! FALSE REASSIGNMENTS: {false} Tasks whose runner never stopped lost their "
            f"lease (by phase: {found.notes.get('false_reassignments_by_phase')})",
            "!" * 78,
        ]
    return "\n".join(parts)


def _cpu_table(cpu: Mapping[str, Mapping[str, float]]) -> str:
    names = ["operator", "kube-apiserver", "etcd", "kube-controller-manager", "generator", "others"]
    rows = [
        [phase] + [f"{cores[n]:.2f}" if n in cores else "-" for n in names]
        for phase, cores in cpu.items()
    ]
    return format_table(rows, header=["phase", *names])


# --- entry point ----------------------------------------------------------------------------


def auto_timeout(tasks: int, qps: float) -> float:
    """A reportProgressTimeout (and ackTimeout) long enough for the whole bulk hand-out to
    fit in the ack window (acks are held until the last pod is out), at least 30 s."""
    handout_s = tasks * REQUESTS_PER_HANDOUT / qps
    return float(max(30, math.ceil(handout_s * 1.5 / 10) * 10))


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=1000, help="active Tasks N (1000)")
    parser.add_argument(
        "--heartbeat-interval", type=float, default=5.0, help="seconds between reports (5)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="reportProgressTimeout in seconds (default: long enough for the bulk hand-out "
        "to fit in the ack window, at least 30)",
    )
    parser.add_argument(
        "--ack-timeout", type=float, default=None, help="ackTimeout in seconds (= --timeout)"
    )
    parser.add_argument("--qps", type=float, default=100.0, help="operator and kcm QPS (100)")
    parser.add_argument("--burst", type=int, default=200, help="operator and kcm burst (200)")
    parser.add_argument("--workers", type=int, default=16, help="TASKLEASE_WORKERS (16)")
    parser.add_argument(
        "--window", type=float, default=None, help="steady window, s (max(30, 3 intervals))"
    )
    parser.add_argument("--push-seconds", type=float, default=15.0)
    parser.add_argument("--push-concurrency", type=int, default=64)
    parser.add_argument(
        "--push-rounds", type=int, default=4, help="alone/with pairs, in ABBA order (4)"
    )
    parser.add_argument("--victims-percent", type=float, default=5.0)
    parser.add_argument(
        "--concurrency", type=int, default=64, help="generator requests in flight (64)"
    )
    parser.add_argument("--no-jobs", action="store_true", help="skip the Job controller")
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the operator process, for experiments (repeatable)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=REPO_ROOT / ".tasklease" / "bench",
        help="operator log, details.json, profiles (.tasklease/bench)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also record py-spy profiles of the operator"
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: every thread, with C frames (TLS, parsers), not only Python's",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    timeout = args.timeout if args.timeout is not None else auto_timeout(args.tasks, args.qps)
    ack = args.ack_timeout if args.ack_timeout is not None else timeout
    if ack > timeout:
        parser.error("--ack-timeout must not exceed --timeout (the CRD refuses it)")
    if args.heartbeat_interval >= timeout:
        parser.error("--heartbeat-interval must be shorter than --timeout")
    window = args.window if args.window is not None else max(30.0, 3 * args.heartbeat_interval)
    # The client side of the API server: the generator's 64 requests in flight and the
    # watches must never queue behind the default 400/200 in-flight limits.
    apiserver_args = ["--max-requests-inflight=1000", "--max-mutating-requests-inflight=500"]
    kcm_args = [
        # Appended to the control plane's own --controllers (a repeated string-slice flag
        # adds to the list).
        "--controllers=job-controller",
        f"--kube-api-qps={args.qps:g}",
        f"--kube-api-burst={args.burst}",
    ]
    return Settings(
        tasks=args.tasks,
        heartbeat_s=args.heartbeat_interval,
        timeout_s=timeout,
        ack_timeout_s=ack,
        qps=args.qps,
        burst=args.burst,
        workers=args.workers,
        window_s=window,
        push_s=args.push_seconds,
        push_concurrency=args.push_concurrency,
        push_rounds=args.push_rounds,
        victims_percent=args.victims_percent,
        concurrency=args.concurrency,
        jobs=not args.no_jobs,
        output_dir=args.output_dir.resolve(),
        profile=args.profile or args.profile_native,
        profile_native=args.profile_native,
        seed=args.seed,
        apiserver_args=apiserver_args,
        kcm_args=kcm_args,
        operator_env=dict(item.split("=", 1) for item in args.operator_env),
    )


def _kubectl_setup(plane: Any) -> None:
    plane.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    plane.kubectl("wait", "--for", "condition=established", "crd", "--all", "--timeout=60s")
    for namespace in (NAMESPACE, JOBS_NAMESPACE, PROBE_NAMESPACE):
        plane.kubectl("create", "namespace", namespace)
    deadline = time.monotonic() + 60
    for namespace in (NAMESPACE, JOBS_NAMESPACE):
        while plane.kubectl("get", "sa", "default", "-n", namespace, check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no default ServiceAccount in {namespace}")
            time.sleep(0.2)


def _code_version() -> str:
    """The commit the operator ran from, '+dirty' when operator/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "operator"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    from tasklease.controlplane import KUBERNETES_VERSION, ControlPlane, obtain_binaries

    settings.output_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"N={settings.tasks}, heartbeats every {settings.heartbeat_s:g}s, "
        f"reportProgressTimeout {settings.timeout_s:g}s, ackTimeout {settings.ack_timeout_s:g}s, "
        f"QPS/burst {settings.qps:g}/{settings.burst}; Kubernetes {KUBERNETES_VERSION}"
    )
    binaries = obtain_binaries(progress=sys.stderr)
    log("starting the control plane")
    operator: OperatorProcess | None = None
    found: Findings | None = None
    with ControlPlane.start(
        binaries=binaries,
        extra_args={
            "kube-apiserver": settings.apiserver_args,
            "kube-controller-manager": settings.kcm_args,
        },
    ) as plane:
        try:
            _kubectl_setup(plane)
            log_path = settings.output_dir / "operator.log"
            log_path.unlink(missing_ok=True)
            env = dict(
                os.environ,
                KUBECONFIG=str(plane.kubeconfig),
                TASKLEASE_NAMESPACES=NAMESPACE,
                TASKLEASE_WORKERS=str(settings.workers),
                TASKLEASE_API_QPS=f"{settings.qps:g}",
                TASKLEASE_API_BURST=str(settings.burst),
                TASKLEASE_METRICS_PORT=str(free_port()),
                TASKLEASE_HEALTH_PORT="0",
                TASKLEASE_LOG_LEVEL="WARNING",
            )
            env.update(settings.operator_env)  # may override the above
            operator = OperatorProcess(env, log_path)
            bench = Bench(settings, plane, operator)
            try:
                asyncio.run(bench.run())
            finally:
                found = bench.found
                with contextlib.suppress(AttributeError):
                    bench.conclude()
        finally:
            if operator is not None:
                operator.stop()
    assert found is not None
    found.notes["operator_code"] = _code_version()
    details = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()},
        "figures": found.figures,
        "notes": found.notes,
        "cpu_cores_by_phase": found.cpu,
        "watch_lag_s_by_phase": found.watch_lag,
    }
    (settings.output_dir / "details.json").write_text(json.dumps(details, indent=2, default=str))
    print(render(settings, found))
    print(f"\n(details: {settings.output_dir / 'details.json'})")
    if settings.profile:
        from bench.flame import summarize_file

        for path in sorted((settings.output_dir / "profiles").glob("*.txt")):
            print(f"\n== py-spy profile of the operator: {path.name}")
            print(summarize_file(path, top=20))
    print(result_json({k: v for k, v in found.figures.items() if k in RESULT_KEYS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
