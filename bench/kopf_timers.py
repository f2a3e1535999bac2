"""Per-object kopf timers vs. event handlers: what one replica pays per watched Task.

The measurement behind the design decision "one deadline queue, not a timer per Task"
(docs/design.md). It starts the local control plane, creates N Tasks (pool tasks, so nothing
else acts on them), then runs a bare kopf operator twice over them — once with only an
`on.event` handler, once with a no-op `@kopf.timer` — and reports each one's resident memory
per 1,000 Tasks once it has seen them all, and the API writes kopf made (timers put a
finalizer on every object).

    python -m bench.kopf_timers --tasks 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procstat import rss_bytes
from tasklease.controlplane.process import die_with_parent

OPERATOR = """
import os, pathlib, kopf
MODE = os.environ["BENCH_MODE"]
SEEN = pathlib.Path(os.environ["BENCH_SEEN"])
names = set()

@kopf.on.startup()
def configure(settings, **_):
    settings.posting.enabled = False
    settings.watching.server_timeout = 300

if MODE == "timer":
    @kopf.timer("tasklease.io", "v1alpha1", "tasks", interval=600, initial_delay=600)
    async def tick(**_):
        return None

@kopf.on.event("tasklease.io", "v1alpha1", "tasks")
async def seen(name, **_):
    # async: runs on the event loop, one at a time, so the count written is never stale
    names.add(name)
    SEEN.write_text(str(len(names)))
"""


def _run_operator(mode: str, kubeconfig: Path, tasks: int, workdir: Path) -> dict[str, float]:
    script = workdir / f"op_{mode}.py"
    script.write_text(OPERATOR)
    seen = workdir / f"seen_{mode}"
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), BENCH_MODE=mode, BENCH_SEEN=str(seen))
    process = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "-A", "--quiet", str(script)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(os.getpid()),
    )
    try:
        time.sleep(2.0)
        baseline = rss_bytes(process.pid)
        started = time.monotonic()
        while time.monotonic() - started < 600:
            if seen.exists() and seen.read_text().strip() == str(tasks):
                break
            time.sleep(0.5)
        time.sleep(5.0)  # let timers and finalizer patches settle
        loaded = rss_bytes(process.pid)
        return {
            "seen_s": time.monotonic() - started - 5.0,
            "rss_mib": loaded / 2**20,
            "rss_mib_per_1k_tasks": (loaded - baseline) / 2**20 / tasks * 1000,
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args(argv)

    from tasklease.controlplane import ControlPlane

    repo = Path(__file__).resolve().parents[1]
    with ControlPlane.start() as plane, tempfile.TemporaryDirectory() as scratch:
        plane.apply_crds(repo / "crds")
        workdir = Path(scratch)
        manifest = workdir / "tasks.yaml"
        with manifest.open("w") as out:
            for index in range(args.tasks):
                out.write(
                    "---\napiVersion: tasklease.io/v1alpha1\nkind: Task\n"
                    f"metadata: {{name: t-{index:05d}, namespace: default}}\n"
                    "spec: {workerGroup: bench}\n"
                )
        plane.kubectl("apply", "--server-side", "-f", str(manifest), timeout=600)
        results = {
            mode: _run_operator(mode, plane.kubeconfig, args.tasks, workdir)
            for mode in ("event", "timer")
        }
        finalized = plane.kubectl(
            "get",
            "tasks",
            "-n",
            "default",
            "-o",
            'jsonpath={range .items[*]}{.metadata.finalizers}{"\\n"}{end}',
        ).stdout.count("kopf.zalando.org")
    print(f"{'handler':<8} {'RSS MiB':>8} {'MiB per 1k Tasks':>17} {'all seen after s':>17}")
    for mode, figures in results.items():
        print(
            f"{mode:<8} {figures['rss_mib']:>8.1f} {figures['rss_mib_per_1k_tasks']:>17.2f} "
            f"{figures['seen_s']:>17.1f}"
        )
    print(f"Tasks left with kopf's finalizer by the timer run: {finalized} of {args.tasks}")
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "event_rss_mib_per_1k_tasks": round(results["event"]["rss_mib_per_1k_tasks"], 2),
                "timer_rss_mib_per_1k_tasks": round(results["timer"]["rss_mib_per_1k_tasks"], 2),
                "timer_finalizers": finalized,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
