"""kopf wiring: start and stop the operator's work, and hand it the events it reacts to.

Tasks are not watched by kopf: our own informer (tasklease.kube.informer) lists and watches
them and calls the reconciler directly, without kopf's per-event machinery (a per-object
worker, causes, handler invocation, a per-object memory), which cost two thirds of the
operator's CPU per heartbeat and most of a restart (docs/performance.md). kopf keeps what it
is cheap for: runner Pods and pool runners' Leases (few events per Task), startup and
cleanup, and the liveness endpoint.

With leader election (TASKLEASE_LEADER_ELECTION) the work (tasklease.operator.workload)
starts only once this replica leads; kopf runs standalone either way, and its pod and Lease
events are dropped while standing by. A leader that fails to renew stops its work and ends
the operator with exit status 1 (`Shutdown`), so that Kubernetes restarts it as a standby.

Only `on.event` handlers are registered, on purpose: change handlers (`on.create`,
`on.update`) make kopf write its own annotations on every change, and timers or daemons put
a finalizer on every object and cost an asyncio task per object. Event handlers cost
neither; the reconciler does its own deadline keeping (see tasklease.operator.queues).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import kopf

from tasklease.api.models import POOL_RUNNER_ROLE, ROLE_LABEL
from tasklease.kube.client import KubeWriter, TokenBucket, api_client
from tasklease.kube.leader import LeaderElector, candidate_identity
from tasklease.operator.metrics import OperatorMetrics
from tasklease.operator.reconciler import Reconciler
from tasklease.operator.workload import Workload
from tasklease.settings import OperatorSettings

# kopf gives each watched object a shallow copy of the memo as it stood when kopf first saw
# the object, so what changes later (the leadership) lives inside these objects, set once at
# startup before kopf's watchers begin.
MEMO_SHUTDOWN = "shutdown"
MEMO_WORKLOAD = "workload"
MEMO_WRITER = "writer"
MEMO_ELECTOR = "elector"

EXIT_LOST_LEADERSHIP = 1


class Shutdown:
    """How the operator's own code ends the operator: kopf stops gracefully (cleanup
    handlers included) when `flag` is set, and `run` then exits with `exit_code`."""

    def __init__(self) -> None:
        self.flag = asyncio.Event()
        self.exit_code = 0

    def request(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self.flag.set()


def new_memo() -> kopf.Memo:
    memo = kopf.Memo()
    memo[MEMO_SHUTDOWN] = Shutdown()
    return memo


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


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for an operator that only watches."""
    settings.persistence.diffbase_storage = _NoDiffBase()
    # A per-object worker lingers this long after its last event; pool runners renew their
    # Leases every few seconds, so with kopf's default (5 s) every one would keep a worker
    # and its queue alive forever. Short-lived workers cost a task creation per event.
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
    # kopf peering would pause kopf's watchers only, not our informer or the reconciler's
    # deadlines: a standby is our leader election's business (tasklease.kube.leader).
    settings.peering.standalone = True


@kopf.on.startup()
async def start_operator(memo: kopf.Memo, **_: Any) -> None:
    operator = OperatorSettings.from_env()
    namespaces: list[str | None] = [*operator.namespaces] or [None]
    # One connection per informer's watch on top of the workers' own, so that long-lived
    # watches never take a connection a write is waiting for; one more for the election.
    api = await api_client(qps_hint=operator.workers + len(namespaces) + 1)
    writer = KubeWriter(
        api,
        limiter=TokenBucket(qps=operator.api_qps, burst=operator.api_burst),
        event_limiter=TokenBucket(qps=operator.api_qps, burst=operator.api_burst),
    )
    metrics = OperatorMetrics()
    reconciler = Reconciler(writer, workers=operator.workers, metrics=metrics)
    metrics.attach(reconciler)
    if operator.metrics_port:
        metrics.serve(operator.metrics_port)
    workload = Workload(api, reconciler, namespaces)
    memo[MEMO_WORKLOAD] = workload
    memo[MEMO_WRITER] = writer
    if not operator.leader_election:
        # kopf's own initial listing hands the reconciler every pod and Lease.
        await workload.start(catch_up=False)
        return
    elector = LeaderElector(
        api,
        namespace=operator.leader_election_namespace,
        name=operator.leader_election_name,
        identity=candidate_identity(),
        on_started_leading=functools.partial(workload.start, catch_up=True),
        on_stopped_leading=functools.partial(_stopped_leading, memo),
    )
    memo[MEMO_ELECTOR] = elector
    elector.start()


async def _stopped_leading(memo: kopf.Memo) -> None:
    # Another replica may lead within seconds: no write of ours may follow its first one.
    await memo[MEMO_WORKLOAD].stop()
    shutdown: Shutdown | None = memo.get(MEMO_SHUTDOWN)
    if shutdown is None:  # run by something other than tasklease.operator.main
        raise SystemExit(EXIT_LOST_LEADERSHIP)
    shutdown.request(EXIT_LOST_LEADERSHIP)


@kopf.on.cleanup()
async def stop_operator(memo: kopf.Memo, **_: Any) -> None:
    elector: LeaderElector | None = memo.get(MEMO_ELECTOR)
    if elector is not None:
        await elector.stop()
    workload: Workload | None = memo.get(MEMO_WORKLOAD)
    if workload is not None:
        await workload.stop()
    # Released only once our work has stopped: the standby starts at once.
    if elector is not None:
        await elector.release()
    writer = memo.get(MEMO_WRITER)
    if writer is not None:
        await writer.close()
    shutdown: Shutdown | None = memo.get(MEMO_SHUTDOWN)
    if shutdown is not None:
        # Stopped by a signal, kopf leaves its waiter on our flag pending and then waits 5 s
        # for it as a "hung" task before exiting: end the wait.
        shutdown.flag.set()


@kopf.on.event("v1", "pods", labels={ROLE_LABEL: kopf.PRESENT})
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[MEMO_WORKLOAD].pod_seen(event["type"], event["object"])


@kopf.on.event("coordination.k8s.io", "v1", "leases", labels={ROLE_LABEL: POOL_RUNNER_ROLE})
async def runner_lease_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo[MEMO_WORKLOAD].runner_lease_seen(event["type"], event["object"])
