"""Requests the reconciler must not make, against the real API server.

Bodies older than what it already knows: the watch delivers the echo of the operator's own
first write after its second write has returned; such a body is history. Acting on it used
to cost a write refused with 409 and a read, per echo (three status writes logged per
reassignment in the benchmark), and observing it could take an older report for a new one.
A replaced runner's pod is deleted once, not once by the reassignment and again by the
stale-pod sweep. The reconciler runs in the test's event loop with a real writer that
records its calls; its inputs are real bodies read from the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest

from tasklease.api.models import EPOCH_ANNOTATION, GROUP, PLURAL, VERSION
from tasklease.kube.client import KubeWriter, api_client
from tasklease.kube.errors import ApiError, Conflict, Gone
from tasklease.operator.reconciler import Reconciler
from tests.integration.support import Cluster
from tests.integration.test_task_informer import in_thread
from tests.waiting import wait_for_async

pytestmark = pytest.mark.cluster

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

# Long enough that no deadline of the lease falls inside a test.
CALM_SPEC: dict[str, Any] = {"ackTimeout": "60s", "reportProgressTimeout": "120s"}


class RecordingWriter(KubeWriter):
    """The operator's writer, noting each call that reads or writes a Task or a pod, and
    each one the API server refused."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []
        self.refused: list[str] = []
        self.deleted: list[str] = []  # pod names, once per deletion asked for

    async def _noted(self, name: str, call: Awaitable[T]) -> T:
        self.calls.append(name)
        try:
            return await call
        except Exception as error:
            self.refused.append(f"{name}: {type(error).__name__}")
            raise

    async def get_task(self, namespace: str, name: str) -> bytes:
        return await self._noted("get_task", super().get_task(namespace, name))

    async def patch_task_annotations(self, *args: Any, **kwargs: Any) -> bytes:
        return await self._noted(
            "patch_task_annotations", super().patch_task_annotations(*args, **kwargs)
        )

    async def patch_task_status(self, *args: Any, **kwargs: Any) -> bytes:
        return await self._noted("patch_task_status", super().patch_task_status(*args, **kwargs))

    async def create_pod(self, namespace: str, manifest: dict[str, Any]) -> bool:
        return await self._noted("create_pod", super().create_pod(namespace, manifest))

    async def delete_pod(self, namespace: str, name: str) -> bool:
        self.deleted.append(name)
        return await self._noted("delete_pod", super().delete_pod(namespace, name))


def _raw_task(cluster: Cluster, name: str) -> dict[str, Any]:
    response = cluster.custom.get_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, name, _preload_content=False
    )
    body: dict[str, Any] = json.loads(response.data)
    body["metadata"].pop("managedFields", None)  # as the informer hands bodies on
    return body


def _raw_pod(cluster: Cluster, name: str) -> dict[str, Any]:
    response = cluster.core.read_namespaced_pod(name, cluster.namespace, _preload_content=False)
    body: dict[str, Any] = json.loads(response.data)
    body["metadata"].pop("managedFields", None)
    return body


async def _until(what: str, condition: Callable[[], Any]) -> Any:
    """Poll `condition` (a blocking call, run in a thread) until it is true, for 15 s."""
    return await wait_for_async(what, lambda: in_thread(condition), timeout=15)


async def _quiet(writer: RecordingWriter, *, for_s: float = 0.7) -> None:
    """Until the writer has made no call for `for_s` seconds: what a test asserts is that a
    call was not made, and no event says that none is coming."""
    counts = [-1]

    def still() -> bool:
        before, counts[0] = counts[0], len(writer.calls)
        return before == counts[0]

    await wait_for_async("the writer to go quiet", still, interval=for_s)


@contextlib.asynccontextmanager
async def _handed_out(
    cluster: Cluster, kubeconfig: Path, name: str, spec: dict[str, Any] = CALM_SPEC
) -> AsyncIterator[tuple[Reconciler, RecordingWriter, dict[str, Any]]]:
    """A reconciler that has handed out Task `name` (created here) and settled, its writer,
    and the Task's body as created; stopped on the way out."""
    writer = RecordingWriter(await api_client(kubeconfig=kubeconfig))
    reconciler = Reconciler(writer, workers=1)
    reconciler.start()
    try:
        await in_thread(cluster.create_task, name, **spec)
        created = await in_thread(_raw_task, cluster, name)
        reconciler.task_seen("ADDED", created)
        await _until(
            "the hand-out to be recorded",
            lambda: (
                (task := cluster.task(name)).get("status", {}).get("phase") == "Assigned"
                and task["metadata"]["annotations"].get(EPOCH_ANNOTATION) == "1"
            ),
        )
        await _quiet(writer)
        yield reconciler, writer, created
    finally:
        await reconciler.stop()
        await writer.close()


async def _next_attempt(cluster: Cluster, name: str) -> None:
    await _until(
        "the next attempt to be handed out",
        lambda: cluster.task(name)["metadata"]["annotations"].get(EPOCH_ANNOTATION) == "2",
    )


