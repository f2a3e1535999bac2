"""List-then-watch of pods in a thread, with the reflector's recovery rules.

One `PodWatch` per selector. It lists (in pages), hands the whole list to `on_sync` (so the
consumer can also notice what vanished while nobody watched), then watches from the list's
resourceVersion with bookmarks; a watch that ends normally (server timeout) resumes from the
last version seen; `410 Gone` (the version fell out of etcd's window) or any error means a
fresh list, after a capped backoff for errors.

Responses are read as raw JSON lines: the generated client's models would cost more than the
request and turn field names into snake_case. `stop()` shuts the socket of the current watch
down, which wakes the blocked read at once instead of waiting for the server's timeout.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

logger = logging.getLogger(__name__)

PAGE_SIZE: Final = 500
REQUEST_TIMEOUT: Final = (10.0, 60.0)  # (connect, read) seconds, for non-watch calls
_WATCH_TIMEOUT_S: Final = (240, 360)  # server-side, randomised like client-go's reflector
_BACKOFF_S: Final = (0.2, 10.0)

EventHandler = Callable[[str, dict[str, Any]], None]
SyncHandler = Callable[[list[dict[str, Any]]], None]


class _Expired(Exception):
    """410 Gone: relist."""


def _lines(response: Any) -> Iterator[bytes]:
    pending = bytearray()
    for chunk in response.stream(amt=None, decode_content=True):
        pending.extend(chunk)
        while (end := pending.find(b"\n")) != -1:
            line = bytes(pending[:end])
            del pending[: end + 1]
            if line.strip():
                yield line
    if pending.strip():
        yield bytes(pending)


class PodWatch:
    """Pods matching a field and label selector across all namespaces; the callbacks run on
    the watch's own thread."""

    def __init__(
        self,
        core: Any,
        *,
        name: str,
        field_selector: str,
        label_selector: str | None,
        on_sync: SyncHandler,
        on_event: EventHandler,
    ) -> None:
        self._core = core  # a kubernetes.client.CoreV1Api, used from this watch's thread only
        self._name = name
        self._selectors: dict[str, str] = {"field_selector": field_selector}
        if label_selector:
            self._selectors["label_selector"] = label_selector
        self._on_sync = on_sync
        self._on_event = on_event
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self.synced = threading.Event()  # set after the first complete list
        self._thread = threading.Thread(
            target=self._run, name=f"tasklease-executor-{name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # already closed; the thread notices the stop flag anyway
                logger.debug("shutting down the %s watch", self._name, exc_info=True)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = _BACKOFF_S[0]
        while not self._stopping.is_set():
            try:
                version = self._list()
                self.synced.set()
                backoff = _BACKOFF_S[0]
                while not self._stopping.is_set():
                    version = self._watch(version)
            except _Expired:
                logger.debug("%s watch expired; relisting", self._name)
            except Exception as error:
                if self._stopping.is_set():
                    break
                logger.warning(
                    "%s watch failed (%s); relisting in %.1fs", self._name, error, backoff
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_S[1])

    def _list(self) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            extra = {"_continue": token} if token else {}
            response = self._core.list_pod_for_all_namespaces(
                limit=PAGE_SIZE,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
                **self._selectors,
                **extra,
            )
            page = json.loads(response.data)
            items.extend(page.get("items") or [])
            token = page["metadata"].get("continue")
            if not token:
                break
        self._on_sync(items)
        version: str = page["metadata"]["resourceVersion"]
        return version

    def _watch(self, version: str) -> str:
        timeout_s = random.randint(*_WATCH_TIMEOUT_S)
        response = self._core.list_pod_for_all_namespaces(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            _preload_content=False,
            _request_timeout=(REQUEST_TIMEOUT[0], timeout_s + 30),
            **self._selectors,
        )
        with self._lock:
            self._response = response
        try:
            if self._stopping.is_set():
                return version
            for line in _lines(response):
                event = json.loads(line)
                kind = event.get("type")
                obj: dict[str, Any] = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_event(kind, obj)
            return version
        finally:
            with self._lock:
                self._response = None
            # Closed, not returned to the pool: after a shutdown or an error the stream may
            # be half read, and the next request on that connection would read its rest.
            response.close()
            response.release_conn()
