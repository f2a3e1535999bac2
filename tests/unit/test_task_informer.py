"""The Task informer's pure parts: the key view that turns a relist into deletions, the
backoff across an outage (fake time), and what one watch event does (recorded events)."""

from __future__ import annotations

from typing import Any

import pytest

from tasklease.kube.errors import ApiError
from tasklease.kube.informer import (
    ADDED,
    DELETED,
    MODIFIED,
    Expired,
    KeyView,
    Retry,
    TaskInformer,
    deleted_body,
    status_error,
)

# In the shape kube-apiserver sends them (the first: a watch resumed from an expired version).
EXPIRED_EVENT: dict[str, Any] = {
    "type": "ERROR",
    "object": {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version: 1 (2814)",
        "reason": "Expired",
        "code": 410,
    },
}
INTERNAL_ERROR_EVENT: dict[str, Any] = {
    "type": "ERROR",
    "object": {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "an error on the server has prevented the request from succeeding",
        "reason": "InternalError",
        "code": 500,
    },
}


def body(name: str, version: str = "7", namespace: str = "ns") -> dict[str, Any]:
    return {
        "apiVersion": "tasklease.io/v1alpha1",
        "kind": "Task",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": version,
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {},
    }


def listed(view: KeyView, *names: str) -> tuple[list[str], list[str]]:
    """One complete relist of `names`: the event types delivered, and the names vanished."""
    view.begin_list()
    types = [view.listed(("ns", name)) for name in names]
    return types, [name for _, name in view.end_list()]


# --- KeyView -------------------------------------------------------------------------------


def test_first_list_adds_everything_and_deletes_nothing() -> None:
    view = KeyView()
    assert listed(view, "a", "b") == ([ADDED, ADDED], [])
    assert len(view) == 2


def test_relist_reports_what_vanished_and_modifies_what_stayed() -> None:
    view = KeyView()
    listed(view, "a", "b", "c")
    assert listed(view, "b", "d") == ([MODIFIED, ADDED], ["a", "c"])
    assert ("ns", "a") not in view and ("ns", "d") in view
    assert len(view) == 2


def test_watch_events_keep_the_view_current_between_lists() -> None:
    view = KeyView()
    listed(view, "a")
    view.watched(ADDED, ("ns", "b"))
    view.watched(DELETED, ("ns", "a"))
    view.watched(DELETED, ("ns", "never-seen"))  # harmless
    # "a" was reported deleted by the watch already: the relist must not report it again.
    assert listed(view, "c") == ([ADDED], ["b"])


def test_relist_that_failed_half_way_keeps_what_it_delivered() -> None:
    view = KeyView()
    listed(view, "a", "b")
    view.begin_list()
    assert view.listed(("ns", "new")) == ADDED
    # The connection broke here: no end_list(). The consumer has seen "new", so the next
    # complete list must report it deleted if it is gone by then.
    assert listed(view, "b") == ([MODIFIED], ["a", "new"])


def test_keys_share_one_namespace_string() -> None:
    view = KeyView()
    first = view.key(body("a", namespace="".join(["team", "-a"])))
    second = view.key(body("b", namespace="".join(["team", "-a"])))
    assert first[0] is second[0]
    assert view.key({}) == ("", "")


def test_deleted_body_names_the_task() -> None:
    assert deleted_body(("ns", "a")) == {"metadata": {"namespace": "ns", "name": "a"}}


# --- Retry ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_to_its_cap_and_warns_once_per_outage() -> None:
    clock = FakeClock()
    retry = Retry(initial_s=0.5, cap_s=4.0, clock=clock)
    assert retry.succeeded() is None  # no outage yet
    delays, firsts = [], []
    for _ in range(6):
        delay, first = retry.failed()
        delays.append(delay)
        firsts.append(first)
        clock.now += delay
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert firsts == [True, False, False, False, False, False]
    assert retry.in_outage
    assert retry.succeeded() == pytest.approx(15.5)
    assert not retry.in_outage
    # A new outage starts from the initial delay, and is warned about again.
    assert retry.failed() == (0.5, True)


# --- one watch event -----------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event_type: str, body: dict[str, Any]) -> None:
        self.events.append((event_type, body))


def informer(recorder: Recorder) -> TaskInformer:
    # The API client is only stored until a request is made; none is made here.
    return TaskInformer(object(), recorder, namespace="ns")


def test_expired_error_event_means_relist() -> None:
    assert isinstance(status_error(410, "gone"), Expired)
    recorder = Recorder()
    with pytest.raises(Expired, match="too old resource version"):
        informer(recorder)._apply(EXPIRED_EVENT)
    assert recorder.events == []


def test_other_error_events_are_api_errors_to_retry() -> None:
    with pytest.raises(ApiError) as caught:
        informer(Recorder())._apply(INTERNAL_ERROR_EVENT)
    assert caught.value.status == 500


def test_events_are_handed_on_without_managed_fields_and_move_the_version() -> None:
    recorder = Recorder()
    watching = informer(recorder)
    watching._apply({"type": ADDED, "object": body("a", "10")})
    watching._apply({"type": MODIFIED, "object": body("a", "11")})
    assert [(t, b["metadata"]["resourceVersion"]) for t, b in recorder.events] == [
        (ADDED, "10"),
        (MODIFIED, "11"),
    ]
    assert all("managedFields" not in b["metadata"] for _, b in recorder.events)
    assert watching.resource_version == "11"
    assert watching.known == 1
    watching._apply({"type": DELETED, "object": body("a", "12")})
    assert watching.known == 0
    assert watching.resource_version == "12"


def test_bookmarks_move_the_version_and_are_not_handed_on() -> None:
    recorder = Recorder()
    watching = informer(recorder)
    bookmark = {
        "type": "BOOKMARK",
        "object": {
            "kind": "Task",
            "apiVersion": "tasklease.io/v1alpha1",
            "metadata": {"resourceVersion": "42"},
        },
    }
    watching._apply(bookmark)
    assert recorder.events == []
    assert watching.resource_version == "42"


def test_a_failing_consumer_does_not_stop_the_informer(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event_type: str, body: dict[str, Any]) -> None:
        raise RuntimeError("consumer bug")

    watching = TaskInformer(object(), broken, namespace="ns")
    watching._apply({"type": ADDED, "object": body("a", "10")})
    assert watching.resource_version == "10"
    assert "consumer bug" in caplog.text
