"""The Task informer against the real API server: list (streamed, or in pages where the API
server does not stream lists), watch, resume after a restart, relist after 410 Gone
reporting what was deleted meanwhile.

The informer runs in the test's own event loop; Tasks are written with the admin's
synchronous client from a worker thread, so the loop keeps reading the watch meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tasklease.api.models import GROUP, PLURAL, VERSION
from tasklease.kube.client import api_client
from tasklease.kube.informer import ADDED, DELETED, MODIFIED, TaskInformer
from tests.conftest import CRDS_DIR
from tests.integration.support import RUNNER_TEMPLATE, Cluster
from tests.waiting import wait_for_async

pytestmark = pytest.mark.cluster

T = TypeVar("T")


class Recorder:
    """The informer's consumer: every (event type, name, body) in delivery order."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, event_type: str, body: dict[str, Any]) -> None:
        metadata = body["metadata"]
        if metadata.get("namespace") == self.namespace:  # a clusterwide informer sees all
            self.events.append((event_type, metadata["name"], body))

    def seen(self) -> list[tuple[str, str]]:
        return [(event_type, name) for event_type, name, _ in self.events]

    def clear(self) -> None:
        self.events.clear()

    async def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        try:
            await wait_for_async(what, condition, timeout=15)
        except AssertionError as error:
            raise AssertionError(f"{error}; delivered: {self.seen()}") from None

    async def wait_event(self, event_type: str, name: str) -> dict[str, Any]:
        await self.wait_for(f"{event_type} {name}", lambda: (event_type, name) in self.seen())
        return next(b for t, n, b in self.events if (t, n) == (event_type, name))


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(call, *args, **kwargs)


async def with_informer(
    kubeconfig: Path,
    namespace: str | None,
    recorder: Recorder,
    body: Callable[[TaskInformer], Awaitable[None]],
    **options: Any,
) -> None:
    api = await api_client(kubeconfig=kubeconfig)
    informer = TaskInformer(api, recorder, namespace=namespace, **options)
    try:
        await body(informer)
    finally:
        await informer.stop()
        await api.close()


def delete_task(cluster: Cluster, name: str) -> None:
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, name)


async def synced(informer: TaskInformer) -> None:
    informer.start()
    await asyncio.wait_for(informer.wait_synced(), timeout=15)


def test_list_then_watch_delivers_added_modified_deleted(
    cluster: Cluster, control_plane: Any
) -> None:
    cluster.create_task("before")
    recorder = Recorder(cluster.namespace)

    async def body(informer: TaskInformer) -> None:
        await synced(informer)
        assert informer.streams, "v1.37 serves streaming lists"
        assert recorder.seen() == [(ADDED, "before")]
        assert informer.known == 1
        await in_thread(cluster.create_task, "after")
        await recorder.wait_event(ADDED, "after")
        await in_thread(cluster.patch_spec, "after", {"cancel": True})
        modified = await recorder.wait_event(MODIFIED, "after")
        assert modified["spec"]["cancel"] is True
        await in_thread(delete_task, cluster, "after")
        deleted = await recorder.wait_event(DELETED, "after")
        assert deleted["metadata"]["uid"]  # the watch's DELETED carries the last state
        assert informer.known == 1
        assert all("managedFields" not in b["metadata"] for _, _, b in recorder.events)
        assert recorder.seen() == [
            (ADDED, "before"),
            (ADDED, "after"),
            (MODIFIED, "after"),
            (DELETED, "after"),
        ]

    run(with_informer(control_plane.kubeconfig, cluster.namespace, recorder, body))


def test_streamed_list_then_watch_delivers_each_object_once(
    cluster: Cluster, control_plane: Any
) -> None:
    names = [f"streamed-{n}" for n in range(5)]
    for name in names:
        cluster.create_task(name)
    recorder = Recorder(cluster.namespace)

    async def body(informer: TaskInformer) -> None:
        await synced(informer)
        assert informer.streams
        assert sorted(recorder.seen()) == [(ADDED, name) for name in names]
        # The watch starts from the bookmark's version: nothing listed is delivered twice.
        await in_thread(cluster.create_task, "streamed-late")
        await recorder.wait_event(ADDED, "streamed-late")
        assert len(recorder.events) == len(names) + 1

    run(with_informer(control_plane.kubeconfig, cluster.namespace, recorder, body))


@pytest.fixture(scope="module")
def plane_without_streaming(control_plane_binaries: Any) -> Iterator[Any]:
    """An API server as v1.30, v1.31 and v1.33 are by default: WatchList off, lists in
    pages only."""
    from tasklease.controlplane import ControlPlane

    with ControlPlane.start(
        binaries=control_plane_binaries,
        extra_args={"kube-apiserver": ["--feature-gates=WatchList=false"]},
    ) as plane:
        plane.apply_crds(CRDS_DIR)
        yield plane


