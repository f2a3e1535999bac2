"""Phase 7: SIGKILL and restart of the operator with heartbeats flowing; seconds until its
metrics count all N Tasks again, then one full timeout of watching for reassignments (a
lease the restarted operator wrongly lets expire does so within it)."""

from __future__ import annotations

import asyncio
import time

from bench.context import MIB, BenchRun, log
from bench.loadgen import wait_for
from bench.procstat import rss_bytes


async def run(bench: BenchRun) -> None:
    s, operator, found = bench.settings, bench.operator, bench.found
    bench.enter("restart")
    await asyncio.sleep(s.heartbeat_s)
    log("restart: SIGKILL and restart of the operator")
    operator.kill()
    started = time.monotonic()
    operator.start()
    up = await wait_for(
        "the restarted operator's metrics",
        lambda: operator.tracks(lambda n: True),
        within=120,
        interval=0.05,
        check=operator.check,
    )
    done = await operator.wait_tracking(s.tasks, interval=0.05)
    found.figures["restart_resume_s"] = done - started
    found.notes["restart_metrics_up_s"] = up - started
    log(f"restart: tracking all {s.tasks} Tasks {done - started:.2f}s after the restart")
    listed = await operator.wait_listed(s.tasks, interval=0.05)
    found.notes["restart_all_listed_s"] = listed - started
    bench.enter("after restart")
    before = bench.cpu()
    rss_samples = []
    # Every lease gets a full window from its first sighting after the restart, so a lease
    # the restarted operator wrongly lets expire does so within this time.
    watch_for = s.timeout_s + s.heartbeat_s + 10.0
    log(f"restart: watching {watch_for:.0f}s for reassignments")
    deadline = time.monotonic() + watch_for
    while time.monotonic() < deadline:
        operator.check()
        await asyncio.sleep(min(5.0, max(deadline - time.monotonic(), 0.01)))
        rss_samples.append(rss_bytes(operator.pid))
    bench.record_cpu("after restart", bench.cpu().minus(before))
    found.notes["rss_after_restart_mib"] = min(rss_samples) / MIB if rss_samples else None
    if bench.profiler.enabled:
        log("profiling one more restart")
        operator.kill()
        operator.start()
        bench.profiler.start("restart", operator.pid)
        await operator.wait_tracking(s.tasks, interval=0.05)
        await asyncio.sleep(1.0)
        bench.profiler.finish()
