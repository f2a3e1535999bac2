"""Leader election on a real coordination.k8s.io/v1 Lease: one leader of two candidates, a
release hands over at once, a crash hands over when the lease expires on the standby's own
clock, and a leader that cannot renew stops leading. Short timings keep the tests fast; the
operator's defaults (15 s lease, renew every 5 s) are exercised here with the operator as a
process, and in test_chart.py under the chart's RBAC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes_asyncio import client as k8s

from tasklease.controlplane.cluster import free_port
from tasklease.kube.client import api_client
from tasklease.kube.leader import LeaderElector
from tests.integration.support import Cluster, OperatorProcess, scrape, wait_for
from tests.waiting import wait_for_async

pytestmark = pytest.mark.cluster

T = TypeVar("T")
LEASE = "tasklease-operator"
FAST: dict[str, Any] = {
    "lease_duration_s": 3,
    "renew_every_s": 0.5,
    "retry_s": 0.25,
    "renew_deadline_s": 2.0,
}


class Candidate:
    """An elector and what happened to it."""

    def __init__(self, api: k8s.ApiClient, namespace: str, identity: str) -> None:
        self.started: float | None = None
        self.stopped: float | None = None
        self.elector = LeaderElector(
            api,
            namespace=namespace,
            name=LEASE,
            identity=identity,
            on_started_leading=self._started,
            on_stopped_leading=self._stopped,
            **FAST,
        )

    async def _started(self) -> None:
        self.started = time.monotonic()

    async def _stopped(self) -> None:
        self.stopped = time.monotonic()


async def wait_until(what: str, condition: Callable[[], object]) -> float:
    """The seconds until `condition` held (at most 15)."""
    started = time.monotonic()
    await wait_for_async(what, condition, timeout=15)
    return time.monotonic() - started


def first_answer(api: k8s.ApiClient) -> asyncio.Event:
    """An Event set once a request made through `api` has been answered."""
    answered = asyncio.Event()
    call_api = api.call_api

    async def noting(*args: Any, **kwargs: Any) -> Any:
        response = await call_api(*args, **kwargs)
        answered.set()
        return response

    api.call_api = noting
    return answered


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def holder(kube_config: Any, namespace: str) -> str | None:
    lease = client.CoordinationV1Api(kube_config).read_namespaced_lease(LEASE, namespace)
    value: str | None = lease.spec.holder_identity
    return value


def test_one_leads_and_a_release_hands_over_at_once(
    control_plane: Any, kube_config: Any, namespace: str
) -> None:
    async def body() -> None:
        api = await api_client(kubeconfig=control_plane.kubeconfig)
        first = Candidate(api, namespace, "first_1")
        second = Candidate(api, namespace, "second_1")
        try:
            first.elector.start()
            await wait_until("first to lead", lambda: first.started)
            second.elector.start()
            # Several lease durations: the leader keeps renewing, the standby never leads.
            await asyncio.sleep(3 * FAST["lease_duration_s"])
            assert second.started is None and first.stopped is None
            assert first.elector.leading and not second.elector.leading
            assert await asyncio.to_thread(holder, kube_config, namespace) == "first_1"
            await first.elector.stop()
            await first.elector.release()
            took = await wait_until("second to lead", lambda: second.started)
            # Without the release it would have waited for the lease to expire.
            assert took < FAST["lease_duration_s"], f"took over {took:.1f}s: the lease expired"
            assert first.stopped is None  # a clean stop is not a lost leadership
            lease = await asyncio.to_thread(
                client.CoordinationV1Api(kube_config).read_namespaced_lease, LEASE, namespace
            )
            assert lease.spec.holder_identity == "second_1"
            assert lease.spec.lease_transitions == 1
        finally:
            for candidate in (first, second):
                await candidate.elector.stop()
            await api.close()

    run(body())


def test_a_crashed_leader_is_replaced_once_its_lease_expires(
    control_plane: Any, namespace: str
) -> None:
    async def body() -> None:
        api = await api_client(kubeconfig=control_plane.kubeconfig)
        # The standby's own client, to see it read the Lease.
        standby_api = await api_client(kubeconfig=control_plane.kubeconfig)
        first = Candidate(api, namespace, "first_1")
        second = Candidate(standby_api, namespace, "second_1")
        try:
            first.elector.start()
            await wait_until("first to lead", lambda: first.started)
            read = first_answer(standby_api)
            second.elector.start()
            # From its first read on, the standby times the lease on its own clock.
            await wait_until("the standby to read the Lease", read.is_set)
            # A crash: no more renewals, and no release.
            await first.elector.stop()
            crashed = time.monotonic()
            await wait_until("second to lead", lambda: second.started)
            assert second.started is not None
            waited = second.started - crashed
            duration = FAST["lease_duration_s"]
            assert duration - FAST["renew_every_s"] - 0.1 <= waited <= duration + 2.0, waited
        finally:
            for candidate in (first, second):
                await candidate.elector.stop()
            await api.close()
            await standby_api.close()

    run(body())


def test_a_leader_that_cannot_renew_stops_leading(
    control_plane: Any, kube_config: Any, namespace: str
) -> None:
    async def body() -> None:
        api = await api_client(kubeconfig=control_plane.kubeconfig)
        leader = Candidate(api, namespace, "leader_1")
        try:
            leader.elector.start()
            await wait_until("the leader to lead", lambda: leader.started)
            # Someone else writes the Lease (a candidate on a partitioned node that judged it
            # expired, say): from now on every renewal of ours is refused.
            coordination = client.CoordinationV1Api(kube_config)
            await asyncio.to_thread(
                coordination.patch_namespaced_lease,
                LEASE,
                namespace,
                {"spec": {"holderIdentity": "intruder_1"}},
            )
            intruded = time.monotonic()
            await wait_until("the leader to stop leading", lambda: leader.stopped)
            assert leader.stopped is not None
            gave_up_after = leader.stopped - intruded
            # Within its renew deadline, before the intruder's lease would run out for others.
            assert gave_up_after <= FAST["renew_deadline_s"] + 0.5, gave_up_after
            assert not leader.elector.leading
            await leader.elector.stop()
            await leader.elector.release()  # not the holder any more: must not clear it
            assert await asyncio.to_thread(holder, kube_config, namespace) == "intruder_1"
        finally:
            await leader.elector.stop()
            await api.close()

    run(body())


def test_operator_that_loses_its_lease_stops_and_exits_non_zero(
    control_plane: Any, kube_config: Any, cluster: Cluster, tmp_path: Path
) -> None:
    """The operator leads, works, and when it cannot renew (someone else holds the Lease)
    it stops its work and exits with status 1, for Kubernetes to restart it."""
    namespace = cluster.namespace
    operator = OperatorProcess(
        kubeconfig=control_plane.kubeconfig,
        namespace=namespace,
        log_path=tmp_path / "operator.log",
        extra_env={
            "TASKLEASE_LEADER_ELECTION": "true",
            "TASKLEASE_LEADER_ELECTION_NAMESPACE": namespace,
            "HOSTNAME": "operator-a",
        },
    ).start()
    try:
        wait_for("the operator to lead", lambda: "leading (Lease" in operator.log(), timeout=60)
        cluster.create_task("led")
        cluster.wait_epoch("led", 1)
        client.CoordinationV1Api(kube_config).patch_namespaced_lease(
            LEASE, namespace, {"spec": {"holderIdentity": "intruder_1"}}
        )
        intruded = time.monotonic()
        process = operator.process
        assert process is not None
        # Renew deadline 10 s, then kopf's graceful stop.
        wait_for("the operator to exit", lambda: process.poll() is not None, timeout=40)
        assert process.returncode == 1, operator.log()[-3000:]
        assert time.monotonic() - intruded >= 5  # it kept trying until its deadline
        log = operator.log()
        assert "stopped leading" in log
        assert "released the Lease" not in log  # not ours to release
    finally:
        operator.stop()


def test_only_the_leader_exports_leading(
    control_plane: Any, cluster: Cluster, tmp_path: Path
) -> None:
    """`tasklease_leading` (TaskleaseNotLeading's witness) is 1 on the replica that leads and
    0 on the standby, and moves to the standby when the leader stops."""
    namespace = cluster.namespace

    def replica(name: str) -> OperatorProcess:
        return OperatorProcess(
            kubeconfig=control_plane.kubeconfig,
            namespace=namespace,
            log_path=tmp_path / f"{name}.log",
            metrics_port=free_port(),
            extra_env={
                "TASKLEASE_LEADER_ELECTION": "true",
                "TASKLEASE_LEADER_ELECTION_NAMESPACE": namespace,
                "HOSTNAME": name,
            },
        ).start()

    def leading(operator: OperatorProcess) -> float | None:
        return scrape(operator.metrics_port).get("tasklease_leading")

    first = replica("operator-a")
    second: OperatorProcess | None = None
    try:
        wait_for("the first replica to lead", lambda: "leading (Lease" in first.log(), timeout=60)
        second = replica("operator-b")
        standby = second
        wait_for(
            "the standby's metrics",
            lambda: leading(standby) is not None,
            timeout=30,
            retrying=(OSError,),
        )
        assert leading(first) == 1
        assert leading(standby) == 0
        first.stop()  # releases the Lease: the standby leads at once
        wait_for("the standby to export leading", lambda: leading(standby) == 1, timeout=30)
    finally:
        first.stop()
        if second is not None:
            second.stop()
