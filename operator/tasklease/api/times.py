"""Timestamps as the Kubernetes API writes them: RFC 3339 in UTC with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime

import pydantic_core


def rfc3339(moment: datetime) -> str:
    """A `metav1.Time`: whole seconds (pod status times, condition transitions)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(moment: datetime) -> str:
    """A `metav1.MicroTime`: microseconds (Lease renewals, Events, progress reports)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_model(moment: datetime) -> str:
    """As the models write a datetime (pydantic): microseconds only when there are any. For
    the times the lease core writes into a Task (status times, the acquire-time annotation),
    which sit beside the models' own dumps (attempts, conditions) and must read as they do."""
    return str(pydantic_core.to_jsonable_python(moment.astimezone(UTC)))


def parse_rfc3339(text: str) -> datetime:
    """Either form back to an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
