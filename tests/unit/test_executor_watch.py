"""The local executor's pod watch: paged list, watch from the list's version, resume after a
server timeout from the last version seen (bookmarks included), relist on 410 Gone, stop at
once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from tasklease.executor.watch import PodWatch


def pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": version}}


class FakeStream:
    """A chunked watch response, split at awkward places; the last one blocks until shut
    down, like an idle watch."""

    def __init__(self, events: list[dict[str, Any]], *, block: bool = False) -> None:
        self._payload = b"".join(json.dumps(event).encode() + b"\n" for event in events)
        self._block = block
        self._shut = threading.Event()

    def stream(self, amt: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        for start in range(0, len(self._payload), 7):
            yield self._payload[start : start + 7]
        if self._block:
            self._shut.wait(10)
            raise OSError("socket shut down")

    def shutdown(self) -> None:
        self._shut.set()

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class FakeCore:
    def __init__(self, pages: list[dict[str, Any]], streams: list[FakeStream]) -> None:
        self.pages = pages
        self.streams = streams
        self.calls: list[dict[str, Any]] = []
        self.idle = threading.Event()

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if kwargs.get("watch"):
            stream = self.streams.pop(0)
            if not self.streams:
                self.idle.set()
            return stream
        return SimpleNamespace(data=json.dumps(self.pages.pop(0)).encode())


def test_watch_lists_resumes_and_relists_after_gone() -> None:
    a, b, c = pod("a", "10"), pod("b", "11"), pod("c", "12")
    core = FakeCore(
        pages=[
            {"metadata": {"resourceVersion": "10", "continue": "page2"}, "items": [a]},
            {"metadata": {"resourceVersion": "11"}, "items": [b]},
            {"metadata": {"resourceVersion": "20"}, "items": [c]},
        ],
        streams=[
            FakeStream(
                [
                    {"type": "ADDED", "object": c},
                    {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
                ]
            ),
            FakeStream([{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]),
            FakeStream([], block=True),
        ],
    )
    syncs: list[list[str]] = []
    events: list[tuple[str, str]] = []
    watch = PodWatch(
        core,
        name="test",
        field_selector="spec.nodeName=n",
        label_selector="tasklease.io/task",
        on_sync=lambda pods: syncs.append([p["metadata"]["name"] for p in pods]),
        on_event=lambda kind, obj: events.append((kind, obj["metadata"]["name"])),
    )
    watch.start()
    assert core.idle.wait(5)
    watch.stop(timeout=5)

    assert syncs == [["a", "b"], ["c"]]
    assert events == [("ADDED", "c")]
    watches = [call for call in core.calls if call.get("watch")]
    assert [call["resource_version"] for call in watches] == ["11", "15", "20"]
    assert all(call["field_selector"] == "spec.nodeName=n" for call in core.calls)
    assert all(call["label_selector"] == "tasklease.io/task" for call in core.calls)
    assert core.calls[1]["_continue"] == "page2"
    assert all(call["allow_watch_bookmarks"] for call in watches)
