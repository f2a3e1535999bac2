"""Phase 5: how much the operator takes from the API server's capacity. The generator pushes
fenced reports as fast as it can with a fixed number in flight, with the operator killed
("alone", restarted afterwards) and running ("with"), alternately; `headroom_ratio` is the
rate with over the rate alone. A watch-lag probe measures throughout how late Task changes
reach watchers (bench/run.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from bench.context import APISERVER, BenchRun, log
from bench.phases.steady import SteadyCost
from bench.procstat import MACHINE, CpuDelta
from bench.report import per_thousand, ratio

# CPU (cores) other processes on the machine may use during a headroom round that counts.
QUIET_OTHERS_CORES: Final = 0.15


@dataclass(frozen=True)
class Push:
    rate: float  # reports stored per second
    delta: CpuDelta
    ended_at: float  # monotonic: its last report
    listed_at: float | None  # monotonic: the restarted operator had listed (pushes alone)


async def run(bench: BenchRun, cost: SteadyCost) -> float:
    """Returns (monotonic) when the last push ended or the operator last finished listing,
    whichever is later: the API server and the operator are busy until some time after."""
    s, found = bench.settings, bench.found
    bench.enter("headroom")
    alone: list[float] = []
    attached: list[float] = []
    quiet: list[bool] = []  # both halves of the round had the machine to themselves
    # Reports stored per CPU-second of kube-apiserver + etcd: what one report costs the API
    # server, whatever share of the machine it got.
    efficiency: dict[str, list[float]] = {"alone": [], "with": []}
    # One push left out, with the operator attached: the first push after the steady window
    # meets an API server still working off what the heartbeats queued
    # (docs/results/2026-12-04-decoded-bodies-and-event-path.md).
    warmup = await _push(bench, cost, alone=False)
    busy_until = max(warmup.ended_at, warmup.listed_at or 0.0)
    bench.record_cpu("push warm-up (left out)", warmup.delta)
    found.notes["headroom_warmup_per_s"] = round(warmup.rate)
    for round_ in range(s.push_rounds):
        others: list[float] = []
        # With the operator first in odd rounds, alone first in even ones (ABBA): the API
        # server's rate drifts over a run, and always pushing "with" second would charge that
        # drift to the operator. An even number of rounds ends with the operator attached,
        # so detection follows a push, not the restart that ends an "alone" push.
        for alone_now in (False, True) if round_ % 2 == 0 else (True, False):
            push = await _push(bench, cost, alone=alone_now)
            busy_until = max(busy_until, push.ended_at, push.listed_at or 0.0)
            label = f"push {'alone' if alone_now else 'with operator'} #{round_ + 1}"
            (alone if alone_now else attached).append(push.rate)
            efficiency["alone" if alone_now else "with"].append(
                push.rate * push.delta.seconds / push.delta.total(APISERVER)
            )
            bench.record_cpu(label, push.delta)
            others.append(found.cpu[label].get("others", 0.0))
            if round_ == 0 and not alone_now:
                found.notes["operator_cpu_ms_per_1k_reports_at_push"] = per_thousand(
                    push.delta.cpu_s["operator"] * 1000, push.rate * s.push_s
                )
        quiet.append(max(others) <= QUIET_OTHERS_CORES)
    # On a shared machine another process's burst during one half of a round decides the
    # ratio; rounds where anything else used more than QUIET_OTHERS_CORES are left out (all
    # rounds count when none was quiet, and the table says so).
    rounds = [i for i, ok in enumerate(quiet) if ok] or list(range(len(quiet)))
    found.notes["headroom_rounds_used"] = (
        [i + 1 for i in rounds] if any(quiet) else "all (no quiet round: noisy)"
    )
    mean_alone = sum(alone[i] for i in rounds) / len(rounds)
    mean_attached = sum(attached[i] for i in rounds) / len(rounds)
    found.notes["headroom_alone_per_s"] = [round(r) for r in alone]
    found.notes["headroom_with_operator_per_s"] = [round(r) for r in attached]
    found.notes["reports_per_apiserver_cpu_s_alone"] = [round(e) for e in efficiency["alone"]]
    found.notes["reports_per_apiserver_cpu_s_with"] = [round(e) for e in efficiency["with"]]
    found.figures["headroom_ratio"] = ratio(mean_attached, mean_alone)
    if bench.profiler.enabled:
        log("profiling a push with the operator attached")
        bench.profiler.start("push", bench.operator.pid, seconds=s.push_s)
        await bench.gen.push(s.push_s, concurrency=s.push_concurrency)
        bench.profiler.finish()
        await _settle_operator(bench, cost)
    return busy_until


async def _push(bench: BenchRun, cost: SteadyCost, *, alone: bool) -> Push:
    s, operator = bench.settings, bench.operator
    listed_at = None
    if alone:
        # Killed, not stopped (SIGSTOP): a stopped process keeps its watch connections open,
        # and the API server stalls on the unread streams until it gives up on them, which
        # makes the "alone" figure lower and erratic. Killed, its watches are gone.
        operator.kill()
        await asyncio.sleep(0.5)
    # Every push starts from an API server that finished the last one: otherwise only the
    # pushes with the operator follow a push at once (a push alone follows the operator's
    # restart and listing), and the ratio measures that order
    # (docs/results/2026-11-29-older-bodies-and-one-deletion.md).
    settled = await _settle_apiserver(bench, cost, operator_running=not alone)
    before = bench.cpu()
    started = time.monotonic()
    stored = await bench.gen.push(s.push_s, concurrency=s.push_concurrency)
    ended_at = time.monotonic()
    elapsed = ended_at - started
    delta = bench.cpu().minus(before)
    if alone:
        operator.start()
        await operator.wait_tracking(s.tasks, interval=0.2)
        # Tracking every Task is not the end of its catch-up: at large N the listing of the
        # runner pods goes on into the next round and would be measured with it.
        listed_at = await operator.wait_listed(s.tasks, interval=0.2)
    caught_up = await _settle_operator(bench, cost)
    rate = stored / elapsed
    log(
        f"headroom {'alone' if alone else 'with the operator'}: {rate:.0f} reports/s "
        f"(apiserver+etcd {delta.cores('kube-apiserver') + delta.cores('etcd'):.2f} cores, "
        f"generator {delta.cores('generator'):.2f}, "
        f"operator {delta.cpu_s.get('operator', 0.0) / delta.seconds:.2f}, "
        f"machine {delta.cores(MACHINE):.2f}); "
        f"API server settled in {settled:.0f}s before it, operator in {caught_up:.0f}s after"
    )
    return Push(rate=rate, delta=delta, ended_at=ended_at, listed_at=listed_at)


async def _settle_operator(bench: BenchRun, cost: SteadyCost, *, within: float = 60.0) -> float:
    """Wait until the operator has caught up with what it missed (a restart's listing, a
    push's burst): its CPU over a 2 s window is back to what the heartbeats flowing then
    cost it in the steady window (x1.5, +0.05 cores). Returns the seconds it took."""
    per_report_s = cost.operator_s_per_report
    return await _settle(
        bench,
        "operator",
        lambda delta, rate: delta.cores("operator") <= 1.5 * per_report_s * rate + 0.05,
        within=within,
        operator_running=True,
    )


async def _settle_apiserver(
    bench: BenchRun, cost: SteadyCost, *, operator_running: bool, within: float = 60.0
) -> float:
    """Wait until kube-apiserver + etcd are back to what the steady heartbeats cost them
    (over 2 s: x1.2, +0.1 cores): a push leaves them work to finish (its watch events,
    etcd's compaction of its writes), and a push that starts before that is done is slower
    for it. Returns the seconds it took."""
    steady = 1.2 * cost.apiserver_cores + 0.1
    return await _settle(
        bench,
        "API server",
        lambda delta, _rate: delta.total(APISERVER) / delta.seconds <= steady,
        within=within,
        operator_running=operator_running,
    )


async def _settle(
    bench: BenchRun,
    what: str,
    quiet: Callable[[CpuDelta, float], bool],
    *,
    within: float,
    operator_running: bool,
) -> float:
    """Wait until `quiet(cpu over 2 s, reports acknowledged per second then)` holds; the
    seconds it took (at most `within`, and then a line says so)."""
    counters = bench.gen.counters
    started = time.monotonic()
    while time.monotonic() - started < within:
        if operator_running:
            bench.operator.check()
        before = bench.cpu()
        acked = counters.reports_acked
        await asyncio.sleep(2.0)
        delta = bench.cpu().minus(before)
        if quiet(delta, (counters.reports_acked - acked) / delta.seconds):
            return time.monotonic() - started
    log(f"{what} still busy after {within:.0f}s; going on")
    return time.monotonic() - started
