"""kopf's part of the operator: two handlers, and kopf's settings.

Besides running the process (`main.py`), kopf calls `start_operator` once its loop runs
and `stop_operator` when it stops (a signal, or our `Shutdown`), and that is all: no
handler watches a resource, and `configure` turns off kopf's Event posting, its peering and
its scanning, so kopf lists, watches, times and annotates nothing
(docs/decisions/kopf-runs-the-process.md; an import contract keeps kopf to this module and
`main.py`).

Everything else is ours, started here: Tasks, runner pods and pool runners' Leases come
through our own informers (tasklease.kube.informer, docs/decisions/own-informers.md) to
the reconciler, which keeps its own deadlines (tasklease.operator.queues,
docs/decisions/one-deadline-queue.md). With leader election (TASKLEASE_LEADER_ELECTION,
docs/decisions/lease-leader-election.md) the work (tasklease.operator.workload) starts only
once this replica leads. A leader that fails to renew stops its work and ends the operator
with exit status 1 (`Shutdown`), so that Kubernetes restarts it as a standby.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import kopf

from tasklease.kube.client import KubeWriter, RequestObservers, TokenBucket, api_client
from tasklease.kube.leader import LeaderElector, candidate_identity
from tasklease.operator.events import DEFAULT_SENDERS as EVENT_SENDERS
from tasklease.operator.metrics import OperatorMetrics
from tasklease.operator.reconciler import Reconciler, connections_needed
from tasklease.operator.sight import Sight
from tasklease.operator.workload import Workload
from tasklease.settings import OperatorSettings

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


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for an operator whose work is all its own."""
    # We post our own Events with reasons users can filter on; kopf's would echo logs.
    settings.posting.enabled = False
    # kopf peering would pause kopf's watchers only, and kopf watches nothing here: a standby
    # is our leader election's business (tasklease.kube.leader).
    settings.peering.standalone = True
    # No handler of kopf's watches a resource, so kopf has no use for following CRDs and
    # namespaces as they come and go; without this it would list and watch both, and the
    # operator would need cluster-wide permissions for nothing.
    settings.scanning.disabled = True


@kopf.on.startup()
async def start_operator(memo: kopf.Memo, **_: Any) -> None:
    operator = OperatorSettings.from_env()
    namespaces: list[str | None] = [*operator.namespaces] or [None]
    # One connection per informer's watch (Tasks, runner pods, pool runner Leases) on top of
    # the reconciler's own (workers, event senders, background deletions), so that
    # long-lived watches never take a connection a write is waiting for; one more for the
    # election.
    connections = connections_needed(workers=operator.workers, event_senders=EVENT_SENDERS)
    api = await api_client(qps_hint=connections + 3 * len(namespaces) + 1)
    metrics = OperatorMetrics()
    # Lease deadlines are timed on a clock that stands still while the operator cannot see
    # the API server (its watches or requests fail): see operator/sight.py.
    sight = Sight()
    writer = KubeWriter(
        api,
        limiter=TokenBucket(qps=operator.api_qps, burst=operator.api_burst),
        event_limiter=TokenBucket(qps=operator.api_qps, burst=operator.api_burst),
        observer=RequestObservers(metrics, sight),
    )
    reconciler = Reconciler(
        writer,
        workers=operator.workers,
        event_senders=EVENT_SENDERS,
        metrics=metrics,
        monotonic=sight.clock,
        blind_within=sight.blind_within,
        ttl_after_finished=operator.ttl_after_finished,
        compact_managed_fields=operator.compact_managed_fields,
    )
    metrics.attach(reconciler.cache)
    if operator.metrics_port:
        metrics.serve(operator.metrics_port)
    workload = Workload(api, reconciler, namespaces, sight=sight)
    metrics.attach_workload(workload)
    memo[MEMO_WORKLOAD] = workload
    memo[MEMO_WRITER] = writer
    if not operator.leader_election:
        await workload.start()
        return
    elector = LeaderElector(
        api,
        namespace=operator.leader_election_namespace,
        name=operator.leader_election_name,
        identity=candidate_identity(),
        on_started_leading=workload.start,
        on_stopped_leading=functools.partial(_stopped_leading, memo),
        sight=sight,
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