def test_an_api_server_that_does_not_stream_lists_is_listed_in_pages(
    plane_without_streaming: Any,
) -> None:
    plane = plane_without_streaming
    names = [f"paged-{n}" for n in range(5)]
    plane.kubectl("create", "namespace", "paged")
    for name in names:
        task = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Task", "metadata": {"name": name}}
        task["spec"] = {"template": RUNNER_TEMPLATE}
        plane.kubectl("-n", "paged", "create", "-f", "-", input=json.dumps(task))
    recorder = Recorder("paged")

    async def body(informer: TaskInformer) -> None:
        await synced(informer)
        assert not informer.streams, "the API server refused the streaming list"
        assert sorted(recorder.seen()) == [(ADDED, name) for name in names]
        # The watch starts from the list's version: nothing listed is delivered twice.
        await in_thread(
            plane.kubectl,
            "-n",
            "paged",
            "annotate",
            "task",
            "paged-0",
            "example.com/touched=yes",
        )
        await recorder.wait_event(MODIFIED, "paged-0")
        assert len(recorder.events) == len(names) + 1

    run(with_informer(plane.kubeconfig, "paged", recorder, body, page_size=2))


def test_clusterwide_informer_sees_the_namespace(cluster: Cluster, control_plane: Any) -> None:
    cluster.create_task("anywhere")
    recorder = Recorder(cluster.namespace)

    async def body(informer: TaskInformer) -> None:
        await synced(informer)
        assert recorder.seen() == [(ADDED, "anywhere")]
        await in_thread(delete_task, cluster, "anywhere")
        await recorder.wait_event(DELETED, "anywhere")

    run(with_informer(control_plane.kubeconfig, None, recorder, body))


def test_restarted_informer_resumes_its_watch(cluster: Cluster, control_plane: Any) -> None:
    for name in ("kept", "changed", "gone"):
        cluster.create_task(name)
    recorder = Recorder(cluster.namespace)

    async def body(informer: TaskInformer) -> None:
        await synced(informer)
        await informer.stop()
        stopped_at = informer.resource_version
        assert stopped_at is not None
        recorder.clear()
        # While it is stopped:
        await in_thread(cluster.patch_spec, "changed", {"cancel": True})
        await in_thread(delete_task, cluster, "gone")
        await in_thread(cluster.create_task, "new")
        informer.start()
        await recorder.wait_for("the three changes", lambda: len(recorder.events) == 3)
        # Resumed from where it stopped: exactly what happened meanwhile, in order, and no
        # relist (which would deliver "kept" again).
        assert recorder.seen() == [(MODIFIED, "changed"), (DELETED, "gone"), (ADDED, "new")]
        assert informer.known == 3
        # Nothing more either (a relist would deliver "kept" again): whatever else the
        # informer had to deliver would come before the event of a later write.
        await in_thread(cluster.create_task, "later")
        await recorder.wait_event(ADDED, "later")
        assert recorder.seen()[3:] == [(ADDED, "later")]

    run(with_informer(control_plane.kubeconfig, cluster.namespace, recorder, body))


def test_expired_version_relists_and_reports_deletions(
    cluster: Cluster, control_plane: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("kept", "gone"):
        cluster.create_task(name)
    recorder = Recorder(cluster.namespace)

    async def body(informer: TaskInformer) -> None:
        await synced(informer)
        await informer.stop()
        recorder.clear()
        await in_thread(delete_task, cluster, "gone")
        await in_thread(cluster.create_task, "new")
        # As if the watch had been down for longer than the API server keeps history:
        # resuming from resourceVersion 1 makes the API server answer 410 Gone ("too old
        # resource version"); the deletion of "gone" is in no event the informer can get.
        informer._resource_version = "1"
        with caplog.at_level(logging.INFO, logger="tasklease.kube.informer"):
            informer.start()
            await recorder.wait_for("the relist", lambda: (DELETED, "gone") in recorder.seen())
        assert "too old resource version" in caplog.text
        assert sorted(recorder.seen()) == [(ADDED, "new"), (DELETED, "gone"), (MODIFIED, "kept")]
        # A relist knows only the key of what vanished.
        gone = next(b for t, n, b in recorder.events if (t, n) == (DELETED, "gone"))
        assert gone == {"metadata": {"namespace": cluster.namespace, "name": "gone"}}
        assert informer.known == 2
        # And it watches again from the new list.
        await in_thread(delete_task, cluster, "kept")
        await recorder.wait_event(DELETED, "kept")

    run(with_informer(control_plane.kubeconfig, cluster.namespace, recorder, body))


def test_a_large_task_is_delivered_and_the_watch_goes_on(
    cluster: Cluster, control_plane: Any
) -> None:
    """A watch event is one line of JSON; aiohttp's default line limit is 128 KiB."""
    recorder = Recorder(cluster.namespace)
    big = "x" * (200 * 1024)

    async def body(informer: TaskInformer) -> None:
        await synced(informer)
        await in_thread(cluster.create_task, "big")
        await recorder.wait_event(ADDED, "big")
        await in_thread(
            cluster.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            cluster.namespace,
            PLURAL,
            "big",
            {"metadata": {"annotations": {"example.com/blob": big}}},
        )
        modified = await recorder.wait_event(MODIFIED, "big")
        assert modified["metadata"]["annotations"]["example.com/blob"] == big
        # And the watch goes on after it.
        await in_thread(delete_task, cluster, "big")
        await recorder.wait_event(DELETED, "big")

    run(with_informer(control_plane.kubeconfig, cluster.namespace, recorder, body))
