"""Timestamps as the Kubernetes API writes them: RFC 3339 in UTC with a `Z`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

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


def parse_stamp(text: object) -> datetime | None:
    """A timestamp read leniently from an object anyone may edit (an annotation) or one
    written by the API server: None when it is missing or does not parse. Kubernetes
    timestamps are UTC; one written without a zone is read as UTC too, so it can be
    compared with an aware clock."""
    if not isinstance(text, str):
        return None
    try:
        parsed = parse_rfc3339(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ServerClock:
    """The API server's clock, as the Date headers of its answers tell it.

    A runner writes its reportTime on it, and `kubectl tasklease` measures ages on it, so
    that a node or a laptop whose clock is off shows nothing wrong (`kubectl get tasks` and
    the operator compare with the API server's own timestamps). Date has whole seconds, so
    half a second is added (the true time is up to a second later); an estimate within a
    second of the one held is kept, so times written one after the other do not jitter."""

    def __init__(self, wall: Callable[[], datetime] = _utc_now) -> None:
        self._wall = wall
        self._offset = timedelta(0)

    def observe(self, headers: Mapping[str, str] | None) -> None:
        """Read an answer's headers; one without a usable Date changes nothing."""
        try:
            date = parsedate_to_datetime((headers or {})["Date"])
        except (KeyError, TypeError, ValueError):
            return
        offset = date + timedelta(seconds=0.5) - self._wall()
        if abs((offset - self._offset).total_seconds()) > 1.0:
            self._offset = offset

    def now(self) -> datetime:
        return self._wall() + self._offset
