"""Phase 6: how soon a stopped runner's Task is handed out again. A random 5% of runners
stop; for each, from its deadline (its last report the API server acknowledged +
reportProgressTimeout) to the watch seeing the pod of the next epoch."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping

import aiohttp

from bench.context import BenchRun, log, wall
from bench.loadgen import wait_for
from bench.phases.request_notes import note_operator_requests, requests_text
from bench.report import (
    APISERVER_REQUESTS,
    format_value,
    parse_prometheus,
    percentile,
    request_latency_by_kind,
)
from tasklease.controlplane import scrape


async def run(bench: BenchRun, *, busy_until: float) -> None:
    """`busy_until` (monotonic): when the API server last had a push to work off or the
    operator a listing, as the headroom phase returns it."""
    s, gen, operator, found = bench.settings, bench.gen, bench.operator, bench.found
    bench.enter("detection")
    runners = gen.counted
    count = max(1, round(len(runners) * s.victims_percent / 100))
    # A restarted operator keeps a grace to report once more for a lease it first sees in a
    # listing (design.md, "Expiry on the operator's clock"), so a runner stopped before
    # reporting to the current operator process is detected up to one interval late by
    # design, and a report made while the operator was still listing is first seen when the
    # listing is delivered. After a push the saturated API server delivers its watch events
    # late, so a runner whose last report was a push's is seen late by every watcher. Either
    # would be charged to detection (docs/results/2026-11-29-older-bodies-and-one-deletion.md,
    # docs/results/2026-12-04-decoded-bodies-and-event-path.md): start once every runner has
    # made a steady report since the last (re)start's listing and the last push.
    settled_at = max(operator.started_at, busy_until)
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
    requests_before = await _apiserver_samples(bench)
    operator_before = await operator.metrics() or {}
    before = bench.cpu()
    events = gen.stop_heartbeats(victims)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(event.wait() for event in events.values())),
            timeout=s.timeout_s + s.heartbeat_s + max(60.0, count / s.qps * 10),
        )
    except TimeoutError:
        left = sum(1 for event in events.values() if not event.is_set())
        log(f"detection: {left} of {count} stopped runners were never replaced")
        found.notes["detection_not_replaced"] = left
    bench.record_cpu("detection", bench.cpu().minus(before))
    # Every request the API server answered meanwhile (the stopped runners' replacements,
    # their aftermath, the other runners' heartbeats): where a slow reassignment waited.
    requests_after = await _apiserver_samples(bench)
    # Without both scrapes the difference would be the whole run's requests.
    requests = (
        request_latency_by_kind(requests_before, requests_after)
        if requests_before and requests_after
        else {}
    )
    notes = found.notes
    notes["apiserver_requests_in_detection"] = requests
    log("detection: API server requests meanwhile: " + requests_text(requests))
    delays = gen.detection_delays()
    figures = found.figures
    figures["detection_p50_s"] = percentile(delays, 50)
    figures["detection_p99_s"] = percentile(delays, 99)
    notes["detection_samples"] = len(delays)
    notes["detection_max_s"] = max(delays) if delays else None
    notes["detection_min_s"] = min(delays) if delays else None
    # Per victim, in wall-clock time, to read beside the operator's log.
    notes["detection_by_task"] = {
        r.task: {
            "deadline": wall(r.deadline),
            "pod_seen": wall(r.seen),
            "delay_s": round(r.seen - r.deadline, 3),
        }
        for r in gen.reassignments
        if r.victim and r.deadline is not None
    }
    # The operator's own account of the same reassignments, from its deadline (its last
    # sighting of a report + the timeout): the decision (its timer and queue), then the API
    # server's answers as the operator waited for them, and any client-side budget.
    operator_samples = await operator.metrics() or {}
    phase = {k: v - operator_before.get(k, 0.0) for k, v in operator_samples.items()}
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
    note_operator_requests(notes, "detection", operator_before, operator_samples)
    log(
        f"detection: {len(delays)} samples, p50 {format_value(figures['detection_p50_s'])}s, "
        f"p99 {format_value(figures['detection_p99_s'])}s"
    )
    try:
        await wait_for(
            "the replacements to run",
            lambda: operator.running_at_least(s.tasks),
            within=max(120.0, s.ack_timeout_s * 2),
            interval=1.0,
            check=operator.check,
        )
    except TimeoutError:
        log(f"WARNING: only {await operator.running():.0f} of {s.tasks} Tasks Running; going on")


async def _apiserver_samples(bench: BenchRun) -> dict[str, float]:
    """The API server's own /metrics (as the admin); empty when it does not answer in time:
    a saturated API server may not, and the run must not die of it."""
    try:
        status, data = await bench.api.call("GET", "/metrics")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log(f"the API server's /metrics did not answer ({exc!r}); its figures are left out")
        return {}
    if status != 200:
        return {}
    return parse_prometheus(data.decode(), families=(APISERVER_REQUESTS,))


def histogram_quantile_bound(samples: Mapping[str, float], name: str, q: float) -> float | None:
    """The upper bound of the Prometheus histogram bucket holding quantile q."""
    buckets = []
    for key, value in samples.items():
        if key.startswith(f"{name}_bucket{{"):
            label = scrape.split_key(key)[1]["le"]
            buckets.append((math.inf if label == "+Inf" else float(label), value))
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= q * total:
            return bound
    return None
