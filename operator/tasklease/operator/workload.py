"""What only the active operator runs: the reconciler, fed by the Task informers and by kopf's
pod and Lease handlers.

With leader election a standby builds all of it but starts nothing, and kopf's pod and Lease
events are dropped (`running` is False): a standby must neither decide nor write. kopf keeps
watching meanwhile, so when the standby takes over, the pods and Leases that changed while it
stood by have been delivered to nobody; `start(catch_up=True)` lists them once and hands them
to the reconciler, as kopf's initial listing does at an ordinary start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kubernetes_asyncio import client as k8s

from tasklease.api.models import POOL_RUNNER_ROLE, ROLE_LABEL
from tasklease.kube.informer import Retry, TaskInformer, list_objects
from tasklease.operator.memory import trim_periodically
from tasklease.operator.reconciler import Reconciler

logger = logging.getLogger(__name__)

ObjectKey = tuple[str, str, str]  # (resource, namespace, name)


class Workload:
    def __init__(
        self, api: k8s.ApiClient, reconciler: Reconciler, namespaces: list[str | None]
    ) -> None:
        self._api = api
        self.reconciler = reconciler
        self._namespaces = namespaces
        self._informers = [
            TaskInformer(api, reconciler.task_seen, namespace=namespace) for namespace in namespaces
        ]
        self.running = False
        # While catching up: the pods and Leases kopf delivered since the start. kopf's copy
        # is as new as the listed one or older, and then kopf delivers the newer one next;
        # the listed copy must not overwrite it either way.
        self._delivered_since_start: set[ObjectKey] | None = None
        self._background: asyncio.Task[None] | None = None
        self._trim: asyncio.Task[None] | None = None

    async def start(self, *, catch_up: bool) -> None:
        self.reconciler.start()
        self.running = True  # kopf's events reach the reconciler from here on
        if catch_up:
            await self._catch_up()
        for informer in self._informers:
            informer.start()
        self._background = asyncio.create_task(self._announce_synced(), name="announce-synced")
        # Listings and bulk hand-outs free thousands of bodies at once; give the pages back.
        self._trim = asyncio.create_task(trim_periodically(), name="malloc-trim")

    async def stop(self) -> None:
        """Stop everything started, in the order that lets nothing call into a stopped part."""
        for task in (self._background, self._trim):
            if task is not None:
                task.cancel()
        self._background = self._trim = None
        for informer in self._informers:
            await informer.stop()
        if self.running:
            self.running = False
            await self.reconciler.stop()

    # --- kopf's events ----------------------------------------------------------------------

    def pod_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        if self.running:
            self._note_delivered("pods", body)
            self.reconciler.pod_seen(event_type, body)

    def runner_lease_seen(self, event_type: str | None, body: dict[str, Any]) -> None:
        if self.running:
            self._note_delivered("leases", body)
            self.reconciler.runner_lease_seen(event_type, body)

    def _note_delivered(self, resource: str, body: dict[str, Any]) -> None:
        if self._delivered_since_start is not None:
            self._delivered_since_start.add(_key(resource, body))

    # --- internals ------------------------------------------------------------------------

    async def _catch_up(self) -> None:
        """Hand the reconciler every runner pod and pool runner Lease, once; retried until it
        succeeds, since without them a pod that died meanwhile is noticed only by a timeout."""
        retry = Retry()
        self._delivered_since_start = set()
        try:
            while True:
                try:
                    pods, leases = await self._list_runners()
                except Exception as error:
                    delay, first = retry.failed()
                    if first:
                        logger.warning("could not list runner pods and Leases: %s", error)
                    await asyncio.sleep(delay)
                    continue
                break
        finally:
            delivered, self._delivered_since_start = self._delivered_since_start, None
        for pod in pods:
            if _key("pods", pod) not in delivered:
                self.reconciler.pod_seen("ADDED", pod)
        for lease in leases:
            if _key("leases", lease) not in delivered:
                self.reconciler.runner_lease_seen("ADDED", lease)
        logger.info("caught up with %d runner pods and %d runner Leases", len(pods), len(leases))

    async def _list_runners(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        pods: list[dict[str, Any]] = []
        leases: list[dict[str, Any]] = []
        for namespace in self._namespaces:
            async for pod in list_objects(
                self._api, resource="pods", namespace=namespace, label_selector=ROLE_LABEL
            ):
                pods.append(pod)
            async for lease in list_objects(
                self._api,
                resource="leases",
                namespace=namespace,
                label_selector=f"{ROLE_LABEL}={POOL_RUNNER_ROLE}",
            ):
                leases.append(lease)
        return pods, leases

    async def _announce_synced(self) -> None:
        started = time.monotonic()
        await asyncio.gather(*(informer.wait_synced() for informer in self._informers))
        logger.info(
            "watching %d Tasks (listed in %.1fs)",
            sum(informer.known for informer in self._informers),
            time.monotonic() - started,
        )


def _key(resource: str, body: dict[str, Any]) -> ObjectKey:
    metadata = body.get("metadata") or {}
    return resource, str(metadata.get("namespace", "")), str(metadata.get("name", ""))
