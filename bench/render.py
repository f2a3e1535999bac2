"""The table `make bench` prints (stdout, before the closing JSON line): the settings, CPU by
phase, the watch delay, the notes, and the figures against their goals, as
docs/performance.md shows it."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Final

from bench.context import Findings, Settings
from bench.report import figures_table, format_table, format_value, missed_goals

# Long notes that go to details.json only.
UNPRINTED_NOTES: Final = frozenset({"phase_started", "false_reassignment_examples"})

LABELS: Final = {
    "tasks": "active Tasks (N)",
    "operator_cpu_ms_per_1k_heartbeats": "operator CPU-ms / 1k heartbeats",
    "apiserver_cpu_ms_per_1k_heartbeats": "apiserver+etcd CPU-ms / 1k heartbeats",
    "cpu_ratio": "cpu_ratio (operator / apiserver)",
    "headroom_ratio": "headroom_ratio (with / alone)",
    "rss_mib_per_1k_tasks": "operator RSS MiB / 1k Tasks",
    "detection_p50_s": "detection p50 (s)",
    "detection_p99_s": "detection p99 (s)",
    "false_reassignments": "false reassignments",
    "handout_per_s": "hand-out, runner pods/s",
    "job_controller_pods_per_s": "Job controller, pods/s",
    "handout_ratio": "handout_ratio (operator / Jobs)",
    "restart_resume_s": "restart: all Tasks tracked (s)",
    "restart_false_reassignments": "restart: false reassignments",
    "apiserver_cpu_ms_per_heartbeat": "apiserver+etcd CPU-ms / Task heartbeat",
    "apiserver_cpu_ms_per_lease_renewal": "apiserver+etcd CPU-ms / Lease renewal",
    "heartbeat_cost_vs_lease": "heartbeat_cost_vs_lease (Task / Lease)",
    "apiserver_cpu_ms_per_heartbeat_small": "the same, small Task: CPU-ms / heartbeat",
    "heartbeat_cost_vs_lease_small": "the same, small Task: vs Lease",
}


def render(settings: Settings, found: Findings) -> str:
    parts = [
        "tasklease benchmark",
        format_table(
            [
                ["Tasks", str(settings.tasks)],
                [
                    "heartbeat / reportProgressTimeout / ackTimeout",
                    f"{settings.heartbeat_s:g}s / {settings.timeout_s:g}s / "
                    f"{settings.ack_timeout_s:g}s",
                ],
                ["client QPS / burst (operator and kcm)", f"{settings.qps:g} / {settings.burst}"],
                ["operator workers", str(settings.workers)],
                [
                    "push",
                    f"{settings.push_s:g}s x {settings.push_rounds} rounds each, "
                    f"{settings.push_concurrency} in flight",
                ],
                ["kube-apiserver extra flags", " ".join(settings.apiserver_args)],
                ["kube-controller-manager extra flags", " ".join(settings.kcm_args)],
                ["machine", f"{os.cpu_count()} CPUs, {platform.platform()}"],
            ]
        ),
        "",
        "CPU by phase (cores busy on average; others: the rest of this shared machine):",
        _cpu_table(found.cpu),
        "",
        "API server watch delay of a Task change (probe Task; s):",
        format_table(
            [
                [
                    phase,
                    format_value(lag["p50"]),
                    format_value(lag["p99"]),
                    format_value(lag["max"]),
                    str(lag["samples"]),
                ]
                for phase, lag in found.watch_lag.items()
            ],
            header=["phase", "p50", "p99", "max", "samples"],
        ),
        "",
        "details:",
        format_table(
            [
                [key, format_value(value)]
                for key, value in found.notes.items()
                if key not in UNPRINTED_NOTES
            ]
        ),
        "",
        figures_table(found.figures, LABELS),
    ]
    missed = missed_goals(found.figures)
    if missed:
        parts += ["", f"goals missed: {', '.join(missed)}"]
    false = (found.figures.get("false_reassignments") or 0) + (
        found.figures.get("restart_false_reassignments") or 0
    )
    if false:
        parts += [
            "",
            "!" * 78,
            f"!!! FALSE REASSIGNMENTS: {false} Tasks whose runner never stopped lost their "
            f"lease (by phase: {found.notes.get('false_reassignments_by_phase')})",
            "!" * 78,
        ]
    return "\n".join(parts)


def _cpu_table(cpu: Mapping[str, Mapping[str, float]]) -> str:
    names = ["operator", "kube-apiserver", "etcd", "kube-controller-manager", "generator", "others"]
    rows = [
        [phase] + [f"{cores[n]:.2f}" if n in cores else "-" for n in names]
        for phase, cores in cpu.items()
    ]
    return format_table(rows, header=["phase", *names])
