"""Lean informers: list, then watch, raw JSON bodies to a callback (client-go's reflector).

The reconciler wants each event's body, in order, and nothing more: no per-object worker,
causes or per-object memory, which is why the operator has its own informers rather than
kopf's watches (docs/decisions/own-informers.md).

One `Informer` per kind of object (`TASKS`, `RUNNER_PODS`, `POOL_RUNNER_LEASES`) and watched
namespace (or one for the whole cluster):

- the list as a stream (a WATCH with `sendInitialEvents`, ended by a bookmark), each object
  delivered as ("ADDED", body); where the API server does not stream lists (its WatchList
  feature off), a LIST in pages (`limit`, `continue`);
- WATCH from the list's resourceVersion with bookmarks and a server-side timeout; a watch
  that ends normally resumes from the last resourceVersion seen (bookmarks included), so a
  quiet namespace does not fall out of the API server's window;
- 410 Gone (the version the watch would resume from is no longer kept): LIST again and
  deliver ("DELETED", key only) for every object the consumer was told about and the new
  list lacks; only the keys are kept for that, never bodies (`KeyView`);
- connection errors: capped exponential backoff, one warning per outage.

Bodies are decoded once (pydantic_core's `from_json`: a quarter less CPU than `json.loads`
on a Task), never through the generated client's models, and lose `metadata.managedFields`
(often larger than the rest of an object) before they are handed on: a Task keeps only what
the operator reads of them (api/written.py).
The callback runs on the event loop, in stream order, and must be cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import pydantic_core
from kubernetes_asyncio import client as k8s

from tasklease.api.models import GROUP, PLURAL, POOL_RUNNER_ROLE, ROLE_LABEL, VERSION
from tasklease.api.written import keep_written_times
from tasklease.kube.errors import ApiError

logger = logging.getLogger(__name__)

ObjectKey = tuple[str, str]  # (namespace, name) of any namespaced object
Deliver = Callable[[str, dict[str, Any]], None]


class SightListener(Protocol):
    """Told when a watch fails (the first failure of an outage) and when it works again."""

    def lost(self, source: str, *, since: float | None = None) -> None: ...

    def regained(self, source: str) -> None: ...


class Unwatched:
    """A SightListener that is told nothing."""

    def lost(self, source: str, *, since: float | None = None) -> None:
        pass

    def regained(self, source: str) -> None:
        pass


def _drop_managed_fields(item: dict[str, Any], listed: str | None) -> None:
    del listed
    (item.get("metadata") or {}).pop("managedFields", None)


@dataclass(frozen=True)
class Watched:
    """A kind of object an informer lists and watches."""

    what: str  # for logs: "Tasks", "runner pods"
    resource: str  # the API resource (plural), for metrics
    api_path: str  # "/apis/<group>/<version>" or "/api/v1"
    label_selector: str | None = None
    # What an item keeps of its managedFields, given the listing's HTTP Date (None: a watch
    # event).
    keep_of_managed_fields: Callable[[dict[str, Any], str | None], None] = _drop_managed_fields


# A Task keeps when the API server saw its lease and report written (listed ones), and
# whether it is applied server-side (api/written.py).
TASKS: Final = Watched(
    "Tasks", PLURAL, f"/apis/{GROUP}/{VERSION}", keep_of_managed_fields=keep_written_times
)
# Every pod with our role label: the runner pods of Tasks and the pool runners.
RUNNER_PODS: Final = Watched("runner pods", "pods", "/api/v1", label_selector=ROLE_LABEL)
# The Leases pool runners renew (ReportTaskRunnerHeartbeat).
POOL_RUNNER_LEASES: Final = Watched(
    "pool runner Leases",
    "leases",
    "/apis/coordination.k8s.io/v1",
    label_selector=f"{ROLE_LABEL}={POOL_RUNNER_ROLE}",
)

ADDED: Final = "ADDED"
MODIFIED: Final = "MODIFIED"
DELETED: Final = "DELETED"
# The annotation of the bookmark that ends a streaming list's initial events.
INITIAL_EVENTS_END: Final = "k8s.io/initial-events-end"

PAGE_SIZE: Final = 500
# Server-side watch timeout, randomised like client-go's reflector so that the watches of
# many namespaces (and many operators) do not all reconnect in the same second.
WATCH_TIMEOUT_S: Final = (240, 360)
_CONNECT_TIMEOUT_S: Final = 10.0
# A page of 500 Tasks from a busy API server can take a while; silence this long is not.
_LIST_READ_TIMEOUT_S: Final = 60.0
# Give the event loop a turn every so many delivered items: a page of 500 parsed in one go
# would hold up the reconcile workers, the kopf watchers and the health endpoint.
_YIELD_EVERY: Final = 50
# A watch that ends this soon after it began, having seen nothing, is treated as a failure
# (backoff) rather than a normal end: it keeps a misbehaving proxy from making a busy loop.
_SHORTEST_NORMAL_WATCH_S: Final = 1.0
_PAUSE_S: Final = 1.0
# One watch event is one line of JSON. aiohttp's line reader refuses lines longer than twice
# the session's read buffer (128 KiB by default; kubernetes_asyncio's session allows 4 MiB),
# and a Task can be large (a pod template, parameters, a checkpoint, long failure messages;
# the API server stores objects up to about 1.5 MiB). Said here, not left to whichever
# session the client was made with; a limit stays, so a broken stream cannot grow a line
# without end.
MAX_EVENT_BYTES: Final = 16 << 20
# What an outage looks like: warned about once, then retried quietly. Anything else is a
# bug worth a traceback on every try.
_CONNECTION_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError, ApiError)


def _decode(data: bytes) -> Any:
    # Keys only in the parser's string cache: the same few hundred names in every object.
    # Values would fill its 16,384 slots with resourceVersions and timestamps of Tasks long
    # gone: up to about 1.5 MiB (short strings of ~90 bytes) that only load brings.
    return pydantic_core.from_json(data, cache_strings="keys")


class StreamRefused(Exception):
    """The API server does not serve a streaming list (its WatchList feature is off)."""


class StreamCut(Exception):
    """A streaming list ended before the bookmark that ends its initial events."""


class Expired(Exception):
    """HTTP 410 Gone: the resourceVersion (or continue token) is older than what the API
    server keeps. Only a fresh LIST can continue."""


def status_error(code: Any, message: str) -> Exception:
    """The exception for a failed request or a watch ERROR event (a `Status` object)."""
    if code == 410:
        return Expired(message)
    return ApiError(code if isinstance(code, int) else 0, message)


def deleted_body(key: ObjectKey) -> dict[str, Any]:
    """The body of a deletion noticed by a relist: the object itself is gone, only its key
    is known (client-go's DeletedFinalStateUnknown)."""
    return {"metadata": {"namespace": key[0], "name": key[1]}}


class KeyView:
    """The keys of the objects the consumer was told exist, kept so that a relist can tell it
    which ones were deleted while the watch was down.

    A relist that fails half way leaves the keys it delivered in the view (the consumer has
    seen them), and the next complete relist decides about them.
    """

    def __init__(self) -> None:
        self._known: set[ObjectKey] = set()
        self._listed: set[ObjectKey] | None = None
        # One string object per namespace, not one per object.
        self._namespaces: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def key(self, body: dict[str, Any]) -> ObjectKey:
        metadata = body.get("metadata") or {}
        namespace = str(metadata.get("namespace", ""))
        namespace = self._namespaces.setdefault(namespace, sys.intern(namespace))
        return namespace, str(metadata.get("name", ""))

    def watched(self, event_type: str, key: ObjectKey) -> None:
        if event_type == DELETED:
            self._known.discard(key)
        else:
            self._known.add(key)

    def begin_list(self) -> None:
        self._listed = set()

    def listed(self, key: ObjectKey) -> str:
        """Record a listed object; the event type to deliver it with."""
        assert self._listed is not None, "listed() outside a list"
        self._listed.add(key)
        if key in self._known:
            return MODIFIED
        self._known.add(key)
        return ADDED

    def end_list(self) -> list[ObjectKey]:
        """The list is complete: the keys known before it and absent from it, now deleted."""
        assert self._listed is not None, "end_list() without begin_list()"
        vanished = sorted(self._known - self._listed)
        self._known, self._listed = self._listed, None
        return vanished


class Retry:
    """Capped exponential backoff across one outage, and when to say so.

    `failed()` gives the delay before the next try and whether this failure began an
    outage (warn once, not on every try); `succeeded()` ends the outage and tells how long
    it lasted, or None when there was none.
    """

    def __init__(
        self,
        *,
        initial_s: float = 0.5,
        cap_s: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._initial_s = initial_s
        self._cap_s = cap_s
        self._clock = clock
        self._next_s = initial_s
        self._outage_since: float | None = None

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    def failed(self) -> tuple[float, bool]:
        first = self._outage_since is None
        if first:
            self._outage_since = self._clock()
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self._cap_s)
        return delay, first

    def succeeded(self) -> float | None:
        self._next_s = self._initial_s
        if self._outage_since is None:
            return None
        lasted = self._clock() - self._outage_since
        self._outage_since = None
        return lasted


class Informer:
    """Objects of one kind (`watched`) in one namespace (`namespace=None`: in all
    namespaces), delivered to `deliver`.

    `start()` runs it in the background; `stop()` ends it. A stopped informer keeps its view
    and the last resourceVersion, so starting it again resumes the watch where it stopped
    (or relists, and reports what vanished, when that version has expired meanwhile).
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        deliver: Deliver,
        *,
        watched: Watched,
        namespace: str | None = None,
        page_size: int = PAGE_SIZE,
        sight: SightListener | None = None,
    ) -> None:
        self._api = api
        self._path = (
            f"{watched.api_path}/namespaces/{namespace}/{watched.resource}"
            if namespace
            else f"{watched.api_path}/{watched.resource}"
        )
        # Until the API server refuses a streaming list once (its WatchList feature off, as
        # in v1.30, v1.31 and v1.33 by default), then pages.
        self._streams = True
        self._sight: SightListener = sight or Unwatched()
        self._label_selector = watched.label_selector
        self._keep_of_managed_fields = watched.keep_of_managed_fields
        self._what = watched.what
        self._resource = watched.resource
        self._deliver = deliver
        self._namespace = namespace
        self._page_size = page_size
        self._view = KeyView()
        self._resource_version: str | None = None
        self._retry = Retry()
        self._synced = asyncio.Event()
        self._listed_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._where = f"namespace {namespace}" if namespace else "all namespaces"

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"informer of {self._what} in {self._where}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def synced(self) -> bool:
        """True once the first LIST has been delivered completely."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    @property
    def what(self) -> str:
        return self._what

    @property
    def resource(self) -> str:
        return self._resource

    @property
    def namespace(self) -> str | None:
        return self._namespace

    @property
    def known(self) -> int:
        """How many objects the consumer was told exist (and not told are gone)."""
        return len(self._view)

    @property
    def streams(self) -> bool:
        """Whether it lists as a stream (False once the API server refused that)."""
        return self._streams

    @property
    def resource_version(self) -> str | None:
        """Where the next watch starts; None: the next step is a LIST."""
        return self._resource_version

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if self._resource_version is None:
                    await self._list()
                quiet = await self._watch()
            except Expired as expired:
                logger.info("%s in %s: %s; listing them again", self._what, self._where, expired)
                self._resource_version = None
                if self._listed_at is not None and time.monotonic() - self._listed_at < 1.0:
                    # Expired right after a fresh list: something is off; do not hammer.
                    await asyncio.sleep(_PAUSE_S)
                continue
            except Exception as error:
                delay, first = self._retry.failed()
                if first:
                    self._sight.lost(self._source)
                expected = isinstance(error, _CONNECTION_ERRORS)
                if first or not expected:
                    logger.warning(
                        "watching %s in %s failed (%s); retrying with backoff",
                        self._what,
                        self._where,
                        str(error) or type(error).__name__,
                        exc_info=not expected,
                    )
                else:
                    logger.debug("%s in %s: still failing: %s", self._what, self._where, error)
                await asyncio.sleep(delay)
                continue
            if quiet:
                await asyncio.sleep(_PAUSE_S)

    @property
    def _source(self) -> str:
        return f"the watch of {self._what} in {self._where}"

    def _recovered(self) -> None:
        lasted = self._retry.succeeded()
        if lasted is not None:
            logger.info("watching %s in %s again after %.1fs", self._what, self._where, lasted)
            self._sight.regained(self._source)

    async def _request(self, request_timeout: aiohttp.ClientTimeout, **query: str) -> Any:
        """A LIST or WATCH of the watched collection with these query parameters; the raw
        aiohttp response, raising for anything but 200."""
        if self._label_selector:
            query["labelSelector"] = self._label_selector
        response = await self._api.call_api(
            self._path,
            "GET",
            {},
            list(query.items()),
            {"Accept": "application/json"},
            response_types_map={},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=request_timeout,
        )
        if response.status != 200:
            data = await response.read()
            response.release()
            try:
                message = str(json.loads(data).get("message", ""))
            except ValueError:
                message = data[:512].decode(errors="replace")
            raise status_error(response.status, message)
        return response

    async def _list(self) -> None:
        """Every object there is, handed on as ADDED (MODIFIED when the consumer knows it
        already), then DELETED for each one it knows that is gone; the watch goes on from
        the version they were read at."""
        self._view.begin_list()
        if self._streams:
            try:
                await self._stream_list()
                return
            except StreamRefused as refused:
                logger.info(
                    "%s in %s: no streaming list (%s); listing in pages",
                    self._what,
                    self._where,
                    refused,
                )
                self._streams = False
            except StreamCut as cut:
                logger.info("%s in %s: %s; listing in pages", self._what, self._where, cut)
        await self._list_in_pages()

    async def _stream_list(self) -> None:
        """The list as a watch that sends the current objects first and then a bookmark
        saying so (`sendInitialEvents`, the API server's WatchList): served from its watch
        cache as it goes, where every page after the first is read from etcd unless the
        cache still holds that version (at 50,000 Tasks and pods: a third of the API
        server's CPU, a quarter of the time; docs/results/2026-12-07-restart.md)."""
        timeout = aiohttp.ClientTimeout(
            sock_connect=_CONNECT_TIMEOUT_S, sock_read=_LIST_READ_TIMEOUT_S
        )
        try:
            response = await self._request(
                timeout,
                watch="true",
                sendInitialEvents="true",
                resourceVersionMatch="NotOlderThan",
                allowWatchBookmarks="true",
                timeoutSeconds=str(random.randint(*WATCH_TIMEOUT_S)),
            )
        except ApiError as error:
            if error.status in (400, 422):  # the request is not understood: WatchList off
                raise StreamRefused(str(error)) from error
            raise
        self._recovered()
        listed = response.headers.get("Date")
        count = 0
        try:
            while line := await response.content.readline(max_line_length=MAX_EVENT_BYTES):
                if not line.strip():
                    continue
                event = _decode(line)
                body: dict[str, Any] = event.get("object") or {}
                metadata = body.get("metadata") or {}
                match event.get("type"):
                    case "BOOKMARK":
                        if (metadata.get("annotations") or {}).get(INITIAL_EVENTS_END) == "true":
                            self._listed(str(metadata["resourceVersion"]))
                            return
                    case "ERROR":
                        raise status_error(body.get("code"), str(body.get("message") or body))
                    case _:
                        self._keep_of_managed_fields(body, listed)
                        self._hand_on(self._view.listed(self._view.key(body)), body)
                        count += 1
                        if count % _YIELD_EVERY == 0:
                            await asyncio.sleep(0)
        finally:
            # Done with at the bookmark, or half read: closed, so that the connection is
            # not reused with the rest of the stream in it. The watch is a request of its own.
            response.close()
        # The server ended it before the bookmark (seen once under load, at 50,000): the
        # objects delivered stay in the view, the pages bring the rest this time.
        raise StreamCut(f"the streamed list ended after {count} objects, before its bookmark")

    async def _list_in_pages(self) -> None:
        timeout = aiohttp.ClientTimeout(
            sock_connect=_CONNECT_TIMEOUT_S, sock_read=_LIST_READ_TIMEOUT_S
        )
        token: str | None = None
        while True:
            query = {"limit": str(self._page_size)}
            if token:
                query["continue"] = token
            response = await self._request(timeout, **query)
            listed = response.headers.get("Date")
            try:
                page = _decode(await response.read())
            finally:
                response.release()
            self._recovered()
            for index, item in enumerate(page.get("items") or ()):
                self._keep_of_managed_fields(item, listed)
                self._hand_on(self._view.listed(self._view.key(item)), item)
                if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            del page["items"]  # the bodies are the consumer's now
            token = page["metadata"].get("continue")
            if not token:
                break
        self._listed(page["metadata"]["resourceVersion"])

    def _listed(self, resource_version: str) -> None:
        """The list is complete: what vanished is deleted, and the watch starts from here."""
        for key in self._view.end_list():
            self._hand_on(DELETED, deleted_body(key))
        self._resource_version = resource_version
        self._listed_at = time.monotonic()
        if not self._synced.is_set():
            self._synced.set()

    async def _watch(self) -> bool:
        """Watch from the last resourceVersion until the server ends the watch; True when
        it ended at once without a single event (see `_SHORTEST_NORMAL_WATCH_S`)."""
        timeout_s = random.randint(*WATCH_TIMEOUT_S)
        started = time.monotonic()
        response = await self._request(
            # The server ends the watch after timeout_s; the read timeout only catches a
            # connection that died without a word (bookmarks come about once a minute).
            aiohttp.ClientTimeout(sock_connect=_CONNECT_TIMEOUT_S, sock_read=timeout_s + 30),
            watch="true",
            resourceVersion=str(self._resource_version),
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_s),
        )
        self._recovered()
        events = 0
        try:
            while line := await response.content.readline(max_line_length=MAX_EVENT_BYTES):
                if line.strip():
                    events += 1
                    self._apply(_decode(line))
        except BaseException:
            # Half read: closed, not returned to the pool, or the next request on that
            # connection would read the rest of this stream.
            response.close()
            raise
        response.release()
        return events == 0 and time.monotonic() - started < _SHORTEST_NORMAL_WATCH_S

    def _apply(self, event: dict[str, Any]) -> None:
        """One watch event: hand it on, and remember where to resume from."""
        event_type = event.get("type")
        body: dict[str, Any] = event.get("object") or {}
        if event_type == "ERROR":
            raise status_error(body.get("code"), str(body.get("message") or body))
        metadata = body.get("metadata") or {}
        if event_type in (ADDED, MODIFIED, DELETED):
            self._keep_of_managed_fields(body, None)
            self._view.watched(event_type, self._view.key(body))
            self._hand_on(event_type, body)
        # BOOKMARK events carry nothing but the version: the point of them.
        version = metadata.get("resourceVersion")
        if version:
            self._resource_version = version

    def _hand_on(self, event_type: str, body: dict[str, Any]) -> None:
        try:
            self._deliver(event_type, body)
        except Exception:
            # The consumer's bug must not stop the informer (every later event would be
            # lost); its state for this object is refreshed by the object's next event.
            logger.exception("handling %s of one of the %s failed", event_type, self._what)


class TaskInformer(Informer):
    """The Tasks of one namespace (or of all)."""

    def __init__(
        self,
        api: k8s.ApiClient,
        deliver: Deliver,
        *,
        namespace: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        super().__init__(api, deliver, watched=TASKS, namespace=namespace, page_size=page_size)
