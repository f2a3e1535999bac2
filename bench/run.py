"""`make bench`: the operator's cost and speed against the API server's, in one run.

    python -m bench.run [--tasks 1000] [--heartbeat-interval 5] [--timeout auto] ...

Starts a local control plane (etcd, kube-apiserver, kube-controller-manager with the Job
controller added), then runs the phases in bench/phases/, in order:

0. heartbeat_cost: API server + etcd CPU per Task heartbeat (the runner SDK's write, on a
   realistic and a small Task) and per Lease renewal, the same client and concurrency for
   both (bench/heartbeat_cost.py), before anything else uses the API server.
1. job_controller: N batch/v1 Jobs (parallelism 1) created in bulk; pods per second from the
   first create to the N-th pod seen by a watch.
2. warm_up: the operator (a subprocess, `python -m tasklease operator`), warmed up with one
   Task that is then deleted: its RSS "with none".
3. handout: N Tasks created in bulk; runner pods per second, same clock as (1). The load
   generator holds the runners' acknowledgements until the N-th pod is out (or 80% of the
   ack timeout passed for a pod), then acknowledges them all and heartbeats every interval.
4. steady: CPU-seconds of the operator, kube-apiserver and etcd over the same heartbeats;
   operator RSS at N.
5. headroom: the generator pushes fenced reports as fast as it can with a fixed number in
   flight, with the operator killed ("alone", restarted afterwards) and running ("with"),
   alternately. A watch-lag probe measures throughout how late Task changes reach watchers.
6. detection: a random 5% of runners stop; from each one's deadline (its last report the API
   server acknowledged + reportProgressTimeout) to the watch seeing the pod of the next epoch.
7. restart: SIGKILL and restart of the operator with heartbeats flowing; seconds until its
   metrics count all N Tasks again; then one full timeout of watching for reassignments.

False reassignments (a pod of a new epoch for a Task whose runner never stopped) are counted
throughout (phases/closing.py). The table (bench/render.py) goes to stdout, progress to
stderr, and the LAST stdout line is the JSON object described in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.context import (
    CONTROL_PLANE,
    NAMESPACE,
    PROBE_NAMESPACE,
    REPO_ROOT,
    REQUESTS_PER_HANDOUT,
    BenchRun,
    Findings,
    Settings,
    log,
    prepare_cluster,
)
from bench.loadgen import Api, Generator, WatchLagProbe
from bench.operator_process import BenchOperator
from bench.phases import (
    closing,
    detection,
    handout,
    headroom,
    heartbeat_cost,
    job_controller,
    restart,
    steady,
    warm_up,
)
from bench.procstat import find_components
from bench.profiler import Profiler
from bench.render import render
from bench.report import RESULT_KEYS, percentile, result_json
from tasklease.controlplane.cluster import free_port


async def run_phases(
    settings: Settings, plane: Any, operator: BenchOperator, found: Findings
) -> None:
    """Every phase in order, with the generator's runners and the watch-lag probe running
    throughout; what they measure goes to `found`."""
    s = settings
    pids = find_components(plane.state_dir, CONTROL_PLANE)
    missing = set(CONTROL_PLANE) - set(pids)
    if missing:
        raise RuntimeError(f"control-plane processes not found in /proc: {sorted(missing)}")
    log(f"control plane pids: {pids}")
    async with Api(
        plane.server,
        ca=plane.admin_ca,
        cert=plane.admin_cert,
        key=plane.admin_key,
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
        bench = BenchRun(
            settings=s,
            plane=plane,
            api=api,
            gen=gen,
            operator=operator,
            profiler=Profiler(
                s.output_dir / "profiles" if s.profile else None, native=s.profile_native
            ),
            control_plane_pids=pids,
            found=found,
        )
        # Before anything else writes: the API server's CPU is this phase's alone.
        await heartbeat_cost.run(bench)
        watches = [
            await api.start_watch(
                f"/api/v1/namespaces/{NAMESPACE}/pods",
                label_selector="tasklease.io/task",
                on_event=gen.on_pod,
            )
        ]
        gen.start()
        # The probe has connections of its own: queued behind the generator's requests it
        # would measure the generator's backlog, not the API server's watch.
        probe_api = Api(
            plane.server,
            ca=plane.admin_ca,
            cert=plane.admin_cert,
            key=plane.admin_key,
            connections=2,
        )
        await probe_api.__aenter__()
        probe = WatchLagProbe(probe_api, PROBE_NAMESPACE)
        await probe.create()
        watches.append(asyncio.create_task(probe.run(lambda: gen.phase)))
        try:
            if s.jobs:
                await job_controller.run(bench, watches)
            rss_none_mib = await warm_up.run(bench)
            await handout.run(bench)
            cost = await steady.run(bench, rss_none_mib=rss_none_mib)
            busy_until = await headroom.run(bench, cost)
            await detection.run(bench, busy_until=busy_until)
            await restart.run(bench)
        finally:
            # Diagnostics only: their failure must not replace the error that ended the run.
            with contextlib.suppress(Exception):
                await closing.diagnose(bench)
            await probe_api.__aexit__(None, None, None)
            for phase, lags in probe.by_phase().items():
                found.watch_lag[phase] = {
                    "p50": percentile(lags, 50),
                    "p99": percentile(lags, 99),
                    "max": max(lags),
                    "samples": len(lags),
                }
            bench.profiler.finish()
            await gen.stop()
            for watch in watches:
                watch.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
        closing.conclude(bench)


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
    parser.add_argument(
        "--heartbeat-cost-writes",
        type=int,
        default=1000,
        help="writes per variant and round in the heartbeat-cost phase (1000; 0 skips it)",
    )
    parser.add_argument("--heartbeat-cost-rounds", type=int, default=3)
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
        heartbeat_cost_writes=args.heartbeat_cost_writes,
        heartbeat_cost_rounds=args.heartbeat_cost_rounds,
        apiserver_args=apiserver_args,
        kcm_args=kcm_args,
        operator_env=dict(item.split("=", 1) for item in args.operator_env),
    )


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


def make_operator(settings: Settings, plane: Any) -> BenchOperator:
    """The operator's process, not started yet: the bench's namespace, workers and client
    budget; `--operator-env` may override any of it."""
    log_path = settings.output_dir / "operator.log"
    log_path.unlink(missing_ok=True)
    port = settings.operator_env.get("TASKLEASE_METRICS_PORT")
    return BenchOperator(
        kubeconfig=plane.kubeconfig,
        namespace=NAMESPACE,
        log_path=log_path,
        metrics_port=int(port) if port is not None else free_port(),
        extra_env={
            "TASKLEASE_WORKERS": str(settings.workers),
            "TASKLEASE_API_QPS": f"{settings.qps:g}",
            "TASKLEASE_API_BURST": str(settings.burst),
            "TASKLEASE_LOG_LEVEL": "WARNING",
            **settings.operator_env,
        },
    )


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
    found = Findings()
    with ControlPlane.start(
        binaries=binaries,
        extra_args={
            "kube-apiserver": settings.apiserver_args,
            "kube-controller-manager": settings.kcm_args,
        },
    ) as plane:
        operator: BenchOperator | None = None
        try:
            prepare_cluster(plane)
            operator = make_operator(settings, plane)
            asyncio.run(run_phases(settings, plane, operator, found))
        finally:
            if operator is not None:
                operator.stop()
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
