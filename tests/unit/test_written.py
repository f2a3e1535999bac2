"""The age of a lease and of its last report by the API server's own record, for an
operator that sees them first in a listing (after a restart or a takeover); whether a Task is
applied server-side, and the one managedFields entry a hand-out leaves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from tasklease.api.written import (
    APPLIED_KEY,
    WRITTEN_KEY,
    ages,
    applied_server_side,
    keep_written_times,
    lease_entry,
    written_times,
)
from tasklease.lease.core import first_seen_at

EPOCH_FIELD = "f:tasklease.io/epoch"


def managed(
    manager: str, time: str, fields: dict[str, Any], subresource: str = ""
) -> dict[str, Any]:
    entry = {"manager": manager, "operation": "Update", "time": time, "fieldsV1": fields}
    if subresource:
        entry["subresource"] = subresource
    return entry


MANAGED = [
    managed("kubectl-create", "2026-12-06T10:00:00Z", {"f:spec": {"f:template": {}}}),
    managed(
        "tasklease-operator",
        "2026-12-06T10:00:05Z",
        {"f:metadata": {"f:annotations": {EPOCH_FIELD: {}, "f:tasklease.io/holder": {}}}},
    ),
    managed(
        "tasklease-operator",
        "2026-12-06T10:00:06Z",
        {"f:status": {"f:phase": {}, "f:attempts": {}}},
        subresource="status",
    ),
    managed(
        "tasklease-runner",
        "2026-12-06T10:01:40Z",
        {"f:status": {"f:progress": {".": {}, "f:reportTime": {}}}},
        subresource="status",
    ),
]


def test_the_report_and_lease_times_are_those_of_the_managers_that_own_them() -> None:
    assert written_times(MANAGED) == {
        "report": "2026-12-06T10:01:40Z",
        "lease": "2026-12-06T10:00:05Z",
    }
    assert written_times(None) == {}


def test_a_listing_keeps_the_times_and_its_date_and_drops_the_rest() -> None:
    item: dict[str, Any] = {"metadata": {"name": "t", "managedFields": MANAGED}}
    keep_written_times(item, "Sun, 06 Dec 2026 10:02:00 GMT")
    assert "managedFields" not in item["metadata"]
    assert ages(item["metadata"]) == {"report": 19.0, "lease": 114.0}  # 1 s for the rounding


def test_a_body_from_a_read_or_a_watch_has_no_age() -> None:
    assert ages({"name": "t"}) == {}
    assert ages({WRITTEN_KEY: {"report": "2026-12-06T10:01:40Z"}}) == {}  # no listing date


def test_an_age_is_never_below_zero() -> None:
    item: dict[str, Any] = {"metadata": {"managedFields": MANAGED}}
    keep_written_times(item, "Sun, 06 Dec 2026 10:01:40 GMT")
    assert ages(item["metadata"])["report"] == 0.0


def test_a_lease_first_seen_is_as_old_as_recorded_but_keeps_a_grace_to_report() -> None:
    window, heartbeat = timedelta(seconds=120), timedelta(seconds=10)
    # Seen without a record: a whole window from now (as before a listing's record).
    assert first_seen_at(1000.0, age_s=None, window=window, heartbeat=heartbeat) == 1000.0
    # Younger than the window less the grace: as old as recorded.
    assert first_seen_at(1000.0, age_s=30.0, window=window, heartbeat=heartbeat) == 970.0
    # Older (a dead runner, or reports an outage kept from the API server): two heartbeat
    # intervals are left, enough for a live runner to report once more.
    assert first_seen_at(1000.0, age_s=600.0, window=window, heartbeat=heartbeat) == 900.0


def test_the_grace_is_at_most_half_the_window() -> None:
    seen = first_seen_at(
        1000.0, age_s=600.0, window=timedelta(seconds=10), heartbeat=timedelta(seconds=8)
    )
    assert seen == 995.0


def test_a_watch_event_keeps_no_times_and_marks_a_task_applied_server_side() -> None:
    plain: dict[str, Any] = {"metadata": {"managedFields": MANAGED}}
    keep_written_times(plain, None)
    assert plain["metadata"] == {}
    assert not applied_server_side(plain["metadata"])
    applied_entry = {**MANAGED[0], "manager": "kustomize-controller", "operation": "Apply"}
    applied: dict[str, Any] = {"metadata": {"managedFields": [applied_entry, *MANAGED[1:]]}}
    assert applied_server_side(applied["metadata"])  # as a write's answer carries it
    keep_written_times(applied, None)
    assert applied["metadata"] == {APPLIED_KEY: True}
    assert applied_server_side(applied["metadata"])


def test_the_lease_entry_owns_what_the_write_sets_and_not_what_it_removes() -> None:
    entry = lease_entry(
        "tasklease-operator",
        "tasklease.io/v1alpha1",
        {"tasklease.io/holder": "t-2", "tasklease.io/epoch": "2", "tasklease.io/gone": None},
        {"tasklease.io/claimable": None},
    )
    assert entry == {
        "manager": "tasklease-operator",
        "operation": "Update",
        "apiVersion": "tasklease.io/v1alpha1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:annotations": {"f:tasklease.io/holder": {}, EPOCH_FIELD: {}}}
        },
    }
    # Written back, it is what a later listing reads the lease's time from.
    assert written_times([{**entry, "time": "2026-12-06T10:00:05Z"}]) == {
        "lease": "2026-12-06T10:00:05Z"
    }
