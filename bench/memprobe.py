"""Where the operator's memory per Task goes: `python -m bench.memprobe [--tasks 1000]`.

Runs the operator under tracemalloc on a local control plane, takes a heap snapshot with no
Tasks and another with N Tasks heartbeating, and prints the growth per Task by file and by
allocation traceback. py-spy sees CPU only; this is the memory counterpart of
`make bench BENCH_ARGS=--profile`. tracemalloc slows the operator down: the figures are
bytes, not times. Compare with the benchmark's RSS per Task: what tracemalloc does not see
is allocator retention (memory freed by Python but kept by its allocator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.context import NAMESPACE, prepare_cluster
from bench.loadgen import Api, Generator, create_all, task_manifest, wait_for
from bench.procstat import rss_bytes
from bench.report import parse_prometheus
from tasklease.controlplane.cluster import free_port

# Run as the operator's main module: snapshots on SIGUSR1, written next to a marker file.
WRAPPER = """
import signal, sys, tracemalloc
folder = sys.argv[1]
tracemalloc.start(int(sys.argv[2]))
count = [0]
def dump(*_):
    count[0] += 1
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.take_snapshot().dump(f"{folder}/snap{count[0]}.pickle")
    with open(f"{folder}/snap{count[0]}.mem", "w") as out:
        out.write(f"{current} {peak}")
    tracemalloc.reset_peak()
    open(f"{folder}/snap{count[0]}.done", "w").close()
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["tasklease", "operator"]
from tasklease.operator.main import run
run()
"""
HEARTBEAT_S = 10.0
TIMEOUT_S = 120.0


async def _tracked(port: int) -> dict[str, float]:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            return parse_prometheus(await response.text())
    except (aiohttp.ClientError, OSError):
        return {}


async def _snapshot(pid: int, folder: Path, index: int) -> None:
    os.kill(pid, signal.SIGUSR1)
    marker = folder / f"snap{index}.done"
    await wait_for(f"heap snapshot {index}", marker.exists, within=600, interval=0.5)


async def _drive(plane: object, pid: int, port: int, folder: Path, tasks: int) -> list[int]:
    rss = []
    async with Api(
        plane.server,  # type: ignore[attr-defined]
        ca=plane.admin_ca,  # type: ignore[attr-defined]
        cert=plane.admin_cert,  # type: ignore[attr-defined]
        key=plane.admin_key,  # type: ignore[attr-defined]
        connections=32,
    ) as api:
        gen = Generator(
            api,
            NAMESPACE,
            heartbeat_s=HEARTBEAT_S,
            timeout_s=TIMEOUT_S,
            ack_timeout_s=TIMEOUT_S,
            concurrency=32,
        )
        listed = asyncio.Event()
        watch = asyncio.create_task(
            api.watch(
                f"/api/v1/namespaces/{NAMESPACE}/pods",
                label_selector="tasklease.io/task",
                on_event=gen.on_pod,
                listed=listed,
            )
        )
        await listed.wait()
        gen.start()

        async def up() -> bool:
            return bool(await _tracked(port))

        await wait_for("the operator's metrics", up, within=120)
        await asyncio.sleep(5)
        rss.append(rss_bytes(pid))
        await _snapshot(pid, folder, 1)
        print("snapshot with no Tasks", file=sys.stderr, flush=True)
        for i in range(tasks):
            gen.add_runner(f"t-{i:06d}")
        gen.handout_target = tasks
        gen.hold_acks = True
        await create_all(
            api,
            f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks",
            (
                json.dumps(
                    task_manifest(
                        f"t-{i:06d}",
                        heartbeat_s=HEARTBEAT_S,
                        timeout_s=TIMEOUT_S,
                        ack_timeout_s=TIMEOUT_S,
                    )
                ).encode()
                for i in range(tasks)
            ),
            concurrency=32,
        )
        await gen.handout_done.wait()
        gen.release_acks()

        async def running() -> bool:
            samples = await _tracked(port)
            return samples.get('tasklease_tasks{phase="Running"}', 0.0) >= tasks

        await wait_for(f"{tasks} Tasks Running", running, within=600, interval=2)
        await asyncio.sleep(3 * HEARTBEAT_S)
        rss.append(rss_bytes(pid))
        await _snapshot(pid, folder, 2)
        print(f"snapshot with {tasks} Tasks", file=sys.stderr, flush=True)
        await gen.stop()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    return rss


def report(folder: Path, tasks: int, rss: list[int], *, top: int = 20) -> str:
    before = tracemalloc.Snapshot.load(str(folder / "snap1.pickle"))
    after = tracemalloc.Snapshot.load(str(folder / "snap2.pickle"))
    by_file = after.compare_to(before, "filename")
    first = int((folder / "snap1.mem").read_text().split()[0])
    peak = int((folder / "snap2.mem").read_text().split()[1])
    total = sum(stat.size_diff for stat in by_file)
    lines = [
        f"RSS: {rss[0] / 2**20:.1f} MiB with none, {rss[1] / 2**20:.1f} MiB with {tasks}: "
        f"{(rss[1] - rss[0]) / tasks / 1024:.1f} KiB per Task",
        f"Python heap (tracemalloc): +{total / 2**20:.1f} MiB, "
        f"{total / tasks / 1024:.1f} KiB per Task",
        # The high-water mark between the snapshots (hand-out and acknowledgement bursts),
        # against the heap at the first: what the allocator had to find room for at once.
        f"Python heap peak between the snapshots: +{(peak - first) / 2**20:.1f} MiB over the "
        f"heap with none, {(peak - first) / tasks / 1024:.1f} KiB per Task",
        "",
        "by file (KiB per Task, blocks per Task):",
    ]
    for stat in by_file[:top]:
        lines.append(
            f"{stat.size_diff / tasks / 1024:8.2f} {stat.count_diff / tasks:7.1f}  "
            f"{stat.traceback[0].filename}"
        )
    lines += ["", "by line (KiB per Task, blocks per Task):"]
    for stat in after.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        lines.append(
            f"{stat.size_diff / tasks / 1024:8.2f} {stat.count_diff / tasks:7.1f}  "
            f"{frame.filename}:{frame.lineno}"
        )
    lines += ["", "by allocation site, innermost frames last:"]
    for stat in after.compare_to(before, "traceback")[:top]:
        lines.append(
            f"--- {stat.size_diff / tasks / 1024:.2f} KiB, {stat.count_diff / tasks:.1f} "
            "blocks per Task"
        )
        lines += stat.traceback.format()[-8:]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memprobe", description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8, help="traceback depth (8)")
    args = parser.parse_args(argv)
    from tasklease.controlplane import ControlPlane

    with tempfile.TemporaryDirectory(prefix="tasklease-memprobe-") as temp:
        folder = Path(temp)
        wrapper = folder / "operator_under_tracemalloc.py"
        wrapper.write_text(WRAPPER)
        with ControlPlane.start() as plane:
            prepare_cluster(plane)
            port = free_port()
            env = dict(
                os.environ,
                KUBECONFIG=str(plane.kubeconfig),
                TASKLEASE_NAMESPACES=NAMESPACE,
                TASKLEASE_METRICS_PORT=str(port),
                TASKLEASE_HEALTH_PORT="0",
                TASKLEASE_LOG_LEVEL="WARNING",
            )
            from tasklease.controlplane.process import die_with_parent

            operator = subprocess.Popen(
                [sys.executable, str(wrapper), str(folder), str(args.frames)],
                env=env,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(os.getpid()),
            )
            try:
                started = time.monotonic()
                rss = asyncio.run(_drive(plane, operator.pid, port, folder, args.tasks))
                print(f"(took {time.monotonic() - started:.0f}s)", file=sys.stderr)
            finally:
                operator.kill()
                operator.wait()
        print(report(folder, args.tasks, rss))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
