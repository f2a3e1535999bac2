"""Timestamps as the Kubernetes API writes them: RFC 3339 in UTC with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    """A `metav1.Time`: whole seconds (pod status times, condition transitions)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(moment: datetime) -> str:
    """A `metav1.MicroTime`: microseconds (Lease renewals, Events, progress reports)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime:
    """Either form back to an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
