"""kopf wiring: thin handlers that hand watch events to the reconciler.

Only `on.event` handlers are registered, on purpose: change handlers (`on.create`,
`on.update`) make kopf write its own annotations on every lease change, and timers or
daemons put a finalizer on every Task (which then cannot be deleted while the operator is
down) and cost an asyncio task per object. Event handlers cost neither; the reconciler
does its own deadline keeping (see tasklease.operator.queues).
"""

from __future__ import annotations

from typing import Any

import kopf

from tasklease.api.models import GROUP, PLURAL, POOL_RUNNER_ROLE, ROLE_LABEL, VERSION
from tasklease.kube.client import KubeWriter, TokenBucket, api_client
from tasklease.operator.metrics import OperatorMetrics
from tasklease.operator.reconciler import Reconciler
from tasklease.settings import OperatorSettings

MEMO_RECONCILER = "reconciler"


class _NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: with no change handlers registered, nothing ever reads one.

    kopf builds the "essence" of every event's body by deep-copying it, whatever handlers
    exist; under heartbeat load that deep copy was a fifth of the operator's CPU in the
    scale benchmark's profile (bench/, docs/performance.md).
    """

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def configure(settings: kopf.OperatorSettings, operator: OperatorSettings) -> None:
    """kopf settings for an operator that only watches."""
    settings.persistence.diffbase_storage = _NoDiffBase()
    # A per-object worker lingers this long after its last event; heartbeats arrive every
    # few seconds, so with kopf's default (5 s) every Task would keep a worker and its
    # queue alive forever. Short-lived workers cost a task creation per event instead.
    settings.batching.idle_timeout = 0.5
    # We post our own Events with reasons users can filter on; kopf's would echo logs.
    settings.posting.enabled = False
    # Only our runner pods and pool runners (and their Leases), filtered by the API server
    # rather than after the fact.
    settings.watching.label_selectors["v1", "pods"] = ROLE_LABEL
    settings.watching.label_selectors["coordination.k8s.io", "v1", "leases"] = (
        f"{ROLE_LABEL}={POOL_RUNNER_ROLE}"
    )
    settings.watching.server_timeout = 300
    if operator.peering:
        settings.peering.name = operator.peering
        settings.peering.priority = operator.priority
        settings.peering.standalone = False
    else:
        settings.peering.standalone = True


@kopf.on.startup()
async def start_reconciler(memo: kopf.Memo, **_: Any) -> None:
    operator = OperatorSettings.from_env()
    writer = KubeWriter(
        await api_client(qps_hint=operator.workers),
        limiter=TokenBucket(qps=operator.api_qps, burst=operator.api_burst),
        event_limiter=TokenBucket(qps=operator.api_qps, burst=operator.api_burst),
    )
    metrics = OperatorMetrics()
    reconciler = Reconciler(writer, workers=operator.workers, metrics=metrics)
    metrics.attach(reconciler)
    if operator.metrics_port:
        metrics.serve(operator.metrics_port)
    reconciler.start()
    memo[MEMO_RECONCILER] = reconciler
    memo["writer"] = writer


@kopf.on.cleanup()
async def stop_reconciler(memo: kopf.Memo, **_: Any) -> None:
    reconciler = memo.get(MEMO_RECONCILER)
    if reconciler is not None:
        await reconciler.stop()
    writer = memo.get("writer")
    if writer is not None:
        await writer.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def task_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[MEMO_RECONCILER].task_seen(event["type"], event["object"])


@kopf.on.event("v1", "pods", labels={ROLE_LABEL: kopf.PRESENT})
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[MEMO_RECONCILER].pod_seen(event["type"], event["object"])


@kopf.on.event("coordination.k8s.io", "v1", "leases", labels={ROLE_LABEL: POOL_RUNNER_ROLE})
async def runner_lease_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[MEMO_RECONCILER].runner_lease_seen(event["type"], event["object"])
