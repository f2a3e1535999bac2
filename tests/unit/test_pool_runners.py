"""Pool runners' liveness on the operator's own clock: a runner is alive while its Lease is
renewed within its duration, gone at once when its pod ends or is deleted, and its going
wakes exactly the Tasks it holds."""

from __future__ import annotations

from typing import Any

from tasklease.api.models import Task
from tasklease.operator.cache import TaskEntry
from tasklease.operator.pool_runners import PoolRunners
from tests.unit.builders import MONOTONIC_START, NAMESPACE, FakeClock, make_task

RUNNER = "runner-a"


def runners_on(clock: FakeClock) -> PoolRunners:
    return PoolRunners(monotonic=lambda: clock.monotonic)


def lease(renew_time: str, *, duration_s: int = 15) -> dict[str, Any]:
    return {
        "metadata": {"namespace": NAMESPACE, "name": RUNNER},
        "spec": {"renewTime": renew_time, "leaseDurationSeconds": duration_s},
    }


def pod(phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"namespace": NAMESPACE, "name": RUNNER}, "status": {"phase": phase}}


def held_task(holder: str = RUNNER) -> Task:
    return make_task(spec={"template": None, "workerGroup": "gpu"}, holder=holder, epoch=2)


def test_a_runner_is_alive_for_its_lease_duration_from_when_a_renewal_was_seen() -> None:
    clock = FakeClock()
    runners = runners_on(clock)
    runners.lease_seen("ADDED", lease("2000-01-01T00:00:00.000000Z"))  # its clock: no matter

    state, look_again = runners.holder_state(held_task())
    assert state is not None and (state.name, state.epoch, state.gone) == (RUNNER, 2, False)
    assert look_again == MONOTONIC_START + 15

    clock.advance(10)
    runners.lease_seen("MODIFIED", lease("2000-01-01T00:00:10.000000Z"))
    clock.advance(10)
    state, look_again = runners.holder_state(held_task())
    assert state is not None and not state.gone
    assert look_again == MONOTONIC_START + 25


def test_a_lease_not_renewed_for_its_duration_makes_the_runner_gone() -> None:
    clock = FakeClock()
    runners = runners_on(clock)
    runners.lease_seen("ADDED", lease("t1"))
    clock.advance(14)
    runners.lease_seen("MODIFIED", lease("t1"))  # the same renewal again: not a renewal
    clock.advance(1)

    state, look_again = runners.holder_state(held_task())
    assert state is not None and state.gone
    assert state.message == f"pool runner {RUNNER}'s Lease expired (not renewed for 15s)"
    assert look_again is None


def test_an_ended_or_deleted_pod_makes_the_runner_gone_at_once_and_wakes_its_tasks() -> None:
    runners = runners_on(FakeClock())
    runners.lease_seen("ADDED", lease("t1"))
    entry = TaskEntry(key=(NAMESPACE, "demo"))
    runners.index(entry, RUNNER)

    assert list(runners.pod_seen("MODIFIED", pod("Running"))) == []
    assert list(runners.pod_seen("MODIFIED", pod("Failed"))) == [entry.key]
    state, _ = runners.holder_state(held_task())
    assert state is not None and state.gone
    assert state.message == f"pool runner pod {RUNNER} ended (Failed)"

    assert list(runners.pod_seen("DELETED", pod())) == [entry.key]
    state, _ = runners.holder_state(held_task())
    assert state is not None and state.message == f"pool runner pod {RUNNER} was deleted"


def test_a_renewal_after_the_lease_was_deleted_brings_the_runner_back_but_not_its_pod() -> None:
    runners = runners_on(FakeClock())
    runners.lease_seen("ADDED", lease("t1"))
    runners.lease_seen("DELETED", lease("t1"))
    state, _ = runners.holder_state(held_task())
    assert state is not None and state.message == f"pool runner {RUNNER}'s Lease was deleted"

    runners.lease_seen("ADDED", lease("t2"))
    state, _ = runners.holder_state(held_task())
    assert state is not None and not state.gone

    runners.pod_seen("DELETED", pod())
    runners.lease_seen("MODIFIED", lease("t3"))
    state, _ = runners.holder_state(held_task())
    assert state is not None and state.gone


def test_an_unknown_runner_is_given_the_benefit_of_the_doubt() -> None:
    runners = runners_on(FakeClock())
    assert runners.holder_state(held_task("runner-never-seen")) == (None, None)


def test_the_index_follows_the_holder_and_only_the_holders_tasks_are_woken() -> None:
    runners = runners_on(FakeClock())
    first, second = TaskEntry(key=(NAMESPACE, "one")), TaskEntry(key=(NAMESPACE, "two"))
    runners.index(first, RUNNER)
    runners.index(second, "runner-b")
    assert set(runners.lease_seen("ADDED", lease("t1"))) == {first.key}

    runners.index(first, None)  # released
    runners.index(second, RUNNER)  # claimed by runner-a
    assert set(runners.lease_seen("MODIFIED", lease("t2"))) == {second.key}
    assert second.indexed_holder == RUNNER
