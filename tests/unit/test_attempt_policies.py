"""Attempt policies, driven with fake time: spec.replacementPolicy, disruptions that do not
count against maxAttempts, and spec.ttlAfterFinished (`tasklease.lease.core`)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from tasklease.api.models import HOLDER_ANNOTATION, Outcome, Phase, Task
from tasklease.lease.core import (
    CONDITION_LEASED,
    TERMINATION_OVERDUE,
    TERMINATION_OVERDUE_AFTER,
    WAITING_FOR_TERMINATION,
    CreatePod,
    DeleteTask,
    RecordEvent,
    decide,
)
from tests.unit.builders import UID, Harness, iso, kinds, of_type, only

EVICTED = "EvictionByEvictionAPI: Eviction API: evicting"


def running(**spec: Any) -> Harness:
    """Epoch 1 handed to pod demo-1 and acknowledged, under `spec`."""
    harness = Harness.new(spec=spec)
    harness.settle()
    harness.advance(5)
    harness.report(percent=0)
    harness.settle()
    assert harness.task.status.phase == Phase.RUNNING
    return harness


def leased(task: Task) -> tuple[str, str, str]:
    condition = next(c for c in task.status.conditions if c.type == CONDITION_LEASED)
    return condition.status, condition.reason, condition.message


def outcomes(task: Task) -> list[Outcome | None]:
    return [a.outcome for a in task.status.attempts]


def lose_the_lease(harness: Harness) -> None:
    """The runner stops reporting (its process still runs): the progress timeout passes."""
    deadline = harness.decide().wake_at
    assert deadline is not None
    harness.advance_to(deadline)


# --- spec.replacementPolicy ---------------------------------------------------------------


def test_overlap_hands_out_at_once_while_the_old_pod_winds_down() -> None:
    harness = running(reportProgressTimeout="60s")
    lose_the_lease(harness)
    decision = harness.step()
    assert kinds(decision)[:2] == ["PatchLease", "CreatePod"]
    assert "demo-1" in harness.deleted_pods and harness.created_pods == ["demo-1", "demo-2"]


def test_after_termination_creates_the_next_pod_only_once_the_old_one_is_gone() -> None:
    harness = running(reportProgressTimeout="60s", replacementPolicy="AfterTermination")
    lose_the_lease(harness)
    ended = harness.step()
    assert not of_type(ended, CreatePod), kinds(ended)
    task = harness.task
    assert task.status.phase == Phase.PENDING
    assert outcomes(task) == [Outcome.PROGRESS_TIMEOUT]
    assert "the next attempt waits for pod demo-1 to end" in leased(task)[2]
    assert harness.deleted_pods == ["demo-1"]

    harness.settle()  # the lease is released (the old runner fenced), the wait is shown
    task = harness.task
    assert HOLDER_ANNOTATION not in task.metadata["annotations"]
    status, reason, message = leased(task)
    assert (status, reason) == ("False", WAITING_FOR_TERMINATION)
    assert "attempt 2 waits for pod demo-1 of attempt 1" in message
    events = [e for d in harness.decisions for e in of_type(d, RecordEvent)]
    assert WAITING_FOR_TERMINATION in [e.reason for e in events]
    assert harness.created_pods == ["demo-1"]

    harness.advance(30)  # still terminating (its grace period): nothing new
    assert not harness.decide().actions
    harness.pod_changes("demo-1", gone=True)
    assert harness.step().why == "hand out epoch 2"
    assert harness.created_pods == ["demo-1", "demo-2"]


def test_after_termination_goes_on_at_once_when_the_old_pod_already_ended() -> None:
    harness = running(replacementPolicy="AfterTermination")
    harness.pod_changes(phase="Failed", reason="Error")
    decision = harness.step()
    assert decision.why == "PodFailed -> retry"  # the backoff, then a hand-out at once
    harness.advance_to(harness.decide().wake_at or 0)
    assert harness.step().why == "hand out epoch 2"


def test_an_old_pod_this_process_created_but_has_not_seen_is_waited_for() -> None:
    harness = running(reportProgressTimeout="60s", replacementPolicy="AfterTermination")
    assert harness.sighting is not None
    harness.sighting = replace(harness.sighting, pod_ensured=True)
    del harness.pods["demo-1"]  # its watch event not here yet
    lose_the_lease(harness)
    harness.settle()
    assert leased(harness.task)[1] == WAITING_FOR_TERMINATION
    assert harness.created_pods == ["demo-1"]
    harness.restart_operator()  # a new process: the pod listing is complete, and lacks it
    assert harness.step().why == "hand out epoch 2"


def test_a_pod_that_outlives_its_grace_period_is_reported_overdue() -> None:
    harness = running(reportProgressTimeout="60s", replacementPolicy="AfterTermination")
    lose_the_lease(harness)
    harness.settle()
    grace_ends = harness.clock.wall + timedelta(seconds=30)
    harness.pod_changes("demo-1", terminating=True, grace_ends=iso(grace_ends))
    overdue_at = harness.decide().wake_at
    assert overdue_at is not None
    expected = harness.clock.monotonic + 30 + TERMINATION_OVERDUE_AFTER.total_seconds()
    assert overdue_at == pytest.approx(expected)
    harness.advance_to(overdue_at)
    decision = harness.step()
    event = only(decision, RecordEvent)
    assert (event.type, event.reason) == ("Warning", TERMINATION_OVERDUE)
    status, reason, message = leased(harness.task)
    assert (status, reason) == ("False", TERMINATION_OVERDUE)
    assert "kubectl delete pod demo-1 --grace-period=0 --force" in message
    assert not harness.decide().actions  # said once; the wait goes on
    harness.pod_changes("demo-1", gone=True)  # someone force-deleted it
    assert harness.step().why == "hand out epoch 2"


def test_after_termination_is_refused_for_a_pool_task() -> None:
    body: dict[str, Any] = {
        "metadata": {"name": "pooled"},
        "spec": {"workerGroup": "etl", "replacementPolicy": "AfterTermination"},
    }
    with pytest.raises(ValidationError, match=r"spec\.replacementPolicy AfterTermination needs"):
        Task.model_validate(body)


# --- disruptions --------------------------------------------------------------------------


def test_an_evicted_attempt_does_not_use_up_max_attempts() -> None:
    harness = running(retry={"maxAttempts": 1})
    harness.pod_changes(terminating=True, disruption=EVICTED)
    decision = harness.step()
    assert decision.why.startswith("Disrupted -> hand out epoch 2"), decision.why
    harness.settle()
    task = harness.task
    assert outcomes(task) == [Outcome.DISRUPTED, None]
    assert task.status.disruptions == 1
    assert "not counted against spec.retry.maxAttempts" in (task.status.attempts[0].message or "")
    handed = [e.message for d in harness.decisions for e in of_type(d, RecordEvent)]
    assert "attempt 2 (1/1 counted, 1 disrupted): lease epoch 2 handed to pod demo-2" in handed
    harness.report(percent=50)
    harness.write_result("FINISHED")
    harness.settle()
    assert harness.task.status.phase == Phase.SUCCEEDED


def test_a_failure_reported_by_an_evicted_runner_is_a_disruption() -> None:
    harness = running(retry={"maxAttempts": 1})
    harness.pod_changes(terminating=True, disruption=EVICTED)
    harness.write_result("FAILED", errorId="Interrupted")  # the wrapper, on SIGTERM
    harness.settle()
    task = harness.task
    assert outcomes(task)[0] == Outcome.DISRUPTED
    assert task.status.phase != Phase.FAILED and task.status.epoch == 2


def test_disruptions_left_out_are_capped() -> None:
    harness = running(retry={"maxAttempts": 1, "maxDisruptions": 1})
    harness.pod_changes(terminating=True, disruption=EVICTED)
    harness.settle()
    harness.report(percent=0)
    harness.settle()
    harness.pod_changes("demo-2", terminating=True, disruption=EVICTED)
    harness.settle()
    task = harness.task
    assert outcomes(task) == [Outcome.DISRUPTED, Outcome.POD_LOST]
    assert task.status.phase == Phase.FAILED
    assert task.status.disruptions == 1
    assert "spec.retry.maxDisruptions (1) were already left out" in (
        task.status.attempts[-1].message or ""
    )


def test_disruptions_count_when_the_policy_says_so() -> None:
    harness = running(retry={"maxAttempts": 1, "onDisruption": "Count"})
    harness.pod_changes(terminating=True, disruption=EVICTED)
    harness.settle()
    task = harness.task
    assert outcomes(task) == [Outcome.POD_LOST] and task.status.phase == Phase.FAILED
    assert "onDisruption is Count" in (task.status.attempts[0].message or "")


def test_a_disruption_under_after_termination_is_counted_once() -> None:
    harness = running(retry={"maxAttempts": 1}, replacementPolicy="AfterTermination")
    harness.pod_changes(terminating=True, disruption=EVICTED)
    harness.settle()
    assert harness.task.status.disruptions == 1 and harness.task.status.phase == Phase.PENDING
    harness.pod_changes("demo-1", gone=True)
    harness.settle()
    task = harness.task
    assert task.status.disruptions == 1 and task.status.epoch == 2
    assert outcomes(task) == [Outcome.DISRUPTED, None]


# --- spec.ttlAfterFinished ----------------------------------------------------------------


def finished(**spec: Any) -> Harness:
    harness = running(**spec)
    harness.write_result("FINISHED")
    harness.settle()
    assert harness.task.status.phase == Phase.SUCCEEDED
    return harness


def decide_with_default(harness: Harness, default: timedelta | None) -> Any:
    return decide(
        harness.task,
        sighting=harness.observe(),
        pod=harness.pod(),
        clock=harness.clock.now(),
        ttl_after_finished=default,
    )


def test_a_finished_task_is_deleted_once_its_ttl_has_passed() -> None:
    harness = finished(ttlAfterFinished="1h")
    waiting = decide_with_default(harness, None)
    assert not waiting.actions
    assert waiting.wake_at == pytest.approx(harness.clock.monotonic + 3600)
    harness.advance(3600)
    deleting = decide_with_default(harness, None)
    task = harness.task
    version = task.metadata["resourceVersion"]
    assert deleting.actions == (DeleteTask(uid=UID, resource_version=version),)
    assert deleting.deletes_task


def test_the_operators_default_ttl_applies_only_where_the_spec_sets_none() -> None:
    kept = finished()
    assert not decide_with_default(kept, None).actions
    assert decide_with_default(kept, None).wake_at is None
    kept.advance(60)
    assert decide_with_default(kept, timedelta(seconds=60)).deletes_task
    own = finished(ttlAfterFinished="2h")
    own.advance(3600)
    assert not decide_with_default(own, timedelta(seconds=60)).actions
