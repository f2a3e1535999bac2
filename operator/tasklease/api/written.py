"""What the operator reads of a Task's `managedFields`, and the one entry it writes there.

When the API server last saw a Task's lease and its report written, by its own clock. A
restarted operator has observed nothing yet. Granting every lease a whole window from its
first sighting (what an operator that just started must do if it knows nothing) means an
operator that restarts faster than `ackTimeout` never expires anything. The API server keeps
a record it writes itself: each field manager's `managedFields[].time`, updated whenever the
manager changes a field it owns (every report changes `reportTime`, every hand-out the epoch
annotation). A listing's HTTP `Date` header is the same clock, so `Date - time` is the age of
the last report and of the lease as the API server saw them, with no runner clock and no
comparison between machines' clocks in it (both have whole seconds).

The informer keeps only these two times and the listing's Date (`WRITTEN_KEY` in the body's
metadata) when it drops `managedFields`; `lease.core.observe` uses them for first sightings.

Whether anyone applies the Task server-side (`APPLIED_KEY`): the API server decodes, diffs
and rewrites every manager's entry on each write, so the creator's entry (every spec field,
the pod template's included) costs each heartbeat about as much again as the heartbeat's own
change (docs/decisions/compact-managed-fields.md). At each hand-out the operator replaces
the list by its own entry for the lease annotations (`lease_entry`), unless a manager used
server-side apply: ownership is what that apply prunes and detects conflicts by.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

from tasklease.api.models import EPOCH_ANNOTATION
from tasklease.api.times import parse_rfc3339

# Private to the operator's in-memory bodies (never written to the API server).
WRITTEN_KEY: Final = "tasklease.io/written"
APPLIED_KEY: Final = "tasklease.io/applied"


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
    """Replace an item's `managedFields` by what the operator reads of them: the written
    times and the listing's Date (`listed`; None for a watch event, whose times are not
    kept), and whether a manager applied it server-side."""
    metadata = item.get("metadata") or {}
    managed = metadata.pop("managedFields", None)
    if any(entry.get("operation") == "Apply" for entry in managed or ()):
        metadata[APPLIED_KEY] = True
    if listed:
        times = written_times(managed)
        if times:
            metadata[WRITTEN_KEY] = {**times, "listed": listed}


def applied_server_side(metadata: dict[str, Any]) -> bool:
    """Whether a manager of the Task used server-side apply (a body the informer kept, or
    one with its `managedFields`)."""
    return bool(metadata.get(APPLIED_KEY)) or any(
        entry.get("operation") == "Apply" for entry in metadata.get("managedFields") or ()
    )


def lease_entry(
    manager: str,
    api_version: str,
    annotations: Mapping[str, object],
    labels: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """The `managedFields` entry of `manager` owning `annotations` and `labels` (those set,
    not those removed): written as the whole list, it is what the list holds afterwards,
    stamped with the write's time (the lease's written time of a later listing)."""
    metadata: dict[str, Any] = {}
    for field, values in (("f:annotations", annotations), ("f:labels", labels or {})):
        owned: dict[str, Any] = {
            f"f:{key}": {} for key, value in values.items() if value is not None
        }
        if owned:
            metadata[field] = owned
    return {
        "manager": manager,
        "operation": "Update",
        "apiVersion": api_version,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": metadata},
    }


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
