"""When the API server last saw a Task's lease and its report written, by its own clock.

A restarted operator has observed nothing yet. Granting every lease a whole window from its
first sighting (what an operator that just started must do if it knows nothing) means an
operator that restarts faster than `ackTimeout` never expires anything. The API server keeps
a record it writes itself: each field manager's `managedFields[].time`, updated whenever the
manager changes a field it owns (every report changes `reportTime`, every hand-out the epoch
annotation). A listing's HTTP `Date` header is the same clock, so `Date - time` is the age of
the last report and of the lease as the API server saw them, with no runner clock and no
comparison between machines' clocks in it (both have whole seconds).

The informer keeps only these two times and the listing's Date (`WRITTEN_KEY` in the body's
metadata) when it drops `managedFields`; `lease.core.observe` uses them for first sightings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

from tasklease.api.models import EPOCH_ANNOTATION
from tasklease.api.times import parse_rfc3339

# Private to the operator's in-memory bodies (never written to the API server).
WRITTEN_KEY: Final = "tasklease.io/written"


def written_times(managed_fields: list[dict[str, Any]] | None) -> dict[str, str]:
    """The latest `time` of a manager owning `status.progress` ("report") and of one owning
    the epoch annotation ("lease"), as the API server wrote them."""
    found: dict[str, str] = {}
    for entry in managed_fields or ():
        when = entry.get("time")
        fields = entry.get("fieldsV1") or {}
        if not isinstance(when, str) or not isinstance(fields, dict):
            continue
        owns = {
            "report": "f:progress" in (fields.get("f:status") or {}),
            "lease": f"f:{EPOCH_ANNOTATION}"
            in ((fields.get("f:metadata") or {}).get("f:annotations") or {}),
        }
        for what, owned in owns.items():
            if owned and (what not in found or _parse(when) > _parse(found[what])):
                found[what] = when
    return found


def keep_written_times(item: dict[str, Any], listed: str | None) -> None:
    """Replace an item's `managedFields` by the written times and the listing's Date."""
    metadata = item.get("metadata") or {}
    times = written_times(metadata.pop("managedFields", None))
    if listed and times:
        metadata[WRITTEN_KEY] = {**times, "listed": listed}


def ages(metadata: dict[str, Any]) -> dict[str, float]:
    """Seconds between each written time and the listing that carried it ({} when the body
    did not come from a listing). Whole seconds on both sides: rounded down, never below 0."""
    kept = metadata.get(WRITTEN_KEY)
    if not isinstance(kept, dict):
        return {}
    try:
        listed = parsedate_to_datetime(str(kept["listed"]))
    except (KeyError, TypeError, ValueError):
        return {}
    found: dict[str, float] = {}
    for what in ("report", "lease"):
        if what in kept:
            try:
                seconds = (listed - _parse(str(kept[what]))).total_seconds()
            except ValueError:
                continue
            # The Date is truncated to the second: the true age may be up to 1 s shorter.
            found[what] = max(0.0, seconds - 1.0)
    return found


def _parse(when: str) -> datetime:
    parsed = parse_rfc3339(when)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
