"""A phase's requests as the operator and the API server counted them (for hand-out and
detection): whether the phase was paced by the client-side budget (QPS) or by the answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.context import log
from bench.report import OPERATOR_REQUESTS, request_latency_by_kind


def requests_text(requests: Mapping[str, Mapping[str, float]]) -> str:
    """'PATCH tasks 4 x 100.0ms, POST pods 4 x 50.0ms' (from request_latency_by_kind)."""
    return ", ".join(f"{k} {v['count']:.0f} x {v['mean_ms']}ms" for k, v in requests.items())


def note_operator_requests(
    notes: dict[str, Any], phase: str, before: Mapping[str, float], after: Mapping[str, float]
) -> None:
    """The operator's requests between two scrapes of its metrics, by kind and answer, and
    its waits for its client-side budgets: whether the phase was paced by the budget (QPS)
    or by the answers (the API server, and how many requests the workers keep in flight)."""
    key = phase.replace("-", "")
    requests = request_latency_by_kind(before, after, metric=OPERATOR_REQUESTS)
    notes[f"operator_requests_in_{key}"] = requests
    waits = {}
    for budget in ("requests", "events"):
        waited = [
            after.get(f'tasklease_api_throttle_seconds_{part}{{budget="{budget}"}}', 0.0)
            - before.get(f'tasklease_api_throttle_seconds_{part}{{budget="{budget}"}}', 0.0)
            for part in ("count", "sum")
        ]
        waits[budget] = {"requests": waited[0], "seconds": round(waited[1], 1)}
    notes[f"operator_throttled_in_{key}"] = waits
    log(
        f"{phase}: the operator's requests: "
        + requests_text(requests)
        + "; waits for the client-side budget: "
        + ", ".join(
            f"{budget} {w['requests']:.0f} requests, {w['seconds']}s in all"
            for budget, w in waits.items()
        )
    )
