"""Phase 4: a window of steady heartbeats; CPU-seconds of the operator, kube-apiserver and
etcd over the same heartbeats, and the operator's RSS at N."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from bench.context import APISERVER, MIB, BenchRun, log
from bench.procstat import rss_by_kind_mib, rss_bytes
from bench.report import metric_sum, per_thousand, percentile, ratio

# The operator's tasklease_report_age_seconds buckets (tasklease.operator.metrics).
REPORT_AGE_BOUNDS: Final = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0)


@dataclass(frozen=True)
class SteadyCost:
    """What the steady heartbeats cost: the level the headroom phase waits for the operator
    and the API server to come back to after a push or a restart."""

    operator_s_per_report: float
    apiserver_cores: float


async def run(bench: BenchRun, *, rss_none_mib: float) -> SteadyCost:
    s, gen, operator = bench.settings, bench.gen, bench.operator
    bench.enter("steady")
    # Let the acknowledgement burst pass and the heartbeats spread over the interval.
    await asyncio.sleep(s.heartbeat_s * 1.5)
    log(f"steady: measuring {s.window_s:.0f}s of heartbeats")
    gen.counters.lag_s.clear()
    gen.recording_lag = True
    acked_before = gen.counters.reports_acked
    before = bench.cpu()
    await asyncio.sleep(s.window_s)
    delta = bench.cpu().minus(before)
    heartbeats = gen.counters.reports_acked - acked_before
    gen.recording_lag = False
    bench.record_cpu("steady", delta)
    rss = rss_bytes(operator.pid)
    operator_ms = per_thousand(delta.cpu_s["operator"] * 1000, heartbeats)
    apiserver_ms = per_thousand(delta.total(APISERVER) * 1000, heartbeats)
    figures = bench.found.figures
    figures["operator_cpu_ms_per_1k_heartbeats"] = operator_ms
    figures["apiserver_cpu_ms_per_1k_heartbeats"] = apiserver_ms
    figures["cpu_ratio"] = ratio(operator_ms, apiserver_ms)
    figures["rss_mib_per_1k_tasks"] = (rss / MIB - rss_none_mib) / s.tasks * 1000
    cost = SteadyCost(
        operator_s_per_report=delta.cpu_s["operator"] / max(heartbeats, 1),
        apiserver_cores=delta.total(APISERVER) / delta.seconds,
    )
    notes = bench.found.notes
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
    notes["rss_at_n_by_kind_mib"] = rss_by_kind_mib(operator.pid)
    samples = await operator.metrics() or {}
    # Events the hand-out and acknowledgement bursts brought past the operator's queue.
    notes["operator_events_dropped"] = metric_sum(samples, "tasklease_events_dropped_total")
    # Leases whose last report the operator saw more than ~2 intervals ago: it is behind on
    # its watch.
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
    if bench.profiler.enabled:
        log(f"profiling the steady state for {s.window_s:.0f}s")
        bench.profiler.start("steady", operator.pid, seconds=s.window_s)
        await asyncio.sleep(s.window_s + 1)
        bench.profiler.finish()
    return cost
