"""The operator's per-Task cache: which runner pod events can change a decision (most
cannot, and each one that can costs a reconcile), and pods seen before their Task."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from tasklease.api.models import Phase
from tasklease.lease.core import PodState, Sighting
from tasklease.operator.cache import (
    OVERDUE_GRACE_S,
    TaskCache,
    TaskEntry,
    overdue_at,
    runner_pod_seen,
)
from tests.unit.builders import CREATED, NAME, NAMESPACE, iso, make_task

KEY = (NAMESPACE, NAME)


def entry_at(epoch: int, *pods: PodState) -> TaskEntry:
    return TaskEntry(key=KEY, sighting=Sighting(epoch=epoch, epoch_seen_at=0.0), pods=pods)


def test_only_a_changed_state_of_a_pod_can_matter() -> None:
    entry = entry_at(1)
    running = PodState("demo-1", 1, phase="Running")
    assert not entry.pod_seen(running)  # the holder's pod running: nothing to decide
    assert entry.pods == (running,)
    ended = PodState("demo-1", 1, phase="Failed")
    assert entry.pod_seen(ended)
    assert not entry.pod_seen(ended)  # the same state again


def test_a_replaced_runners_pod_matters_until_its_deletion_is_asked_for() -> None:
    entry = entry_at(2, PodState("demo-1", 1, phase="Running"))
    assert entry.pod_seen(PodState("demo-1", 1, phase="Running", message="still there"))
    entry.mark_deleting("demo-1")
    assert not entry.pod_seen(PodState("demo-1", 1, phase="Running", message="and again"))


def test_a_replaced_runners_pod_that_is_gone_is_forgotten() -> None:
    entry = entry_at(2, PodState("demo-1", 1, phase="Running"))
    entry.mark_deleting("demo-1")
    assert not entry.pod_seen(PodState("demo-1", 1, gone=True))
    assert entry.pods == ()
    assert entry.deleting is None


def test_pods_seen_before_their_task_are_handed_to_it() -> None:
    cache = TaskCache(monotonic=lambda: 0.0)
    pod = PodState("demo-1", 1, phase="Running")
    cache.hold_orphan(KEY, pod)
    assert cache.get(KEY) is None
    assert cache.entry(KEY).pods == (pod,)
    assert cache.forget(KEY) is not None
    assert cache.get(KEY) is None


def pod_body(**metadata: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "demo-3",
            "namespace": NAMESPACE,
            "labels": {"tasklease.io/epoch": "3"},
            "ownerReferences": [{"kind": "Task", "name": NAME, "controller": True}],
            **metadata,
        },
        "status": {"phase": "Running"},
    }


def test_a_runner_pod_belongs_to_the_task_that_controls_it() -> None:
    assert runner_pod_seen("MODIFIED", pod_body()) == (
        KEY,
        PodState("demo-3", 3, phase="Running"),
    )
    seen = runner_pod_seen("DELETED", pod_body(deletionTimestamp="2024-01-01T00:00:00Z"))
    assert seen is not None and seen[1].gone and seen[1].terminating
    assert runner_pod_seen("ADDED", pod_body(ownerReferences=[])) is None
    assert runner_pod_seen("ADDED", pod_body(labels={})) is None


# --- Tasks that nothing moves on (tasklease_tasks_overdue) --------------------------------


def test_an_assigned_task_is_overdue_an_ack_window_and_a_grace_after_its_hand_out() -> None:
    task = make_task(
        holder="demo-1", epoch=1, spec={"ackTimeout": "2m"}, status={"phase": "Assigned"}
    )
    seen = Sighting(epoch=1, epoch_seen_at=100.0)
    assert overdue_at(task, seen, now=150.0, wall=CREATED) == 100.0 + 120.0 + OVERDUE_GRACE_S


def test_a_pending_task_is_overdue_an_ack_window_after_its_backoff() -> None:
    seen = Sighting(epoch=1, epoch_seen_at=0.0)
    waiting = make_task(
        epoch=1,
        spec={"ackTimeout": "1m"},
        status={"phase": "Pending", "nextAttemptTime": iso(CREATED + timedelta(seconds=40))},
    )
    assert overdue_at(waiting, seen, now=10.0, wall=CREATED) == 10.0 + 40 + 60 + OVERDUE_GRACE_S
    queued = make_task(spec={"template": None, "workerGroup": "etl"}, status={"phase": "Pending"})
    assert overdue_at(queued, seen, now=10.0, wall=CREATED) is None  # the pool's own queue
    recorded_later = make_task(holder="demo-1", epoch=1, status={"phase": "Pending"})
    assert overdue_at(recorded_later, seen, now=10.0, wall=CREATED) == 120.0 + OVERDUE_GRACE_S
    running = make_task(holder="demo-1", epoch=1, status={"phase": "Running"})
    assert overdue_at(running, seen, now=10.0, wall=CREATED) is None


def test_overdue_tasks_are_counted_by_phase_once_their_time_has_come() -> None:
    now = [0.0]
    cache = TaskCache(monotonic=lambda: now[0])
    for name, phase, due in [("a", Phase.ASSIGNED, 10.0), ("b", Phase.PENDING, 20.0)]:
        entry = cache.entry((NAMESPACE, name))
        entry.phase, entry.overdue_at = phase, due
    cache.entry((NAMESPACE, "c")).phase = Phase.RUNNING
    assert cache.overdue_counts() == {}
    now[0] = 15.0
    assert cache.overdue_counts() == {Phase.ASSIGNED: 1}
    now[0] = 25.0
    assert cache.overdue_counts() == {Phase.ASSIGNED: 1, Phase.PENDING: 1}
