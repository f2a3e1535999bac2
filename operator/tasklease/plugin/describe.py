"""`kubectl tasklease describe`: a Task in kubectl's describe layout, as a pure function of
the Task, its Events and the API server's time.

The attempt timeline is `status.attempts`, plus the attempt a reassignment ended that the
status has not recorded yet (the `previous-attempt` annotation written with the new lease),
so the history shown is never a step behind the lease.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    PREVIOUS_ATTEMPT_ANNOTATION,
    AttemptRecord,
)
from tasklease.api.times import rfc3339
from tasklease.plugin.render import (
    NONE,
    age,
    attempt_of,
    epoch_of,
    holder_of,
    human_duration,
    is_final,
    metadata_of,
    parse_time,
    phase_of,
    progress_bar,
    status_of,
    table,
)


def describe(task: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: datetime) -> str:
    metadata = metadata_of(task)
    spec = task.get("spec") or {}
    lines = _fields(
        [
            ("Name", str(metadata.get("name", ""))),
            ("Namespace", str(metadata.get("namespace", ""))),
            ("Labels", _pairs(metadata.get("labels"))),
            ("Created", _when(metadata.get("creationTimestamp"), now)),
            ("Generation", str(metadata.get("generation", NONE))),
        ]
    )
    lines += ["Spec:", *_fields(_spec_fields(spec), indent=2)]
    lines += ["Status:", *_fields(_status_fields(task, now), indent=2)]
    lines += ["Current Attempt:", f"  {current_attempt(task, now)}"]
    lines += ["Attempts:", *_indented(_attempts_table(task))]
    lines += ["Conditions:", *_indented(_conditions_table(task, now))]
    lines += ["Events:", *_indented(_events_table(events, now))]
    return "\n".join(lines)


def _fields(pairs: Sequence[tuple[str, str]], *, indent: int = 0) -> list[str]:
    width = max(len(label) for label, _ in pairs) + 2
    return [f"{' ' * indent}{(label + ':').ljust(width)}{value}" for label, value in pairs]


def _indented(text: str | None) -> list[str]:
    if text is None:
        return ["  <none>"]
    return ["  " + line if line else line for line in text.split("\n")]


def _pairs(mapping: Any) -> str:
    if not isinstance(mapping, dict) or not mapping:
        return NONE
    return ", ".join(f"{key}={value}" for key, value in sorted(mapping.items()))


def _when(stamp: Any, now: datetime) -> str:
    moment = parse_time(stamp)
    if moment is None:
        return NONE
    return f"{rfc3339(moment)} ({human_duration(now - moment)} ago)"


def _stamp(stamp: Any) -> str:
    moment = parse_time(stamp)
    return rfc3339(moment) if moment is not None else NONE


def _spec_fields(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    retry = spec.get("retry") or {}
    backoff = retry.get("backoff") or {}
    return [
        ("Runner", _runner(spec)),
        ("Parameters", _pairs(spec.get("parameters"))),
        ("Ack Timeout", str(spec.get("ackTimeout", NONE))),
        ("Report Progress Timeout", str(spec.get("reportProgressTimeout", NONE))),
        ("Heartbeat Interval", str(spec.get("heartbeatInterval", NONE))),
        (
            "Retry",
            f"at most {retry.get('maxAttempts', '?')} attempts; backoff "
            f"{backoff.get('initial', '?')} x{backoff.get('factor', '?')} up to "
            f"{backoff.get('max', '?')}, jitter {backoff.get('jitter', '?')}",
        ),
        ("Non-retryable Errors", ", ".join(retry.get("nonRetryableErrors") or []) or NONE),
        ("Attempt Timeout", str(spec.get("attemptTimeout") or NONE)),
        ("Active Deadline", str(spec.get("activeDeadline") or NONE)),
        ("Late After", str(spec.get("lateAfter") or NONE)),
        ("Cancel", str(bool(spec.get("cancel"))).lower()),
    ]


def _runner(spec: Mapping[str, Any]) -> str:
    """A pod per attempt (its first container: the one that runs the task) or a pool."""
    if spec.get("workerGroup"):
        priority = spec.get("priority", 0)
        return f"pool runners of worker group {spec['workerGroup']} (priority {priority})"
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    containers = pod_spec.get("containers") or [{}]
    first = containers[0] if isinstance(containers[0], dict) else {}
    command = [*(first.get("command") or []), *(first.get("args") or [])]
    shown = f" {json.dumps(command)}" if command else ""
    container, image = first.get("name", "?"), first.get("image", "?")
    return f"a pod per attempt: container {container}, image {image}{shown}"


def _status_fields(task: Mapping[str, Any], now: datetime) -> list[tuple[str, str]]:
    status = status_of(task)
    progress = status.get("progress") or {}
    fields: list[tuple[str, str]] = [
        ("Phase", phase_of(task)),
        ("Attempt", attempt_of(task)),
        ("Epoch", str(status.get("epoch", 0))),
        ("Holder", holder_of(task) or NONE),
    ]
    if progress:
        percent = progress.get("percent")
        shown = progress_bar(float(percent)) if isinstance(percent, int | float) else NONE
        message = f"  {progress['message']}" if progress.get("message") else ""
        fields += [
            ("Progress", f"{shown}{message} (epoch {progress.get('epoch', '?')})"),
            ("Last Report", _when(progress.get("reportTime"), now)),
        ]
        if progress.get("fields"):
            fields.append(("Progress Fields", _pairs(progress["fields"])))
        if progress.get("checkpoint") is not None:
            fields.append(("Checkpoint", json.dumps(progress["checkpoint"], sort_keys=True)))
    else:
        fields.append(("Progress", NONE))
    fields.append(("Result", _result(status.get("result"))))
    fields += [
        ("Start Time", _when(status.get("startTime"), now)),
        ("Completion Time", _when(status.get("completionTime"), now)),
    ]
    if status.get("nextAttemptTime"):
        fields.append(("Next Attempt Time", _stamp(status["nextAttemptTime"])))
    fields.append(("Observed Generation", str(status.get("observedGeneration", NONE))))
    return fields


def _result(result: Any) -> str:
    if not isinstance(result, dict) or not result:
        return NONE
    text = str(result.get("status", "?"))
    if result.get("errorId"):
        text += f" {result['errorId']}"
    if result.get("errorMessage"):
        text += f": {result['errorMessage']}"
    text += f" (epoch {result.get('epoch', '?')})"
    if result.get("errorStackTrace"):
        text += "; stack trace in -o yaml"
    return text


def current_attempt(task: Mapping[str, Any], now: datetime) -> str:
    """The attempt the lease stands for now, from the lease annotations (the truth: they can
    be a step ahead of the status right after a hand-out)."""
    status = status_of(task)
    annotations = metadata_of(task).get("annotations") or {}
    holder = holder_of(task)
    if is_final(task):
        return f"{NONE} (the task is {phase_of(task)})"
    if holder is None:
        if status.get("nextAttemptTime"):
            return f"{NONE} (backing off: next attempt at {_stamp(status['nextAttemptTime'])})"
        if (task.get("spec") or {}).get("workerGroup"):
            return f"{NONE} (waiting for a pool runner to claim it)"
        return f"{NONE} (waiting to be handed out)"
    epoch = epoch_of(task)
    progress = status.get("progress") or {}
    acknowledged = str(progress.get("epoch")) == epoch
    text = f"epoch {epoch}, holder {holder}"
    acquired = annotations.get(ACQUIRE_TIME_ANNOTATION)
    if acquired:
        text += f", since {_when(acquired, now)}"
    if acknowledged:
        text += f", acknowledged, last report {age(progress.get('reportTime'), now)} ago"
    else:
        text += ", not acknowledged yet"
    return text


def attempt_timeline(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`status.attempts`, plus the ended attempt the lease annotation carries when the
    status has not recorded it yet, in epoch order."""
    attempts = [a for a in status_of(task).get("attempts") or [] if isinstance(a, dict)]
    written = (metadata_of(task).get("annotations") or {}).get(PREVIOUS_ATTEMPT_ANNOTATION)
    if isinstance(written, str):
        try:
            previous = AttemptRecord.model_validate_json(written)
        except ValidationError:
            previous = None
        if previous is not None:
            # An attempt can be in both: the annotation's record of it is the ended one.
            attempts = [a for a in attempts if a.get("epoch") != previous.epoch]
            attempts.append(previous.model_dump(mode="json", by_alias=True, exclude_none=True))
    return sorted(attempts, key=lambda a: int(a.get("epoch") or 0))


