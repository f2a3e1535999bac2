"""The operator's writes to the Kubernetes API: the only module that talks to it directly.

Our informers watch (`informer.py`); this module writes. Every lease and status write of
the operator is compare-and-swap: each carries the resourceVersion the
decision was made from, and the API server answers 409 Conflict when the Task moved on.

Responses are read raw (`_preload_content=False`): the generated client's model
deserialisation costs more CPU than the request itself. Task reads and writes return the
Task's JSON as bytes, which the reconciler validates straight into its model (and can hold
compactly while a key waits for a worker).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from aiohttp.helpers import get_env_proxy_for_url
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from yarl import URL

from tasklease.api.models import GROUP, KIND, PLURAL, VERSION
from tasklease.api.times import rfc3339
from tasklease.api.written import lease_entry
from tasklease.kube.errors import ApiError, Conflict, Gone
from tasklease.kube.refs import ObjectRef

logger = logging.getLogger(__name__)

FIELD_MANAGER = "tasklease-operator"
MERGE_PATCH = "application/merge-patch+json"


# asyncio gives every TLS connection a read buffer of `SSLProtocol.max_size` (256 KiB),
# zero-filled and so resident from the start. With a connection per reconcile worker and per
# watch that was 5 MiB, more than the records of a thousand Tasks, and it grew with the load
# (connections open as writes queue). A TLS record is at most 16 KiB, and our responses are a
# few KiB; list pages are read in several reads instead of one.
TLS_READ_BUFFER_BYTES = 64 * 1024


def use_small_tls_read_buffers() -> None:
    if asyncio.sslproto.SSLProtocol.max_size > TLS_READ_BUFFER_BYTES:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER_BYTES


async def api_client(
    *, qps_hint: int | None = None, kubeconfig: Path | None = None
) -> k8s.ApiClient:
    """An API client from `kubeconfig` if given, else the in-cluster service account, else
    KUBECONFIG (which kubernetes_asyncio reads once, when imported)."""
    use_small_tls_read_buffers()
    configuration = k8s.Configuration()
    if kubeconfig is not None:
        await k8s_config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=configuration
        )
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            await k8s_config.load_kube_config(client_configuration=configuration)
    if qps_hint:
        configuration.connection_pool_maxsize = qps_hint
    if configuration.proxy is None:
        configuration.proxy, configuration.proxy_headers = proxy_from_environment(
            configuration.host
        )
    api = k8s.ApiClient(configuration)
    # kubernetes_asyncio makes its aiohttp session with trust_env=True, and aiohttp then looks
    # up ~/.netrc and the proxy variables on every request, each lookup in a thread: three
    # times the CPU of a request without them in our process (700 against 220 us, measured
    # with 16 in flight), twice its time, and a scan of the whole environment, which in a
    # pod holds a variable per Service of the namespace. The proxy is read once above; a
    # .netrc has no part in Kubernetes authentication (client-go ignores it too).
    api.rest_client.pool_manager._trust_env = False
    return api


def proxy_from_environment(host: str) -> tuple[str | None, dict[str, str] | None]:
    """The proxy HTTPS_PROXY/HTTP_PROXY/NO_PROXY name for `host` (the API server's URL), as
    aiohttp with trust_env would have found it per request: its URL without credentials, and
    a Proxy-Authorization header for those. (None, None): straight to the API server."""
    try:
        proxy, auth = get_env_proxy_for_url(URL(host))
    except LookupError:
        return None, None
    headers = {"Proxy-Authorization": auth.encode()} if auth is not None else None
    return str(proxy.with_user(None)), headers


async def checked_body(response: Any) -> bytes:
    """The body of a raw response, raising for errors.

    With `_preload_content=False` the generated client hands back the raw aiohttp response
    without checking its status, so a refusal would otherwise pass for a Task.
    """
    data: bytes = await response.read()
    response.release()
    if not 200 <= response.status <= 299:
        try:
            message = str(json.loads(data).get("message", ""))
        except ValueError:
            message = data[:512].decode(errors="replace")
        if response.status == 409:
            raise Conflict(message)
        if response.status == 404:
            raise Gone(message)
        raise ApiError(response.status, message)
    return data


async def json_body(response: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(await checked_body(response))
    return result


def _raise_for(exc: ApiException) -> None:
    if exc.status == 409:
        raise Conflict(exc.reason) from exc
    if exc.status == 404:
        raise Gone(exc.reason) from exc


class TokenBucket:
    """Client-side rate limit (client-go's QPS and burst), so a burst of hand-outs after a
    restart or a bulk create cannot flood the API server; the API server's priority and
    fairness would otherwise throttle every client of it, runners' heartbeats included."""

    def __init__(
        self,
        *,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._qps = qps
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._stamp = clock()
        self._lock = asyncio.Lock()
        self._waiting = 0

    def _refill(self) -> float:
        return min(self._burst, self._tokens + (self._clock() - self._stamp) * self._qps)

    async def take(self) -> float:
        """Spend one request's budget, waiting for it if need be; the seconds waited (0.0
        when the budget was there)."""
        self._waiting += 1
        asked_at = self._clock()
        # The lock is held only across a sleep: held now, it means a queue to wait in.
        waits = self._lock.locked()
        try:
            async with self._lock:
                self._tokens = self._refill()
                self._stamp = self._clock()
                if self._tokens < 1.0:
                    waits = True
                    await self._sleep((1.0 - self._tokens) / self._qps)
                    self._tokens = 1.0
                    self._stamp = self._clock()
                self._tokens -= 1.0
        finally:
            self._waiting -= 1
        return self._clock() - asked_at if waits else 0.0

    def congested(self) -> bool:
        """Whether a request made now would wait: the budget is spent or others queue."""
        return self._waiting > 0 or self._refill() < 1.0


class RequestObserver(Protocol):
    """Where the writer reports each request (tasklease.operator.metrics.OperatorMetrics):
    which of a slow reassignment's seconds went to the client-side budget and which to the
    API server's answers."""

    def api_request(self, *, verb: str, resource: str, code: str, seconds: float) -> None: ...

    def api_throttled(self, *, budget: str, seconds: float) -> None: ...


class RequestObservers:
    """Several observers of the writer's requests as one (metrics, and the operator's sight)."""

    def __init__(self, *observers: RequestObserver) -> None:
        self._observers = observers

    def api_request(self, *, verb: str, resource: str, code: str, seconds: float) -> None:
        for observer in self._observers:
            observer.api_request(verb=verb, resource=resource, code=code, seconds=seconds)

    def api_throttled(self, *, budget: str, seconds: float) -> None:
        for observer in self._observers:
            observer.api_throttled(budget=budget, seconds=seconds)


class _Unobserved:
    def api_request(self, *, verb: str, resource: str, code: str, seconds: float) -> None:
        pass

    def api_throttled(self, *, budget: str, seconds: float) -> None:
        pass


# What `code` says of a request that got no HTTP answer (connection refused or reset).
NO_ANSWER = "none"


def lease_patch(
    annotations: dict[str, str | None],
    *,
    labels: dict[str, str | None] | None = None,
    resource_version: str | None = None,
    compact_managed_fields: bool = False,
    group: str = GROUP,
) -> dict[str, Any]:
    """The merge patch of a lease write: the annotations and labels (None removes one), the
    resourceVersion it is compare-and-swap on; with `compact_managed_fields`, managedFields
    becomes the operator's entry for them alone (api/written.py), on a Task of API `group`
    (the bench measures copies of the CRD under other groups)."""
    metadata: dict[str, Any] = {"annotations": annotations}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    if labels:
        metadata["labels"] = labels
    if compact_managed_fields:
        metadata["managedFields"] = [
            lease_entry(FIELD_MANAGER, f"{group}/{VERSION}", annotations, labels or {})
        ]
    return {"metadata": metadata}


class KubeWriter:
    """Typed, CAS-minded wrappers around the few calls the operator makes."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        limiter: TokenBucket | None = None,
        event_limiter: TokenBucket | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        self._api = api
        self._limiter = limiter or TokenBucket(qps=1e9, burst=1 << 30)
        # Events have their own budget, as client-go's event recorder has: they are best
        # effort and must never delay a hand-out or a reassignment.
        self._event_limiter = event_limiter or TokenBucket(qps=1e9, burst=1 << 30)
        self._observer: RequestObserver = observer or _Unobserved()
        self._custom = k8s.CustomObjectsApi(api)
        self._core = k8s.CoreV1Api(api)
        self._events = k8s.CoreV1Api(api)

    async def close(self) -> None:
        await self._api.close()

    def congested(self) -> bool:
        """Whether writes now wait for the client-side rate limit (see TokenBucket)."""
        return self._limiter.congested()

    async def _budget(self, limiter: TokenBucket, budget: str) -> None:
        waited = await limiter.take()
        if waited > 0.0:
            self._observer.api_throttled(budget=budget, seconds=waited)

    async def _call(self, verb: str, resource: str, request: Awaitable[Any]) -> bytes:
        """Send a request and read its answer: the body, or Conflict, Gone or ApiError.
        Timed from sending to the last byte of the answer (not the budget's wait)."""
        started = time.monotonic()
        code = NO_ANSWER
        try:
            try:
                response = await request
            except ApiException as exc:
                code = str(exc.status)
                _raise_for(exc)
                raise ApiError(exc.status, str(exc.reason)) from exc
            code = str(response.status)
            return await checked_body(response)
        finally:
            self._observer.api_request(
                verb=verb, resource=resource, code=code, seconds=time.monotonic() - started
            )

    async def get_task(self, namespace: str, name: str) -> bytes:
        await self._budget(self._limiter, "requests")
        return await self._call(
            "GET",
            PLURAL,
            self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
            ),
        )

    async def patch_task_annotations(
        self,
        namespace: str,
        name: str,
        *,
        resource_version: str,
        annotations: dict[str, str | None],
        labels: dict[str, str | None] | None = None,
        compact_managed_fields: bool = False,
    ) -> bytes:
        body = lease_patch(
            annotations,
            labels=labels,
            resource_version=resource_version,
            compact_managed_fields=compact_managed_fields,
        )
        return await self._merge_patch(namespace, name, body)

    async def patch_task_status(
        self, namespace: str, name: str, *, resource_version: str, status: dict[str, Any]
    ) -> bytes:
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return await self._merge_patch(namespace, name, body, subresource="status")

    async def _merge_patch(
        self, namespace: str, name: str, body: dict[str, Any], *, subresource: str | None = None
    ) -> bytes:
        """A JSON merge patch of a Task (or its status); the body's resourceVersion makes it
        compare-and-swap: 409 Conflict when the Task moved on."""
        await self._budget(self._limiter, "requests")
        patch = (
            self._custom.patch_namespaced_custom_object_status
            if subresource == "status"
            else self._custom.patch_namespaced_custom_object
        )
        return await self._call(
            "PATCH",
            f"{PLURAL}/status" if subresource == "status" else PLURAL,
            patch(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body,
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
                _preload_content=False,
            ),
        )

    async def create_pod(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create the pod; False when it already exists (an earlier try made it)."""
        await self._budget(self._limiter, "requests")
        try:
            await self._call(
                "POST",
                "pods",
                self._core.create_namespaced_pod(
                    namespace, manifest, field_manager=FIELD_MANAGER, _preload_content=False
                ),
            )
        except Conflict:
            return False
        return True

    async def delete_pod(self, namespace: str, name: str) -> bool:
        """Delete the pod with its own grace period; False when it was already gone."""
        await self._budget(self._limiter, "requests")
        try:
            await self._call(
                "DELETE",
                "pods",
                self._core.delete_namespaced_pod(name, namespace, _preload_content=False),
            )
        except Gone:
            return False
        return True

    async def delete_task(
        self, namespace: str, name: str, *, uid: str, resource_version: str
    ) -> bool:
        """Delete a Task as decided on: refused (409) when it changed or was replaced since,
        False when it was already gone. Its runner pods follow by their owner references."""
        await self._budget(self._limiter, "requests")
        body = {
            "preconditions": {"uid": uid, "resourceVersion": resource_version},
            "propagationPolicy": "Background",
        }
        try:
            await self._call(
                "DELETE",
                PLURAL,
                self._custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, body=body, _preload_content=False
                ),
            )
        except Gone:
            return False
        return True

    async def record_event(
        self,
        task: ObjectRef,
        *,
        type_: str,
        reason: str,
        message: str,
    ) -> None:
        """A core/v1 Event on the Task; failures are logged, never raised (best effort)."""
        await self._budget(self._event_limiter, "events")
        now = rfc3339(datetime.now(UTC))  # first and last timestamps are metav1.Time
        namespace = task.namespace
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{task.name or 'task'}.",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": task.name,
                "namespace": namespace,
                "uid": task.uid,
                "resourceVersion": task.resource_version,
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": "tasklease-operator"},
            "reportingComponent": "tasklease.io/operator",
            "reportingInstance": "tasklease-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._call(
                "POST",
                "events",
                self._events.create_namespaced_event(namespace, body, _preload_content=False),
            )
        except (Conflict, Gone, ApiError) as exc:
            logger.warning("could not record event %s on %s: %s", reason, task.name, exc)
