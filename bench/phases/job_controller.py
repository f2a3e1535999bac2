"""Phase 1, the yardstick for the hand-out: N batch/v1 Jobs (parallelism 1) created in bulk;
pods per second from the first create to the N-th pod a watch sees, the clock the hand-out
is timed on too."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bench.context import JOBS_NAMESPACE, BenchRun, log
from bench.loadgen import create_all, job_manifest


async def run(bench: BenchRun, watches: list[asyncio.Task[None]]) -> None:
    """`watches` gets the watch of the Jobs' pods, for the orchestrator to end."""
    s = bench.settings
    api = bench.api
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

    watches.append(
        await api.start_watch(
            f"/api/v1/namespaces/{JOBS_NAMESPACE}/pods",
            label_selector="batch.kubernetes.io/job-name",
            on_event=on_pod,
        )
    )
    before = bench.cpu()
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
            f"(kube-controller-manager log: {bench.plane.log_path('kube-controller-manager')})"
        ) from None
    bench.record_cpu("job controller", bench.cpu().minus(before))
    elapsed = last[0] - bulk.started
    bench.found.figures["job_controller_pods_per_s"] = s.tasks / elapsed
    bench.found.notes["jobs_create_s"] = bulk.finished - bulk.started
    bench.found.notes["jobs_all_pods_s"] = elapsed
    log(f"Job controller: {s.tasks} pods in {elapsed:.1f}s ({s.tasks / elapsed:.1f}/s)")
