"""What only the active operator runs: the reconciler, fed by informers of Tasks, runner pods
and pool runners' Leases.

With leader election a standby builds all of it but starts nothing: it neither watches nor
decides nor writes. Taking over starts the informers, whose first LIST is the catch-up with
everything that changed while it stood by, as at an ordinary start.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kubernetes_asyncio import client as k8s

from tasklease.kube.informer import (
    POOL_RUNNER_LEASES,
    RUNNER_PODS,
    TASKS,
    Informer,
    SightListener,
)
from tasklease.operator.memory import trim_periodically
from tasklease.operator.reconciler import Reconciler

logger = logging.getLogger(__name__)


class Workload:
    def __init__(
        self,
        api: k8s.ApiClient,
        reconciler: Reconciler,
        namespaces: list[str | None],
        *,
        sight: SightListener | None = None,
    ) -> None:
        self.reconciler = reconciler
        self._task_informers = [
            Informer(api, reconciler.task_seen, watched=TASKS, namespace=namespace, sight=sight)
            for namespace in namespaces
        ]
        self._runner_informers = [
            Informer(api, deliver, watched=watched, namespace=namespace, sight=sight)
            for namespace in namespaces
            for watched, deliver in (
                (RUNNER_PODS, reconciler.pod_seen),
                (POOL_RUNNER_LEASES, reconciler.runner_lease_seen),
            )
        ]
        self.running = False
        self._background: asyncio.Task[None] | None = None
        self._trim: asyncio.Task[None] | None = None

    @property
    def informers(self) -> list[Informer]:
        return [*self._runner_informers, *self._task_informers]

    async def start(self) -> None:
        self.reconciler.start()
        self.running = True
        # Runners first, though all list at once: a Task reconciled before its runner pod
        # is known costs at most a pod creation answered AlreadyExists (an unacknowledged
        # hand-out whose pod nobody in this process has seen is finished again).
        for informer in self.informers:
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
        for informer in self.informers:
            await informer.stop()
        if self.running:
            self.running = False
            await self.reconciler.stop()

    async def _announce_synced(self) -> None:
        started = time.monotonic()
        await asyncio.gather(*(informer.wait_synced() for informer in self.informers))
        logger.info(
            "watching %d Tasks and %d runner pods (listed in %.1fs)",
            sum(informer.known for informer in self._task_informers),
            sum(informer.known for informer in self._runner_informers[::2]),
            time.monotonic() - started,
        )
