"""Phase 2: the operator starts and takes one Task through hand-out, acknowledgement and
heartbeats; the Task is then deleted. Its RSS afterwards is the baseline "with none", with
lazily loaded code and first-use caches in it, so that RSS per Task counts only the Tasks."""

from __future__ import annotations

import asyncio
import json

from bench.context import MIB, NAMESPACE, BenchRun, log
from bench.loadgen import task_manifest, wait_for
from bench.procstat import rss_by_kind_mib, rss_bytes


async def run(bench: BenchRun) -> float:
    """Returns the operator's RSS with no Tasks, in MiB."""
    operator, gen, api = bench.operator, bench.gen, bench.api
    log("starting the operator")
    operator.start()
    await wait_for(
        "the operator's metrics endpoint",
        lambda: operator.tracks(lambda n: n == 0),
        within=60,
        check=operator.check,
    )
    bench.enter("warm-up")
    gen.add_runner("warmup", counted=False)
    manifest = task_manifest(
        "warmup",
        heartbeat_s=1,
        timeout_s=bench.settings.timeout_s,
        ack_timeout_s=bench.settings.ack_timeout_s,
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
        lambda: operator.running_at_least(1),
        within=60,
        check=operator.check,
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
        lambda: operator.tracks(lambda n: n == 0),
        within=60,
        check=operator.check,
    )
    await asyncio.sleep(3)
    samples = []
    for _ in range(5):
        samples.append(rss_bytes(operator.pid))
        await asyncio.sleep(0.2)
    rss_none_mib = min(samples) / MIB
    bench.found.notes["rss_none_mib"] = rss_none_mib
    bench.found.notes["rss_none_by_kind_mib"] = rss_by_kind_mib(operator.pid)
    log(f"operator up, RSS with no Tasks: {rss_none_mib:.1f} MiB")
    return rss_none_mib
