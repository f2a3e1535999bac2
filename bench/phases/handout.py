"""Phase 3: N Tasks created in bulk; runner pods per second, on the Job controller's clock.

The load generator holds the runners' acknowledgements until the N-th pod is out (or 80% of
the ack timeout passed for a pod), so that both controllers are timed doing the same thing:
making pods. Then it acknowledges them all and heartbeats every interval ("acknowledge")."""

from __future__ import annotations

import json
import time

from bench.context import NAMESPACE, REQUESTS_PER_HANDOUT, BenchRun, log
from bench.loadgen import create_all, task_manifest, wait_for
from bench.phases.request_notes import note_operator_requests


async def run(bench: BenchRun) -> None:
    s, gen, operator, found = bench.settings, bench.gen, bench.operator, bench.found
    bench.enter("hand-out")
    for i in range(s.tasks):
        gen.add_runner(f"t-{i:06d}")
    gen.handout_target = s.tasks
    gen.hold_acks = True
    log(f"hand-out: creating {s.tasks} Tasks in {NAMESPACE}")
    if bench.profiler.enabled:
        log("profiling the hand-out")
        bench.profiler.start("hand-out", operator.pid)
    operator_before = await operator.metrics() or {}
    before = bench.cpu()
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
        bench.api,
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
        check=operator.check,
    )
    bench.record_cpu("hand-out", bench.cpu().minus(before))
    bench.profiler.finish()
    note_operator_requests(found.notes, "hand-out", operator_before, await operator.metrics() or {})
    assert gen.handout_last_seen is not None
    elapsed = gen.handout_last_seen - bulk.started
    found.figures["handout_per_s"] = s.tasks / elapsed
    found.notes["tasks_create_s"] = bulk.finished - bulk.started
    found.notes["handout_all_pods_s"] = elapsed
    found.notes["acks_during_handout"] = gen.counters.acks_during_handout
    log(
        f"hand-out: {s.tasks} pods in {elapsed:.1f}s ({s.tasks / elapsed:.1f}/s); "
        f"{gen.counters.acks_during_handout} acks had to go before the last pod"
    )
    gen.release_acks()
    bench.enter("acknowledge")
    started = time.monotonic()
    try:
        await wait_for(
            f"{s.tasks} Tasks Running",
            lambda: operator.running_at_least(s.tasks),
            within=max(300.0, s.tasks * 2 / s.qps * 6),
            interval=1.0,
            check=operator.check,
        )
    except TimeoutError:
        running = await operator.running()
        found.notes["all_running_after_s"] = f"only {running:.0f} after the wait"
        log(f"WARNING: only {running:.0f} of {s.tasks} Tasks Running; measuring anyway")
        return
    found.notes["all_running_after_s"] = time.monotonic() - started
    log(f"all {s.tasks} Tasks Running {time.monotonic() - started:.1f}s after the acks")
