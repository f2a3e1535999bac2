"""What `kubectl tasklease` prints, as pure functions of a Task (a dict as the API server
returns it) and the API server's time: tables, progress bars, ages, the watch line.

Tasks are read as dicts, not through the models: a Task the models refuse (one with an
`Invalid` condition) must still be shown, and a field missing from an old Task reads as
absent instead of failing the whole listing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from tasklease.api.models import EPOCH_ANNOTATION, HOLDER_ANNOTATION, Phase
from tasklease.api.times import parse_rfc3339

NONE = "<none>"  # what kubectl prints for an absent value
BAR_WIDTH = 10
# The operator's condition saying a Task is final (`tasklease.lease.core.CONDITION_COMPLETE`;
# the plugin stays off the lease core, a unit test holds the two equal).
CONDITION_COMPLETE = "Complete"
GET_COLUMNS = ("NAME", "PHASE", "ATTEMPT", "HOLDER", "PROGRESS", "LAST REPORT", "AGE")


def progress_bar(percent: float | None, *, width: int = BAR_WIDTH) -> str:
    """`[#####.....] 50%`. Rounded down, so 99.9 % never shows as done."""
    if percent is None or math.isnan(percent):
        return NONE
    clamped = min(100.0, max(0.0, percent))
    filled = math.floor(clamped * width / 100)
    return f"[{'#' * filled}{'.' * (width - filled)}] {math.floor(clamped)}%"


def human_duration(elapsed: timedelta) -> str:
    """kubectl's AGE format (apimachinery's `duration.HumanDuration`): '45s', '3m20s', '5h',
    '3d4h', so the plugin's ages read like the rest of kubectl's."""
    seconds = math.floor(elapsed.total_seconds())
    # Up to a second in the future is a clock's rounding (Date headers are whole seconds).
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        rest = seconds % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 3 * 60:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 8 * 24:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    days = hours // 24
    if hours < 2 * 365 * 24:
        return f"{days}d"
    if hours < 8 * 365 * 24:
        rest = days % 365
        return f"{days // 365}y{rest}d" if rest else f"{days // 365}y"
    return f"{days // 365}y"


def age(stamp: str | None, now: datetime) -> str:
    """How long ago an RFC 3339 stamp was, by `now` (the API server's clock)."""
    moment = parse_time(stamp)
    return NONE if moment is None else human_duration(now - moment)


def parse_time(stamp: Any) -> datetime | None:
    """An RFC 3339 stamp as the API writes it; None when absent or unreadable."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        return parse_rfc3339(stamp)
    except ValueError:
        return None


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as `kubectl get` aligns them (Go's tabwriter: cells of at least 6
    characters, 3 spaces between columns, the last column unpadded)."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(6, max(len(line[i]) for line in lines) + 3) for i in range(len(header) - 1)]
    return "\n".join(
        (
            "".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + line[-1]
        ).rstrip()
        for line in lines
    )


# --- reading a Task -----------------------------------------------------------------------


def status_of(task: Mapping[str, Any]) -> dict[str, Any]:
    status = task.get("status")
    return status if isinstance(status, dict) else {}


def metadata_of(task: Mapping[str, Any]) -> dict[str, Any]:
    metadata = task.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def phase_of(task: Mapping[str, Any]) -> str:
    return str(status_of(task).get("phase") or Phase.PENDING)


def is_final(task: Mapping[str, Any]) -> bool:
    try:
        return Phase(phase_of(task)).is_final
    except ValueError:
        return False


def holder_of(task: Mapping[str, Any]) -> str | None:
    """The lease holder: the annotation is the truth, the status follows it (just after a
    hand-out the status may still name nobody). A final Task has none: the write that ends
    it clears the status's holder, and the annotation goes in the operator's next write."""
    if is_final(task):
        return str(status_of(task).get("holder") or "") or None
    annotations = metadata_of(task).get("annotations") or {}
    holder = annotations.get(HOLDER_ANNOTATION) or status_of(task).get("holder")
    return str(holder) if holder else None


def epoch_of(task: Mapping[str, Any]) -> str:
    """The lease epoch, from the annotation first (as the holder)."""
    annotations = metadata_of(task).get("annotations") or {}
    return str(annotations.get(EPOCH_ANNOTATION) or status_of(task).get("epoch") or 0)


def attempt_of(task: Mapping[str, Any]) -> str:
    """'2/3': attempts started of `spec.retry.maxAttempts`."""
    attempt = status_of(task).get("attempt") or 0
    retry = (task.get("spec") or {}).get("retry") or {}
    most = retry.get("maxAttempts")
    return f"{attempt}/{most}" if most else str(attempt)


def percent_of(task: Mapping[str, Any]) -> float | None:
    progress = status_of(task).get("progress") or {}
    percent = progress.get("percent")
    return float(percent) if isinstance(percent, int | float) else None


def last_report_of(task: Mapping[str, Any]) -> str | None:
    progress = status_of(task).get("progress") or {}
    stamp = progress.get("reportTime")
    return str(stamp) if stamp else None


def condition_of(task: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in status_of(task).get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == type_:
            return condition
    return None


# --- get ----------------------------------------------------------------------------------


def task_row(task: Mapping[str, Any], now: datetime) -> list[str]:
    """One `get` row: NAME PHASE ATTEMPT HOLDER PROGRESS LAST REPORT AGE."""
    metadata = metadata_of(task)
    return [
        str(metadata.get("name", "")),
        phase_of(task),
        attempt_of(task),
        holder_of(task) or NONE,
        progress_bar(percent_of(task)),
        age(last_report_of(task), now),
        age(metadata.get("creationTimestamp"), now),
    ]


def tasks_table(tasks: Sequence[Mapping[str, Any]], now: datetime, *, namespaced: bool) -> str:
    """The `get` table; with the NAMESPACE column first when listing every namespace."""
    header = list(GET_COLUMNS)
    rows = [task_row(task, now) for task in tasks]
    if namespaced:
        header.insert(0, "NAMESPACE")
        for task, row in zip(tasks, rows, strict=True):
            row.insert(0, str(metadata_of(task).get("namespace", "")))
    return table(header, rows)


def status_line(task: Mapping[str, Any], now: datetime) -> str:
    """`watch`'s one line: phase, attempt, holder, progress, report age, and what is going
    on (the runner's message while active, the Complete condition's once final)."""
    parts = [
        str(metadata_of(task).get("name", "")),
        phase_of(task),
        f"attempt {attempt_of(task)}",
        f"holder {holder_of(task) or NONE}",
        progress_bar(percent_of(task)),
        f"last report {age(last_report_of(task), now)}",
    ]
    if is_final(task):
        message = (condition_of(task, CONDITION_COMPLETE) or {}).get("message")
    else:
        message = (status_of(task).get("progress") or {}).get("message")
    if message:
        parts.append(str(message))
    return "  ".join(parts)
