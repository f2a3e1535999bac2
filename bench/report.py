"""The benchmark's figures: percentiles, the goals, the table and the closing JSON line.

Pure functions only (no I/O), so they are unit-tested (tests/unit/test_bench_report.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tasklease.controlplane import scrape

# The closing JSON line carries exactly these keys, in this order.
RESULT_KEYS: Final = (
    "tasks",
    "operator_cpu_ms_per_1k_heartbeats",
    "apiserver_cpu_ms_per_1k_heartbeats",
    "cpu_ratio",
    "headroom_ratio",
    "rss_mib_per_1k_tasks",
    "detection_p50_s",
    "detection_p99_s",
    "false_reassignments",
    "handout_per_s",
    "job_controller_pods_per_s",
    "handout_ratio",
    "restart_resume_s",
    "restart_false_reassignments",
    "apiserver_cpu_ms_per_heartbeat",
    "apiserver_cpu_ms_per_lease_renewal",
    "heartbeat_cost_vs_lease",
    "apiserver_cpu_ms_per_heartbeat_small",
    "heartbeat_cost_vs_lease_small",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default method); None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    weight = rank - low
    return float(ordered[low] * (1.0 - weight) + ordered[high] * weight)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def per_thousand(amount: float | None, count: float) -> float | None:
    """amount per 1,000 of count (e.g. CPU-ms per 1,000 heartbeats)."""
    if amount is None or count <= 0:
        return None
    return amount / count * 1000.0


@dataclass(frozen=True, slots=True)
class Goal:
    key: str
    text: str
    met: Callable[[float], bool]
    note: str = ""


GOALS: Final[tuple[Goal, ...]] = (
    Goal("cpu_ratio", "<= 0.25", lambda v: v <= 0.25),
    Goal("headroom_ratio", ">= 0.9", lambda v: v >= 0.9),
    Goal("rss_mib_per_1k_tasks", "<= 5", lambda v: v <= 5.0),
    Goal("detection_p99_s", "<= 1.0", lambda v: v <= 1.0),
    Goal("false_reassignments", "== 0", lambda v: v == 0),
    Goal("handout_ratio", ">= 1.0", lambda v: v >= 1.0),
    Goal("restart_resume_s", "<= 10", lambda v: v <= 10.0, note="goal at 10,000 and 50,000 Tasks"),
    Goal("restart_false_reassignments", "== 0", lambda v: v == 0),
    Goal(
        "heartbeat_cost_vs_lease",
        "<= 1.5",
        lambda v: v <= 1.5,
        note="Task of realistic size; API server + etcd CPU",
    ),
)
GOALS_BY_KEY: Final = {goal.key: goal for goal in GOALS}


def verdict(key: str, value: Any) -> str:
    """'met', 'MISSED', 'n/a' (no value) or '' (no goal for this figure)."""
    goal = GOALS_BY_KEY.get(key)
    if goal is None:
        return ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "met" if goal.met(float(value)) else "MISSED"


def round_figure(value: Any) -> Any:
    """Figures rounded for humans and JSON: 3 significant decimals, ints stay ints."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        if value == 0.0:
            return 0.0
        digits = max(3 - math.floor(math.log10(abs(value))) - 1, 0)
        return round(value, digits)
    return value


def result_json(figures: Mapping[str, Any]) -> str:
    """The closing line: one JSON object with exactly RESULT_KEYS (missing ones: null)."""
    unknown = set(figures) - set(RESULT_KEYS)
    if unknown:
        raise ValueError(f"figures not in RESULT_KEYS: {sorted(unknown)}")
    return json.dumps({key: round_figure(figures.get(key)) for key in RESULT_KEYS})


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{round_figure(value):g}"
    return str(value)


def format_table(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None = None) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    table = [list(header)] if header is not None else []
    table += [list(row) for row in rows]
    if not table:
        return ""
    columns = max(len(row) for row in table)
    for row in table:
        row += [""] * (columns - len(row))
    widths = [max(len(row[i]) for row in table) for i in range(columns)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in table
    ]
    lines = [line.rstrip() for line in lines]
    if header is not None:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def figures_table(figures: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The RESULT_KEYS figures with their goals and verdicts."""
    rows = []
    for key in RESULT_KEYS:
        goal = GOALS_BY_KEY.get(key)
        label = (labels or {}).get(key, key)
        rows.append(
            [
                label,
                format_value(figures.get(key)),
                goal.text if goal else "",
                verdict(key, figures.get(key)),
                goal.note if goal else "",
            ]
        )
    return format_table(rows, header=["figure", "value", "goal", "verdict", ""])


def missed_goals(figures: Mapping[str, Any]) -> list[str]:
    return [goal.key for goal in GOALS if verdict(goal.key, figures.get(goal.key)) == "MISSED"]


def parse_prometheus(text: str, *, families: Collection[str] = ()) -> dict[str, float]:
    """`name{labels}` -> value for each sample of a Prometheus text exposition (of
    `families` only, when given), the labels in the order
    `tasklease.controlplane.scrape.sample_key` puts them."""
    return scrape.parse(text, families=families)


def metric_sum(samples: Mapping[str, float], name: str) -> float:
    """The sum over all label sets of metric `name`."""
    return scrape.total(samples, name)


APISERVER_REQUESTS = "apiserver_request_duration_seconds"
# The operator's own view of the same requests (tasklease.operator.metrics): its wait for an
# answer, beside the API server's time to give it.
OPERATOR_REQUESTS = "tasklease_api_request_duration_seconds"


def request_latency_by_kind(
    before: Mapping[str, float], after: Mapping[str, float], *, metric: str = APISERVER_REQUESTS
) -> dict[str, dict[str, float]]:
    """The requests of histogram `metric` between two scrapes, by verb and resource ("POST
    pods", "PATCH tasks/status", "PATCH tasks 409" for a status code other than 2xx where the
    metric has one): how many and their mean latency, busiest first. Watches are left out:
    their "latency" is how long they stayed open."""
    totals: dict[str, list[float]] = {}
    for part, index in (("_count", 0), ("_sum", 1)):
        prefix = f"{metric}{part}{{"
        for key, value in after.items():
            if not key.startswith(prefix):
                continue
            _, labels = scrape.split_key(key)
            if labels.get("verb") in ("WATCH", "CONNECT"):
                continue
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            kind = f"{labels.get('verb', '?')} {resource}"
            if not labels.get("code", "2").startswith("2"):
                kind += f" {labels['code']}"
            totals.setdefault(kind, [0.0, 0.0])[index] += value - before.get(key, 0.0)
    found = {
        kind: {"count": count, "mean_ms": round(total / count * 1000, 1)}
        for kind, (count, total) in totals.items()
        if count > 0
    }
    return dict(sorted(found.items(), key=lambda item: -item[1]["count"]))