def _attempts_table(task: Mapping[str, Any]) -> str | None:
    attempts = attempt_timeline(task)
    if not attempts:
        return None
    rows = [
        [
            str(a.get("attempt", "?")),
            str(a.get("epoch", "?")),
            str(a.get("holder", NONE)),
            _stamp(a.get("startTime")),
            _stamp(a.get("endTime")) if a.get("endTime") else "-",
            str(a.get("outcome") or "-"),
            str(a.get("message") or ""),
        ]
        for a in attempts
    ]
    header = ["ATTEMPT", "EPOCH", "HOLDER", "START", "END", "OUTCOME", "MESSAGE"]
    return table(header, rows)


def _conditions_table(task: Mapping[str, Any], now: datetime) -> str | None:
    conditions = [c for c in status_of(task).get("conditions") or [] if isinstance(c, dict)]
    if not conditions:
        return None
    rows = [
        [
            str(c.get("type", "")),
            str(c.get("status", "")),
            str(c.get("reason", "")),
            age(c.get("lastTransitionTime"), now),
            str(c.get("observedGeneration", NONE)),
            str(c.get("message", "")),
        ]
        for c in conditions
    ]
    header = ["TYPE", "STATUS", "REASON", "SINCE", "GENERATION", "MESSAGE"]
    return table(header, rows)


def _event_time(event: Mapping[str, Any], key: str) -> str | None:
    stamp = (
        event.get(key)
        or event.get("eventTime")
        or (event.get("metadata") or {}).get("creationTimestamp")
    )
    return str(stamp) if stamp else None


def _event_order(event: Mapping[str, Any], now: datetime) -> tuple[datetime, int]:
    """By last occurrence; within one second (Event times are whole seconds) in the order
    the API server stored them (resourceVersions of one resource compare as integers)."""
    version = str((event.get("metadata") or {}).get("resourceVersion") or "0")
    return (
        parse_time(_event_time(event, "lastTimestamp")) or now,
        int(version) if version.isdigit() else 0,
    )


def _events_table(events: Sequence[Mapping[str, Any]], now: datetime) -> str | None:
    """As kubectl describe lists them: oldest first, `5s (x3 over 2m)` for repeated ones."""
    if not events:
        return None
    ordered = sorted(events, key=lambda e: _event_order(e, now))
    rows = []
    for event in ordered:
        last = age(_event_time(event, "lastTimestamp"), now)
        count = int(event.get("count") or 1)
        if count > 1:
            last += f" (x{count} over {age(_event_time(event, 'firstTimestamp'), now)})"
        source = (event.get("source") or {}).get("component") or event.get("reportingComponent", "")
        rows.append(
            [
                str(event.get("type", "")),
                str(event.get("reason", "")),
                last,
                str(source),
                str(event.get("message", "")).strip(),
            ]
        )
    header = ["Type", "Reason", "Age", "From", "Message"]
    return table(header, [["----", "------", "----", "----", "-------"], *rows])