def test_a_body_older_than_one_decided_on_is_not_acted_on(
    cluster: Cluster, control_plane: Any
) -> None:
    async def scenario() -> None:
        async with _handed_out(cluster, control_plane.kubeconfig, "echo") as handed_out:
            reconciler, writer, created = handed_out
            version_before = cluster.task("echo")["metadata"]["resourceVersion"]
            calls_before = list(writer.calls)
            # The Task as it was created: no lease. Taken for news, it would be handed
            # out again (a lease write against an old version: refused, then a read).
            reconciler.task_seen("MODIFIED", created)
            # Acted on, it would cost a write at once: a second without one says it was not.
            await _quiet(writer, for_s=1.0)
            assert writer.calls == calls_before
            assert writer.refused == []
            assert cluster.task("echo")["metadata"]["resourceVersion"] == version_before

    asyncio.run(scenario())


def test_an_old_body_with_a_reason_to_decide_reads_the_task_first(
    cluster: Cluster, control_plane: Any
) -> None:
    async def scenario() -> None:
        async with _handed_out(cluster, control_plane.kubeconfig, "woken") as handed_out:
            reconciler, writer, created = handed_out
            # The runner pod fails (as the kubelet would say); its event and the stale
            # body both wait for the worker.
            await in_thread(
                cluster.core.patch_namespaced_pod_status,
                "woken-1",
                cluster.namespace,
                {"status": {"phase": "Failed"}},
            )
            failed_pod = await in_thread(_raw_pod, cluster, "woken-1")
            calls_before = len(writer.calls)
            reconciler.task_seen("MODIFIED", created)
            reconciler.pod_seen("MODIFIED", failed_pod)
            await _next_attempt(cluster, "woken")
            await _quiet(writer)
            # Decided on the Task as it is now, so no write was made against an old version.
            assert writer.calls[calls_before] == "get_task"
            assert writer.refused == []

    asyncio.run(scenario())


def test_a_replaced_runners_pod_is_deleted_once(cluster: Cluster, control_plane: Any) -> None:
    async def scenario() -> None:
        # Nobody acknowledges: the lease is taken back after ackTimeout, and the pod of a
        # runner that may still be running is deleted.
        unacked = {"ackTimeout": "2s", "reportProgressTimeout": "120s"}
        async with _handed_out(cluster, control_plane.kubeconfig, "unacked", unacked) as handed_out:
            reconciler, writer, _ = handed_out
            reconciler.pod_seen("ADDED", await in_thread(_raw_pod, cluster, "unacked-1"))
            await _next_attempt(cluster, "unacked")
            await _quiet(writer)
            # Counted by name: nobody acknowledges epoch 2 either, so on a slow machine its
            # own ackTimeout may pass meanwhile and unacked-2 go the same way.
            assert writer.deleted.count("unacked-1") == 1, (writer.calls, writer.refused)
            assert writer.refused == []

    asyncio.run(scenario())


class NotedRequests:
    """A tasklease.kube.client.RequestObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    def api_request(self, *, verb: str, resource: str, code: str, seconds: float) -> None:
        assert 0.0 <= seconds < 30.0
        self.requests.append((verb, resource, code))

    def api_throttled(self, *, budget: str, seconds: float) -> None:
        pass


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted: list[str] = []

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        self.submitted.append(getattr(fn, "__qualname__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


def test_refusals_reach_the_reconciler_in_its_terms_and_the_observer_with_their_code(
    cluster: Cluster, control_plane: Any
) -> None:
    async def scenario() -> None:
        noted = NotedRequests()
        # The operator's own client.
        api = await api_client(kubeconfig=control_plane.kubeconfig)
        writer = KubeWriter(api, observer=noted)
        await in_thread(cluster.create_task, "refused", **CALM_SPEC)
        # aiohttp looks up .netrc and proxies in a thread per request unless told not to.
        threads = CountingExecutor()
        asyncio.get_running_loop().set_default_executor(threads)
        try:
            body = await writer.get_task(cluster.namespace, "refused")
            version = json.loads(body)["metadata"]["resourceVersion"]
            written = await writer.patch_task_annotations(
                cluster.namespace, "refused", resource_version=version, annotations={"a": "1"}
            )
            assert json.loads(written)["metadata"]["annotations"]["a"] == "1"
            with pytest.raises(Conflict):  # the version it was decided on is gone
                await writer.patch_task_status(
                    cluster.namespace, "refused", resource_version=version, status={}
                )
            with pytest.raises(Gone):
                await writer.get_task(cluster.namespace, "no-such-task")
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "refused-pod"},
                "spec": {"containers": [{"name": "main", "image": "runner:dev"}]},
            }
            assert await writer.create_pod(cluster.namespace, pod) is True
            assert await writer.create_pod(cluster.namespace, pod) is False  # exists
            assert await writer.delete_pod(cluster.namespace, "refused-pod") is True
            with pytest.raises(ApiError) as refused:  # invalid: the schema names the field
                await writer.patch_task_status(
                    cluster.namespace,
                    "refused",
                    resource_version=json.loads(written)["metadata"]["resourceVersion"],
                    status={"phase": "Sideways"},
                )
            assert refused.value.status == 422
            assert "phase" in refused.value.message
        finally:
            await writer.close()
        assert threads.submitted == []
        assert noted.requests == [
            ("GET", "tasks", "200"),
            ("PATCH", "tasks", "200"),
            ("PATCH", "tasks/status", "409"),
            ("GET", "tasks", "404"),
            ("POST", "pods", "201"),
            ("POST", "pods", "409"),
            ("DELETE", "pods", "200"),
            ("PATCH", "tasks/status", "422"),
        ]

    asyncio.run(scenario())
