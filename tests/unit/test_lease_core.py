"""The lease state machine, driven with fake time: observe -> decide -> apply -> observe.

Every test states one behaviour of `tasklease.lease.core`. Most drive a `Harness`, which
performs a decision's writes the way the API server would and tracks runner pods, so the
state a test reaches is one the real reconciler can reach too. Nothing sleeps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    CLAIMABLE_LABEL,
    EPOCH_ANNOTATION,
    HOLDER_ANNOTATION,
    MAX_ATTEMPT_HISTORY,
    PREVIOUS_ATTEMPT_ANNOTATION,
    WORKER_GROUP_LABEL,
    AttemptRecord,
    Backoff,
    Outcome,
    Phase,
    Task,
    TaskStatus,
)
from tasklease.api.runner_env import ENV_ATTEMPT, ENV_CHECKPOINT, ENV_EPOCH
from tasklease.api.written import WRITTEN_KEY
from tasklease.lease.backoff import retry_delay
from tasklease.lease.core import (
    ACTIVE_PHASES,
    CONDITION_COMPLETE,
    CONDITION_LATE,
    CONDITION_LEASED,
    RUNNER_EXIT_GRACE,
    RUNNER_REPORTED,
    Clock,
    CreatePod,
    Decision,
    DeletePod,
    PatchLease,
    PatchStatus,
    PodState,
    RecordEvent,
    decide,
    observe,
    report_key,
    set_condition,
    stale_pod,
    when_to_stop_pod,
)
from tasklease.lease.pods import runner_pod_name
from tests.unit.builders import (
    CREATED,
    MONOTONIC_START,
    UID,
    Harness,
    apply,
    iso,
    kinds,
    make_task,
    of_type,
    only,
    parse,
)

ACK_S = 120.0  # spec.ackTimeout default
PROGRESS_S = 900.0  # spec.reportProgressTimeout default
TICK = 0.001
RELEASE = PatchLease({HOLDER_ANNOTATION: None})
FINAL_PHASES = [p for p in Phase if p.is_final]


# --- helpers ------------------------------------------------------------------------------


def handed_out(**overrides: Any) -> Harness:
    """A task whose epoch 1 was just handed to pod demo-1 (at the start of fake time)."""
    harness = Harness.new(**overrides)
    assert harness.step().why == "hand out epoch 1"
    assert harness.step().why == "record the hand-out of epoch 1"
    return harness


def running(**overrides: Any) -> Harness:
    """A task whose runner acknowledged epoch 1 five seconds after the hand-out."""
    harness = handed_out(**overrides)
    harness.advance(5)
    harness.report(percent=0)
    assert harness.step().why == "acknowledged"
    return harness


def heartbeat_until(harness: Harness, wall: datetime, *, every_s: float = 60) -> None:
    """The runner reports fresh progress every `every_s` while the wall clock is before `wall`."""
    while harness.clock.wall + timedelta(seconds=every_s) < wall:
        harness.advance(every_s)
        harness.report(percent=0, message=f"at {harness.clock.monotonic}")
        harness.settle()


def status_patch(decision: Decision) -> dict[str, Any]:
    return only(decision, PatchStatus).status


def after(harness: Harness, decision: Decision) -> Task:
    """The Task as it would be once the decision's writes are done."""
    return parse(apply(harness.body, decision))


def reassigned(harness: Harness, decision: Decision) -> tuple[Task, AttemptRecord]:
    """Perform `decision`, and the status write that records a hand-out if one follows;
    return the Task then and the attempt the decision ended."""
    harness.perform(decision)
    task = harness.task
    if task.lease.epoch > task.status.epoch:
        catch_up = harness.decide()
        assert catch_up.why == f"record the hand-out of epoch {task.lease.epoch}"
        harness.perform(catch_up)
        task = harness.task
        return task, task.status.attempts[-2]
    return task, task.status.attempts[-1]


def condition(task: Task, type_: str) -> Any:
    return next(c for c in task.status.conditions if c.type == type_)


def env(create: CreatePod) -> dict[str, str]:
    container = create.manifest["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def at(seconds: float) -> datetime:
    return CREATED + timedelta(seconds=seconds)


# --- hand-out -----------------------------------------------------------------------------


def test_new_task_is_handed_out_lease_first_then_pod_then_event() -> None:
    harness = Harness.new()
    harness.advance(3)
    decision = harness.decide()

    assert kinds(decision) == ["PatchLease", "CreatePod", "RecordEvent"]
    assert not decision.deferrable
    lease, create, event = decision.actions
    now = iso(at(3))
    assert lease == PatchLease(
        {
            HOLDER_ANNOTATION: "demo-1",
            EPOCH_ANNOTATION: "1",
            ACQUIRE_TIME_ANNOTATION: now,
            PREVIOUS_ATTEMPT_ANNOTATION: None,
        }
    )
    assert runner_pod_name("demo", 1) == "demo-1"

    assert isinstance(create, CreatePod)
    pod = create.manifest
    assert pod["metadata"]["name"] == "demo-1"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == UID
    assert pod["metadata"]["labels"]["tasklease.io/epoch"] == "1"
    assert pod["spec"]["restartPolicy"] == "Never"
    variables = env(create)
    assert (variables[ENV_EPOCH], variables[ENV_ATTEMPT]) == ("1", "1")
    assert json.loads(variables["TASKLEASE_PARAMETERS"]) == {"date": "2024-01-01"}
    assert ENV_CHECKPOINT not in variables
    pod_name_env = next(
        e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "TASKLEASE_POD_NAME"
    )
    assert pod_name_env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    assert event == RecordEvent(
        "Normal", "HandedOut", "attempt 1/3: lease epoch 1 handed to pod demo-1"
    )


def test_the_status_records_the_hand_out_after_the_pod_as_deferrable_bookkeeping() -> None:
    harness = Harness.new()
    harness.advance(3)
    harness.step()
    harness.advance(1)
    decision = harness.decide()

    assert kinds(decision) == ["PatchStatus"]
    assert decision.deferrable
    now = iso(at(3))  # the attempt starts when the lease was acquired
    patch = status_patch(decision)
    assert (patch["phase"], patch["attempt"], patch["epoch"], patch["holder"]) == (
        "Assigned",
        1,
        1,
        "demo-1",
    )
    assert patch["attempts"] == [{"attempt": 1, "epoch": 1, "holder": "demo-1", "startTime": now}]
    assert patch["startTime"] == now
    assert "nextAttemptTime" in patch
    assert patch["nextAttemptTime"] is None
    assert patch["observedGeneration"] == 1
    [leased] = patch["conditions"]
    assert leased["type"] == CONDITION_LEASED
    assert (leased["status"], leased["reason"]) == ("True", "Assigned")
    assert decision.wake_at is None


def test_an_acknowledgement_before_the_status_caught_up_is_recorded_as_running_at_once() -> None:
    harness = Harness.new()
    harness.step()
    harness.advance(2)
    harness.report(percent=0)

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    assert decision.deferrable
    task = after(harness, decision)
    assert task.status.phase == Phase.RUNNING
    assert condition(task, CONDITION_LEASED).reason == "Running"
    assert only(decision, RecordEvent).reason == "Acknowledged"
    harness.perform(decision)
    assert harness.decide().actions == ()


def test_a_cancel_while_the_status_is_behind_is_not_deferred() -> None:
    harness = Harness.new()
    harness.step()
    harness.set_spec(cancel=True)
    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus"]
    assert not decision.deferrable
    harness.perform(decision)
    assert harness.settle()[0].why == "Canceled -> Canceled"
    assert harness.task.status.phase == Phase.CANCELED


def test_handed_out_task_parses_back_as_assigned_with_matching_lease_and_status() -> None:
    harness = handed_out()
    task = harness.task
    assert task.status.phase == Phase.ASSIGNED
    assert task.lease.holder == task.status.holder == "demo-1"
    assert task.lease.epoch == task.status.epoch == 1
    assert task.lease.acquire_time == task.status.start_time == CREATED
    assert harness.created_pods == ["demo-1"]


def test_completing_a_half_done_hand_out_does_not_rewrite_the_lease_or_bump_the_epoch() -> None:
    harness = Harness.new()
    first = harness.decide()
    harness.perform(first, crash_after=1)  # the lease was written, then the operator died
    harness.advance(30)
    harness.restart_operator()

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "CreatePod"]
    assert not decision.deferrable
    patch = status_patch(decision)
    assert (patch["epoch"], patch["attempt"], patch["holder"]) == (1, 1, "demo-1")
    # The attempt started when the lease was acquired, not when the status caught up.
    assert patch["attempts"][0]["startTime"] == iso(CREATED)
    assert patch["startTime"] == iso(CREATED)
    assert only(decision, CreatePod).manifest == only(first, CreatePod).manifest

    harness.perform(decision)
    assert harness.task.lease.epoch == 1
    assert harness.decide().actions == ()


def test_half_done_retry_hand_out_keeps_the_history_and_the_checkpoint() -> None:
    harness = running()
    harness.report(percent=40, checkpoint={"row": 7})
    harness.advance(PROGRESS_S)
    reassign = harness.decide()
    assert reassign.why == "ProgressTimeout -> hand out epoch 2"
    harness.perform(reassign, crash_after=1)  # the lease was written, then the operator died
    harness.restart_operator()

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "CreatePod"]
    patch = status_patch(decision)
    assert [a["epoch"] for a in patch["attempts"]] == [1, 2]
    # How attempt 1 ended survived the crash on the lease.
    assert patch["attempts"][0]["outcome"] == "ProgressTimeout"
    assert patch["attempts"][0]["endTime"] == iso(at(5 + PROGRESS_S))
    assert (patch["attempt"], patch["epoch"]) == (2, 2)
    variables = env(only(decision, CreatePod))
    assert json.loads(variables[ENV_CHECKPOINT]) == {"row": 7}


# --- acknowledgement ----------------------------------------------------------------------


def test_first_progress_report_with_the_current_epoch_acknowledges_the_lease() -> None:
    harness = handed_out()
    harness.advance(10)
    harness.report(percent=0, message="starting")

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    task = after(harness, decision)
    assert task.status.phase == Phase.RUNNING
    leased = condition(task, CONDITION_LEASED)
    assert (leased.status, leased.reason) == ("True", "Running")
    # Leased stayed True from Assigned to Running: no transition.
    assert leased.last_transition_time == CREATED
    assert only(decision, RecordEvent).reason == "Acknowledged"


def test_progress_report_with_an_old_epoch_does_not_acknowledge() -> None:
    harness = handed_out()
    harness.advance(ACK_S)
    harness.settle()  # ack timeout, epoch 2 handed out
    handed_out_at = harness.clock.monotonic
    harness.advance(10)
    harness.report(epoch=1, percent=50)  # a zombie of epoch 1 (fencing would refuse it)

    decision = harness.decide()
    assert decision.actions == ()
    assert decision.wake_at == handed_out_at + ACK_S
    assert harness.task.status.phase == Phase.ASSIGNED


def test_ack_timeout_fires_exactly_at_the_deadline_and_epoch_2_is_handed_out_at_once() -> None:
    harness = handed_out()
    harness.pod_changes(phase="Running")
    deadline = MONOTONIC_START + ACK_S

    harness.advance_to(deadline - TICK)
    early = harness.decide()
    assert early.actions == ()
    assert early.wake_at == deadline

    harness.advance_to(deadline)
    decision = harness.decide()
    # One decision: the next lease (carrying how attempt 1 ended) and the next pod.
    assert kinds(decision) == [
        "PatchLease",
        "CreatePod",
        "RecordEvent",
        "DeletePod",
        "RecordEvent",
    ]
    assert decision.why == "AckTimeout -> hand out epoch 2"
    assert (decision.ended, decision.retrying, decision.handed_out) == (
        Outcome.ACK_TIMEOUT,
        True,
        2,
    )
    assert decision.expired_at == deadline
    assert only(decision, DeletePod) == DeletePod("demo-1")
    lease = only(decision, PatchLease).annotations
    assert (lease[EPOCH_ANNOTATION], lease[HOLDER_ANNOTATION]) == ("2", "demo-2")
    assert only(decision, CreatePod).manifest["metadata"]["name"] == "demo-2"
    assert [e.reason for e in of_type(decision, RecordEvent)] == ["HandedOut", "AckTimeout"]

    task, record = reassigned(harness, decision)
    assert (record.outcome, record.end_time) == (Outcome.ACK_TIMEOUT, harness.clock.wall)
    assert (task.status.phase, task.status.attempt, task.status.epoch) == (
        Phase.ASSIGNED,
        2,
        2,
    )
    assert task.status.holder == "demo-2"
    assert task.status.next_attempt_time is None


@pytest.mark.parametrize(
    "end_attempt",
    [
        pytest.param(lambda h: h.advance(PROGRESS_S), id="progress-timeout"),
        pytest.param(lambda h: h.pod_changes(phase="Failed"), id="pod-failed"),
        pytest.param(lambda h: h.pod_changes(gone=True), id="pod-lost"),
        pytest.param(lambda h: h.write_result("FAILED", errorId="Flaky"), id="runner-failed"),
    ],
)
def test_next_attempt_receives_the_last_checkpoint(end_attempt: Callable[[Harness], Any]) -> None:
    harness = running(spec={"retry": {"backoff": {"initial": "0s"}}})
    harness.advance(30)
    harness.report(percent=30, checkpoint={"row": 300, "file": "b.csv"})
    harness.settle()
    end_attempt(harness)
    steps = harness.settle()
    create = only(next(d for d in steps if of_type(d, CreatePod)), CreatePod)
    assert json.loads(env(create)[ENV_CHECKPOINT]) == {"row": 300, "file": "b.csv"}
    assert env(create)[ENV_EPOCH] == "2"


def test_checkpoint_of_an_earlier_attempt_survives_an_attempt_that_never_reported() -> None:
    harness = running()
    harness.report(percent=10, checkpoint="page-3")
    harness.advance(PROGRESS_S)
    harness.settle()  # epoch 2, which never acknowledges
    harness.advance(ACK_S)
    steps = harness.settle()
    create = only(next(d for d in steps if of_type(d, CreatePod)), CreatePod)
    assert (env(create)[ENV_EPOCH], json.loads(env(create)[ENV_CHECKPOINT])) == ("3", "page-3")


def test_restarted_operator_gives_an_unacknowledged_lease_a_full_ack_window() -> None:
    harness = handed_out()
    harness.advance(ACK_S - 10)
    harness.restart_operator()
    restarted_at = harness.clock.monotonic

    harness.advance(15)  # past the original deadline
    decision = harness.decide()
    assert decision.actions == ()
    assert decision.wake_at == restarted_at + ACK_S

    harness.advance_to(restarted_at + ACK_S)
    assert harness.decide().why == "AckTimeout -> hand out epoch 2"


# --- progress timeout ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "report_time",
    [
        pytest.param(None, id="no-report-time"),
        pytest.param(CREATED - timedelta(days=365), id="far-past"),
        pytest.param(CREATED + timedelta(days=365), id="far-future"),
    ],
)
def test_progress_timeout_counts_from_the_operators_sighting_not_the_report_time(
    report_time: datetime | None,
) -> None:
    harness = running()
    harness.advance(300)
    stamp: dict[str, Any] = {"reportTime": iso(report_time)} if report_time else {}
    harness.report(percent=25, **stamp)
    seen_at = harness.clock.monotonic
    assert harness.step().actions == ()

    harness.advance_to(seen_at + PROGRESS_S - TICK)
    early = harness.decide()
    assert early.actions == ()
    assert early.wake_at == seen_at + PROGRESS_S

    harness.advance_to(seen_at + PROGRESS_S)
    decision = harness.decide()
    assert decision.why == "ProgressTimeout -> hand out epoch 2"
    task, record = reassigned(harness, decision)
    assert task.status.next_attempt_time is None  # a lost lease is handed out again at once
    assert record.outcome == Outcome.PROGRESS_TIMEOUT


def test_repeated_identical_progress_does_not_extend_the_lease() -> None:
    harness = running()
    harness.report(percent=50, message="halfway")
    first_seen = harness.clock.monotonic
    for _ in range(10):
        harness.advance(60)
        harness.report(percent=50, message="halfway")  # the same content, written again
        harness.observe()  # and seen again through a relist
    assert harness.sighting is not None
    assert harness.sighting.report_seen_at == first_seen
    assert harness.decide().wake_at == first_seen + PROGRESS_S


def test_changed_progress_extends_the_lease() -> None:
    harness = running()
    harness.advance(600)
    harness.report(percent=51)
    decision = harness.decide()
    assert decision.actions == ()
    assert decision.wake_at == harness.clock.monotonic + PROGRESS_S
    harness.advance(PROGRESS_S - 1)
    assert harness.decide().actions == ()


def test_changed_report_time_alone_counts_as_a_new_report() -> None:
    harness = running()
    harness.report(percent=50, reportTime=iso(at(100)))
    harness.advance(60)
    harness.report(percent=50, reportTime=iso(at(160)))
    assert harness.decide().wake_at == harness.clock.monotonic + PROGRESS_S


def test_restarted_operator_gives_a_running_lease_with_an_old_report_a_full_window() -> None:
    task = make_task(
        holder="demo-1",
        epoch=1,
        acquire_time=CREATED,
        status={
            "phase": "Running",
            "attempt": 1,
            "epoch": 1,
            "holder": "demo-1",
            "attempts": [{"attempt": 1, "epoch": 1, "holder": "demo-1", "startTime": iso(CREATED)}],
            "progress": {
                "epoch": 1,
                "percent": 10,
                "reportTime": iso(CREATED - timedelta(days=1)),
            },
        },
    )
    restarted_at = 50_000.0
    wall = CREATED + timedelta(hours=5)  # the report is hours old by the wall clock
    sighting = observe(None, task, now=restarted_at)

    early = Clock(monotonic=restarted_at + PROGRESS_S - TICK, wall=wall)
    decision = decide(task, sighting=sighting, pod=None, clock=early)
    assert decision.actions == ()
    assert decision.wake_at == restarted_at + PROGRESS_S

    due = Clock(monotonic=restarted_at + PROGRESS_S, wall=wall)
    decision = decide(task, sighting=sighting, pod=None, clock=due)
    assert decision.why == "ProgressTimeout -> hand out epoch 2"


# --- observe ------------------------------------------------------------------------------


def test_observe_starts_a_sighting_when_a_lease_is_first_seen() -> None:
    harness = handed_out()
    sighting = observe(None, harness.task, now=42.0)
    assert (sighting.epoch, sighting.epoch_seen_at) == (1, 42.0)
    assert (sighting.report_key, sighting.report_seen_at) == (None, None)


def test_observe_counts_a_report_present_at_first_sight_as_seen_now() -> None:
    harness = running()
    sighting = observe(None, harness.task, now=42.0)
    assert harness.task.status.progress is not None
    assert sighting.report_key == report_key(harness.task.status.progress)
    assert sighting.report_seen_at == 42.0


def test_observe_ignores_a_report_of_another_epoch() -> None:
    harness = running()
    harness.advance(PROGRESS_S)
    harness.settle()  # epoch 2, progress still carries epoch 1
    sighting = observe(None, harness.task, now=42.0)
    assert sighting.epoch == 2
    assert sighting.report_key is None


def test_observe_starts_over_when_the_epoch_changes() -> None:
    harness = running()
    before = harness.sighting
    assert before is not None
    harness.advance(PROGRESS_S)
    harness.settle()
    after_handout = harness.sighting
    assert after_handout is not None
    assert after_handout.epoch == 2
    assert after_handout.epoch_seen_at == harness.clock.monotonic
    assert after_handout.report_seen_at is None


def test_observe_returns_the_same_sighting_when_nothing_new_was_reported() -> None:
    harness = running()
    sighting = harness.sighting
    assert sighting is not None
    assert observe(sighting, harness.task, now=sighting.epoch_seen_at + 500) is sighting


def test_observe_keeps_the_epoch_sighting_when_a_new_report_arrives() -> None:
    harness = running()
    sighting = harness.sighting
    assert sighting is not None
    harness.advance(60)
    harness.report(percent=2)
    updated = harness.sighting
    assert updated is not None
    assert updated.epoch_seen_at == sighting.epoch_seen_at
    assert updated.report_seen_at == harness.clock.monotonic


# --- dead pods ----------------------------------------------------------------------------

DEAD_PODS = [
    pytest.param({"gone": True}, Outcome.POD_LOST, False, False, id="gone"),
    pytest.param(
        {"terminating": True, "phase": "Running"}, Outcome.POD_LOST, False, True, id="terminating"
    ),
    pytest.param(
        {"phase": "Failed", "reason": "Error", "message": "exit code 1"},
        Outcome.POD_FAILED,
        True,
        False,
        id="failed",
    ),
    pytest.param(
        {"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."},
        Outcome.POD_FAILED,
        True,
        False,
        id="evicted",
    ),
    pytest.param({"phase": "Succeeded"}, Outcome.POD_FAILED, True, False, id="succeeded-no-result"),
]


@pytest.mark.parametrize("acknowledged", [False, True], ids=["assigned", "running"])
@pytest.mark.parametrize(("change", "outcome", "backs_off", "deletes"), DEAD_PODS)
def test_dead_holder_pod_ends_the_attempt_at_once(
    acknowledged: bool,
    change: dict[str, Any],
    outcome: Outcome,
    backs_off: bool,
    deletes: bool,
) -> None:
    harness = running() if acknowledged else handed_out()
    harness.advance(1)  # long before any timer
    harness.pod_changes(**change)

    decision = harness.decide()
    task, record = reassigned(harness, decision)
    assert record.outcome == outcome
    assert record.end_time == harness.clock.wall
    # A lost pod is replaced at once; a failed one waits for the backoff.
    assert task.status.phase == (Phase.PENDING if backs_off else Phase.ASSIGNED)
    assert (task.status.next_attempt_time is not None) == backs_off
    # A pod that ended keeps its logs; one that may still run (grace period) is deleted.
    assert bool(of_type(decision, DeletePod)) == deletes
    if change.get("reason"):
        assert change["reason"] in (record.message or "")
        assert change["message"] in (record.message or "")


@pytest.mark.parametrize("phase", ["Pending", "Running", "Unknown"])
def test_live_holder_pod_does_not_end_the_attempt(phase: str) -> None:
    harness = running()
    harness.pod_changes(phase=phase)
    assert harness.decide().actions == ()


def test_death_of_an_old_epochs_pod_does_not_end_the_current_attempt() -> None:
    harness = running()
    harness.advance(PROGRESS_S)
    harness.settle()  # epoch 2 handed out
    old_pod = PodState(name="demo-1", epoch=1, phase="Failed", reason="Evicted")
    assert harness.sighting is not None
    clock = harness.clock.now()
    decision = decide(harness.task, sighting=harness.sighting, pod=old_pod, clock=clock)
    assert decision.actions == ()


def test_failed_pod_waits_for_the_backoff_and_releases_the_lease_meanwhile() -> None:
    harness = handed_out(spec={"retry": {"backoff": {"initial": "30s", "jitter": 0}}})
    harness.advance(5)
    harness.pod_changes(phase="Failed", reason="Error")

    ended = harness.step()
    next_at = at(5 + 30)
    assert status_patch(ended)["nextAttemptTime"] == iso(next_at)
    assert harness.task.status.next_attempt_time == next_at
    assert of_type(ended, DeletePod) == []

    release = harness.step()
    assert release.actions == (RELEASE,)
    assert release.wake_at == MONOTONIC_START + 35
    assert harness.task.lease.holder is None
    assert harness.task.lease.epoch == 1  # the fencing token stays

    waiting = harness.step()
    assert waiting.actions == ()
    assert waiting.wake_at == MONOTONIC_START + 35

    harness.advance_to(MONOTONIC_START + 35 - TICK)
    assert harness.decide().actions == ()
    harness.advance_to(MONOTONIC_START + 35)
    handout = harness.decide()
    assert handout.why == "hand out epoch 2"
    assert only(handout, PatchLease).annotations[HOLDER_ANNOTATION] == "demo-2"


def test_vanished_pod_is_replaced_at_once_without_backoff() -> None:
    harness = handed_out()
    harness.advance(5)
    harness.pod_changes(gone=True)
    steps = harness.settle()
    assert [d.why for d in steps] == [
        "PodLost -> hand out epoch 2",
        "record the hand-out of epoch 2",
        "waiting for acknowledgement",
    ]
    assert harness.created_pods == ["demo-1", "demo-2"]


# --- results ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "phase", "outcome"),
    [("FINISHED", Phase.SUCCEEDED, Outcome.SUCCEEDED), ("FALSE", Phase.SKIPPED, Outcome.SKIPPED)],
)
def test_runner_result_finishes_the_task_and_leaves_the_pod_to_exit_by_itself(
    result: str, phase: Phase, outcome: Outcome
) -> None:
    harness = running()
    harness.advance(30)
    harness.write_result(result)

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    task = after(harness, decision)
    assert task.status.phase == phase
    assert task.status.completion_time == harness.clock.wall
    assert task.status.holder is None
    assert (task.status.attempts[-1].outcome, task.status.attempts[-1].end_time) == (
        outcome,
        harness.clock.wall,
    )
    complete = condition(task, CONDITION_COMPLETE)
    assert (complete.status, complete.reason) == ("True", phase.value)
    leased = condition(task, CONDITION_LEASED)
    assert (leased.status, leased.reason) == ("False", outcome.value)
    event = only(decision, RecordEvent)
    assert (event.type, event.reason) == ("Normal", phase.value)

    harness.perform(decision)
    assert harness.decide().actions == (RELEASE,)
    harness.perform(harness.decide())
    final = harness.decide()
    assert (final.actions, final.wake_at) == ((), None)


def test_retryable_failure_reported_by_the_runner_is_retried_after_the_backoff() -> None:
    harness = running()
    harness.write_result("FAILED", errorId="Timeout", errorMessage="db timed out")

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]  # the runner exits by itself
    task = after(harness, decision)
    assert task.status.phase == Phase.PENDING
    expected = harness.clock.wall + retry_delay(Backoff(), failed_attempt=1, task_uid=UID)
    assert task.status.next_attempt_time == expected
    record = task.status.attempts[-1]
    assert record.outcome == Outcome.FAILED
    assert "Timeout" in (record.message or "")
    assert "db timed out" in (record.message or "")
    event = only(decision, RecordEvent)
    assert (event.type, event.reason) == ("Warning", "Failed")


def test_non_retryable_failure_fails_the_task_at_once() -> None:
    harness = running(spec={"retry": {"nonRetryableErrors": ["BadInput"]}})
    harness.write_result("FAILED", errorId="BadInput", errorMessage="no such column")

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    task = after(harness, decision)
    assert task.status.phase == Phase.FAILED
    assert task.status.attempt == 1
    assert "nonRetryableErrors" in condition(task, CONDITION_COMPLETE).message


def test_failure_on_the_last_attempt_fails_the_task_with_retries_exhausted() -> None:
    harness = running(spec={"retry": {"maxAttempts": 1}})
    harness.write_result("FAILED", errorId="Flaky")

    task = after(harness, harness.decide())
    assert task.status.phase == Phase.FAILED
    assert task.status.next_attempt_time is None
    message = condition(task, CONDITION_COMPLETE).message
    assert message.startswith("retries exhausted after 1 attempt(s); last: Failed:")


def test_result_carrying_an_old_epoch_is_ignored() -> None:
    harness = running()
    harness.advance(PROGRESS_S)
    harness.settle()  # epoch 2
    harness.advance(5)
    harness.report(percent=0)
    harness.settle()
    harness.write_result("FINISHED", epoch=1)  # a zombie of epoch 1

    assert harness.decide().actions == ()
    assert harness.task.status.phase == Phase.RUNNING


def test_result_before_any_progress_report_is_honoured() -> None:
    harness = handed_out()
    harness.write_result("FINISHED")
    assert after(harness, harness.decide()).status.phase == Phase.SUCCEEDED


@pytest.mark.parametrize(
    ("result", "outcome"), [("FINISHED", Outcome.SUCCEEDED), ("FAILED", Outcome.FAILED)]
)
def test_result_wins_over_the_pod_that_exited_after_writing_it(
    result: str, outcome: Outcome
) -> None:
    harness = running()
    harness.write_result(result)
    harness.pod_changes(phase="Succeeded" if result == "FINISHED" else "Failed")
    assert after(harness, harness.decide()).status.attempts[-1].outcome == outcome


# --- attempt timeout, active deadline, lateAfter ------------------------------------------


def test_attempt_timeout_counts_from_the_acquire_time_on_the_wall_clock() -> None:
    harness = running(spec={"attemptTimeout": "30m"})
    deadline = CREATED + timedelta(minutes=30)  # acquire-time + attemptTimeout
    heartbeat_until(harness, deadline)

    harness.advance_to(MONOTONIC_START + 30 * 60 - TICK)
    early = harness.decide()
    assert early.actions == ()
    assert early.wake_at == pytest.approx(MONOTONIC_START + 30 * 60)

    harness.advance_to(MONOTONIC_START + 30 * 60)
    decision = harness.decide()
    assert decision.why == "AttemptTimeout -> hand out epoch 2"
    task, record = reassigned(harness, decision)
    assert record.outcome == Outcome.ATTEMPT_TIMEOUT
    assert task.status.phase == Phase.ASSIGNED
    assert task.status.next_attempt_time is None


def test_attempt_timeout_is_not_reset_by_an_operator_restart() -> None:
    harness = running(spec={"attemptTimeout": "10m"})
    heartbeat_until(harness, CREATED + timedelta(minutes=9))
    harness.restart_operator()
    heartbeat_until(harness, CREATED + timedelta(minutes=10))
    harness.advance_to(MONOTONIC_START + 600)
    assert harness.decide().why == "AttemptTimeout -> hand out epoch 2"


def test_active_deadline_stops_the_running_attempt_and_fails_the_task() -> None:
    harness = running(spec={"activeDeadline": "1h"})
    deadline = CREATED + timedelta(hours=1)
    heartbeat_until(harness, deadline)
    assert harness.decide().wake_at == pytest.approx(MONOTONIC_START + 3600)

    harness.advance_to(MONOTONIC_START + 3600)
    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "DeletePod", "RecordEvent"]
    task = after(harness, decision)
    assert task.status.phase == Phase.FAILED
    assert task.status.attempts[-1].outcome == Outcome.DEADLINE_EXCEEDED
    assert condition(task, CONDITION_COMPLETE).reason == "Failed"
    event = only(decision, RecordEvent)
    assert (event.type, event.reason) == ("Warning", "DeadlineExceeded")
    assert event.message == "spec.activeDeadline of 1h passed"


def test_active_deadline_fails_a_task_that_waits_for_its_next_attempt() -> None:
    harness = handed_out(
        spec={
            "activeDeadline": "10m",
            "retry": {"backoff": {"initial": "1h", "max": "2h", "jitter": 0}},
        }
    )
    harness.pod_changes(phase="Failed")
    harness.settle()  # PodFailed, backing off for an hour; lease released
    assert harness.task.lease.holder is None
    assert harness.decide().wake_at == MONOTONIC_START + 600  # the deadline comes first

    harness.advance_to(MONOTONIC_START + 600)
    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    task = after(harness, decision)
    assert task.status.phase == Phase.FAILED
    assert [a.outcome for a in task.status.attempts] == [Outcome.POD_FAILED]
    assert only(decision, RecordEvent).reason == "DeadlineExceeded"


def test_task_past_its_active_deadline_is_never_handed_out() -> None:
    harness = Harness.new(spec={"activeDeadline": "1m"})
    harness.advance(61)
    steps = harness.settle()
    assert harness.task.status.phase == Phase.FAILED
    assert harness.created_pods == []
    assert not any(of_type(d, PatchLease) for d in steps)


def test_late_task_gets_a_late_condition_and_event_once_and_goes_on() -> None:
    harness = running(spec={"lateAfter": "10m"})
    late_at = CREATED + timedelta(minutes=10)
    heartbeat_until(harness, late_at)
    assert harness.decide().wake_at == pytest.approx(MONOTONIC_START + 600)

    harness.advance_to(MONOTONIC_START + 600)
    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    assert set(status_patch(decision)) == {"conditions"}
    late = condition(after(harness, decision), CONDITION_LATE)
    assert (late.status, late.reason) == ("True", "LateAfterExceeded")
    event = only(decision, RecordEvent)
    assert (event.type, event.reason) == ("Warning", "Late")
    harness.perform(decision)
    assert harness.task.status.phase == Phase.RUNNING

    later = len(harness.decisions)
    heartbeat_until(harness, late_at + timedelta(minutes=30))
    harness.write_result("FINISHED")
    harness.settle()
    finished = harness.task
    assert finished.status.phase == Phase.SUCCEEDED
    events = [a.reason for d in harness.decisions[later:] for a in of_type(d, RecordEvent)]
    assert "Late" not in events  # once is enough


def test_late_condition_comes_before_the_first_hand_out_and_does_not_block_it() -> None:
    harness = Harness.new(spec={"lateAfter": "1m"})
    harness.advance(120)  # the operator sees the task only now
    steps = harness.settle()
    assert [d.why for d in steps[:1]] == [""]
    assert kinds(steps[0]) == ["PatchStatus", "RecordEvent"]
    assert steps[1].why == "hand out epoch 1"
    assert condition(harness.task, CONDITION_LATE).status == "True"


# --- cancel and final phases --------------------------------------------------------------


@pytest.mark.parametrize("acknowledged", [False, True], ids=["assigned", "running"])
def test_cancel_of_an_active_task_deletes_the_runner_and_ends_canceled(acknowledged: bool) -> None:
    harness = running() if acknowledged else handed_out()
    harness.set_spec(cancel=True)

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "DeletePod", "RecordEvent"]
    assert only(decision, DeletePod) == DeletePod("demo-1")
    task = after(harness, decision)
    assert task.status.phase == Phase.CANCELED
    assert task.status.attempts[-1].outcome == Outcome.CANCELED
    assert task.status.completion_time == harness.clock.wall

    harness.perform(decision)
    assert harness.decide().actions == (RELEASE,)
    harness.perform(harness.decide())
    assert harness.decide().actions == ()


def test_cancel_of_an_active_task_whose_pod_is_gone_does_not_delete_it_again() -> None:
    harness = running()
    harness.pod_changes(gone=True)
    harness.set_spec(cancel=True)
    decision = harness.decide()
    assert after(harness, decision).status.phase == Phase.CANCELED
    assert of_type(decision, DeletePod) == []


def test_cancel_of_a_task_never_handed_out_ends_canceled_without_a_lease_or_pod() -> None:
    harness = Harness.new(spec={"cancel": True})
    steps = harness.settle()
    assert kinds(steps[0]) == ["PatchStatus", "RecordEvent"]
    assert harness.task.status.phase == Phase.CANCELED
    assert harness.task.lease.epoch == 0
    assert harness.created_pods == []


def test_cancel_of_a_task_waiting_for_its_next_attempt_ends_canceled() -> None:
    harness = handed_out(spec={"retry": {"backoff": {"initial": "1h", "max": "1h"}}})
    harness.pod_changes(phase="Failed")
    harness.settle()
    harness.set_spec(cancel=True)

    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    task = after(harness, decision)
    assert task.status.phase == Phase.CANCELED
    assert task.status.next_attempt_time is None
    assert [a.outcome for a in task.status.attempts] == [Outcome.POD_FAILED]


def final_task(phase: Phase, *, holder: str | None, cancel: bool) -> Task:
    return make_task(
        holder=holder,
        epoch=1,
        acquire_time=CREATED,
        spec={"cancel": cancel, "activeDeadline": "1m", "lateAfter": "1m", "attemptTimeout": "1m"},
        # What the operator writes with a final phase: Complete says so.
        status={
            "phase": phase.value,
            "attempt": 1,
            "epoch": 1,
            "conditions": [
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": phase.value,
                    "lastTransitionTime": iso(CREATED),
                }
            ],
        },
    )


@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("phase", FINAL_PHASES)
def test_final_task_that_still_names_a_holder_only_releases_the_lease(
    phase: Phase, cancel: bool
) -> None:
    task = final_task(phase, holder="demo-1", cancel=cancel)
    clock = Clock(monotonic=MONOTONIC_START, wall=CREATED + timedelta(hours=2))
    pod = PodState(name="demo-1", epoch=1, phase="Running")
    decision = decide(task, sighting=observe(None, task, now=0.0), pod=pod, clock=clock)
    assert decision.actions == (RELEASE,)
    assert decision.wake_at is None


@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("phase", FINAL_PHASES)
def test_final_task_without_a_holder_needs_nothing(phase: Phase, cancel: bool) -> None:
    task = final_task(phase, holder=None, cancel=cancel)
    clock = Clock(monotonic=MONOTONIC_START, wall=CREATED + timedelta(hours=2))
    decision = decide(task, sighting=observe(None, task, now=0.0), pod=None, clock=clock)
    assert (decision.actions, decision.wake_at) == ((), None)


# --- pool tasks ---------------------------------------------------------------------------


def test_pool_task_is_offered_to_its_worker_group_and_says_so_once() -> None:
    harness = Harness.new(spec={"template": None, "workerGroup": "etl"})
    steps = harness.settle()
    assert kinds(steps[0]) == ["PatchLease", "PatchStatus"]
    offer = only(steps[0], PatchLease)
    assert offer.labels == {WORKER_GROUP_LABEL: "etl", CLAIMABLE_LABEL: "true"}
    assert offer.annotations[EPOCH_ANNOTATION] == "0"  # a claim can `test` it
    leased = condition(harness.task, CONDITION_LEASED)
    assert (leased.status, leased.reason) == ("False", "WaitingForRunner")
    assert "etl" in leased.message
    assert (steps[1].actions, steps[1].wake_at) == ((), None)
    assert harness.task.lease.epoch == 0


def test_pool_runner_claim_is_recorded_without_creating_a_pod() -> None:
    harness = Harness.new(
        spec={"template": None, "workerGroup": "etl"},
        holder="pool-runner-7",
        epoch=1,
        acquire_time=CREATED,
    )  # the runner claimed the task by compare-and-swap on the lease annotations
    decision = harness.decide()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    harness.perform(decision)
    task = harness.task
    assert task.status.phase == Phase.ASSIGNED
    assert (task.status.holder, task.status.epoch, task.status.attempt) == ("pool-runner-7", 1, 1)
    harness.report(percent=1)
    assert harness.step().why == "acknowledged"


def claim(harness: Harness, runner: str) -> None:
    """A pool runner's compare-and-swap claim, as tasklease.runner.pool writes it."""
    metadata = harness.body["metadata"]
    annotations = metadata.setdefault("annotations", {})
    assert metadata.get("labels", {}).get(CLAIMABLE_LABEL) == "true", "not claimable"
    epoch = int(annotations[EPOCH_ANNOTATION])
    annotations.update(
        {
            HOLDER_ANNOTATION: runner,
            EPOCH_ANNOTATION: str(epoch + 1),
            ACQUIRE_TIME_ANNOTATION: iso(harness.clock.wall),
        }
    )
    del metadata["labels"][CLAIMABLE_LABEL]
    harness.observe()


def pool_harness(**spec: Any) -> Harness:
    harness = Harness.new(spec={"template": None, "workerGroup": "etl", **spec})
    harness.settle()
    return harness


def test_pool_task_expiry_returns_it_to_the_pool_and_counts_the_attempt() -> None:
    harness = pool_harness(reportProgressTimeout="30s", ackTimeout="30s")
    claim(harness, "warm-a")
    harness.settle()
    harness.report(percent=10)
    harness.settle()
    assert harness.task.status.phase == Phase.RUNNING
    harness.advance(30)
    harness.settle()
    task = harness.task
    assert task.status.phase == Phase.PENDING
    assert task.lease.holder is None and task.lease.epoch == 1
    assert task.labels[CLAIMABLE_LABEL] == "true"
    assert [a.outcome for a in task.status.attempts] == [Outcome.PROGRESS_TIMEOUT]
    assert harness.created_pods == [] and harness.deleted_pods == []  # never its pods
    claim(harness, "warm-b")
    harness.settle()
    assert (harness.task.status.epoch, harness.task.status.attempt) == (2, 2)


def test_pool_runner_release_ends_the_attempt_as_released() -> None:
    harness = pool_harness()
    claim(harness, "leaving")
    harness.settle()
    harness.report(percent=10)
    harness.settle()
    del harness.body["metadata"]["annotations"][HOLDER_ANNOTATION]  # the runner's release
    harness.settle()
    task = harness.task
    assert task.status.attempts[-1].outcome == Outcome.RELEASED
    assert task.labels[CLAIMABLE_LABEL] == "true"


@pytest.mark.parametrize("state", ["gone", "terminated"])
def test_lost_pool_runner_sends_its_task_back_at_once(state: str) -> None:
    harness = pool_harness(reportProgressTimeout="10m", ackTimeout="10m")
    claim(harness, "doomed")
    harness.settle()
    harness.report(percent=10)
    harness.settle()
    runner = PodState(
        name="doomed",
        epoch=1,
        phase="Failed" if state == "terminated" else "Running",
        gone=state == "gone",
        message="pool runner doomed's Lease expired",
    )
    decision = decide(
        harness.task, sighting=harness.observe(), pod=runner, clock=harness.clock.now()
    )
    assert decision.ended == Outcome.RUNNER_LOST and decision.retrying
    assert not of_type(decision, DeletePod)  # a pool runner is not ours to delete


def test_pool_attempt_timeout_ignores_the_runners_acquire_time() -> None:
    # A pool runner writes its claim's acquire time itself; one in the future must not
    # buy it a longer attempt. The operator times the attempt from its own sighting.
    harness = pool_harness(attemptTimeout="30s")
    claim(harness, "sly")
    harness.body["metadata"]["annotations"][ACQUIRE_TIME_ANNOTATION] = "2099-01-01T00:00:00Z"
    harness.settle()
    assert harness.task.status.attempts[-1].start_time <= harness.clock.wall
    harness.report(percent=1)
    harness.settle()
    harness.advance(29)
    harness.report(percent=2)
    harness.settle()
    assert harness.task.status.phase == Phase.RUNNING
    harness.advance(1)
    harness.settle()
    assert harness.task.status.attempts[0].outcome == Outcome.ATTEMPT_TIMEOUT


def test_pool_task_backing_off_is_not_claimable() -> None:
    harness = pool_harness(retry={"maxAttempts": 3, "backoff": {"initial": "1m", "jitter": 0}})
    claim(harness, "flaky")
    harness.settle()
    harness.write_result("FAILED", errorId="Transient")
    harness.settle()
    assert CLAIMABLE_LABEL not in harness.task.labels
    harness.advance(61)
    harness.settle()
    assert harness.task.labels[CLAIMABLE_LABEL] == "true"


# --- stale pods ---------------------------------------------------------------------------


def task_at_epoch_2(
    *,
    phase: Phase = Phase.RUNNING,
    first_outcome: Outcome | None = Outcome.ACK_TIMEOUT,
    second_outcome: Outcome | None = None,
) -> Task:
    """Epoch 2 held by demo-2; epoch 1 (demo-1) ended with `first_outcome` (None: no record)."""
    attempts: list[dict[str, Any]] = []
    if first_outcome is not None:
        attempts.append(
            {
                "attempt": 1,
                "epoch": 1,
                "holder": "demo-1",
                "startTime": iso(CREATED),
                "endTime": iso(at(120)),
                "outcome": first_outcome.value,
            }
        )
    second: dict[str, Any] = {
        "attempt": 2,
        "epoch": 2,
        "holder": "demo-2",
        "startTime": iso(at(120)),
    }
    if second_outcome is not None:
        second |= {"endTime": iso(at(500)), "outcome": second_outcome.value}
    attempts.append(second)
    return make_task(
        holder="demo-2",
        epoch=2,
        acquire_time=at(120),
        status={"phase": phase.value, "attempt": 2, "epoch": 2, "attempts": attempts},
    )


def old_pod(**changes: Any) -> PodState:
    return PodState(name="demo-1", epoch=1, phase=changes.pop("phase", "Running"), **changes)


def holder_pod(**changes: Any) -> PodState:
    return PodState(name="demo-2", epoch=2, phase=changes.pop("phase", "Running"), **changes)


STALE_CASES = [
    pytest.param({}, old_pod(), True, id="old-epoch-running"),
    pytest.param({}, old_pod(phase="Pending"), True, id="old-epoch-pending"),
    pytest.param({}, holder_pod(), False, id="current-holder"),
    pytest.param({"phase": Phase.ASSIGNED}, holder_pod(phase="Pending"), False, id="pre-ack"),
    pytest.param({}, old_pod(phase="Failed"), False, id="old-epoch-failed"),
    pytest.param({}, old_pod(phase="Succeeded"), False, id="old-epoch-succeeded"),
    pytest.param({}, old_pod(terminating=True), False, id="old-epoch-terminating"),
    pytest.param({}, old_pod(gone=True), False, id="old-epoch-gone"),
    pytest.param({}, PodState(name="demo-3", epoch=3), False, id="epoch-ahead-of-our-view"),
    # It reported FAILED minutes ago and still runs: past RUNNER_EXIT_GRACE, it is stopped.
    pytest.param(
        {"first_outcome": Outcome.FAILED}, old_pod(), True, id="old-runner-hung-after-failing"
    ),
    pytest.param({"first_outcome": None}, old_pod(), True, id="old-epoch-without-record"),
    pytest.param({}, PodState(name="impostor", epoch=2), True, id="current-epoch-not-holder"),
    pytest.param(
        {"phase": Phase.SUCCEEDED, "second_outcome": Outcome.SUCCEEDED},
        holder_pod(),
        False,
        id="holder-after-success",
    ),
    pytest.param(
        {"phase": Phase.SKIPPED, "second_outcome": Outcome.SKIPPED},
        holder_pod(),
        False,
        id="holder-after-skip",
    ),
    pytest.param(
        {"phase": Phase.PENDING, "second_outcome": Outcome.PROGRESS_TIMEOUT},
        holder_pod(),
        True,
        id="holder-after-progress-timeout",
    ),
    pytest.param(
        {"phase": Phase.CANCELED, "second_outcome": Outcome.CANCELED},
        holder_pod(),
        True,
        id="holder-after-cancel",
    ),
    pytest.param(
        {"phase": Phase.FAILED, "second_outcome": Outcome.DEADLINE_EXCEEDED},
        holder_pod(),
        True,
        id="holder-after-deadline",
    ),
]


@pytest.mark.parametrize(("task_state", "pod", "stale"), STALE_CASES)
def test_stale_pod(task_state: dict[str, Any], pod: PodState, stale: bool) -> None:
    # A moment after the second attempt ended, well within RUNNER_EXIT_GRACE.
    assert stale_pod(task_at_epoch_2(**task_state), pod, now=at(505)) is stale


def test_new_holders_pod_seen_before_its_assigned_status_is_not_stale() -> None:
    # Pods and Tasks come on two watch streams: the new pod can be seen while the cached
    # Task shows the lease written but not yet the Assigned status. Found by the scale
    # benchmark, where hand-outs under load deleted their own fresh pods.
    ended = task_at_epoch_2()
    first = ended.status.attempts[0].model_dump(mode="json", by_alias=True, exclude_none=True)
    task = make_task(
        holder="demo-2",
        epoch=2,
        acquire_time=at(120),
        status={"phase": "Pending", "attempt": 1, "epoch": 1, "attempts": [first]},
    )
    assert stale_pod(task, holder_pod(phase="Pending"), now=at(130)) is False
    assert stale_pod(task, PodState(name="impostor", epoch=2), now=at(130)) is True


@pytest.mark.parametrize("outcome", [Outcome.SUCCEEDED, Outcome.SKIPPED, Outcome.FAILED])
def test_runner_that_reported_but_never_exits_is_stopped_after_the_grace(
    outcome: Outcome,
) -> None:
    task = task_at_epoch_2(phase=Phase.SUCCEEDED, second_outcome=outcome)
    assert when_to_stop_pod(task, holder_pod()) == at(500) + RUNNER_EXIT_GRACE
    assert not stale_pod(task, holder_pod(), now=at(500) + RUNNER_EXIT_GRACE - timedelta(seconds=1))
    assert stale_pod(task, holder_pod(), now=at(500) + RUNNER_EXIT_GRACE)


# --- conditions ---------------------------------------------------------------------------

T1 = datetime(2024, 1, 1, 1, tzinfo=UTC)
T2 = datetime(2024, 1, 1, 2, tzinfo=UTC)


def leased(status: Any, *, reason: str, now: datetime, conditions: Any = ()) -> Any:
    return set_condition(
        list(conditions),
        type_=CONDITION_LEASED,
        status=status,
        reason=reason,
        message=reason.lower(),
        now=now,
        generation=2,
    )


def test_condition_keeps_its_transition_time_while_its_status_stays() -> None:
    first = leased("True", reason="Assigned", now=T1)
    [updated] = leased("True", reason="Running", now=T2, conditions=first)
    assert updated.last_transition_time == T1
    assert (updated.reason, updated.message, updated.observed_generation) == (
        "Running",
        "running",
        2,
    )


@pytest.mark.parametrize(
    ("before", "now_"), [("True", "False"), ("False", "True"), ("True", "Unknown")]
)
def test_condition_transition_time_moves_when_its_status_changes(before: str, now_: str) -> None:
    first = leased(before, reason="A", now=T1)
    [updated] = leased(now_, reason="B", now=T2, conditions=first)
    assert updated.last_transition_time == T2


def test_setting_one_condition_keeps_the_others() -> None:
    late = set_condition(
        [], type_=CONDITION_LATE, status="True", reason="Late", message="", now=T1, generation=1
    )
    both = leased("True", reason="Assigned", now=T1, conditions=late)
    updated = leased("False", reason="AckTimeout", now=T2, conditions=both)
    assert [c.type for c in updated] == [CONDITION_LATE, CONDITION_LEASED]
    assert updated[0] == late[0]


# --- small pieces -------------------------------------------------------------------------


def test_decision_writes_only_when_it_has_more_than_events() -> None:
    event = RecordEvent("Normal", "X", "y")
    assert not Decision().writes
    assert not Decision(actions=(event,)).writes
    assert Decision(actions=(event, DeletePod("p"))).writes


def test_decide_is_a_pure_function_of_its_inputs() -> None:
    harness = Harness.new()
    body_before = json.dumps(harness.body, sort_keys=True)
    task, sighting, clock = harness.task, harness.observe(), harness.clock.now()
    first = decide(task, sighting=sighting, pod=None, clock=clock)
    second = decide(task, sighting=sighting, pod=None, clock=clock)
    assert first == second
    assert task == harness.task
    assert json.dumps(harness.body, sort_keys=True) == body_before


def test_clock_maps_a_wall_time_to_the_monotonic_reading() -> None:
    clock = Clock(monotonic=100.0, wall=CREATED)
    assert clock.monotonic_at(CREATED + timedelta(seconds=30)) == 130.0
    assert clock.monotonic_at(CREATED - timedelta(seconds=30)) == 70.0


# --- whole scenarios ----------------------------------------------------------------------


def test_scenario_ack_timeout_then_progress_timeout_then_success() -> None:
    harness = Harness.new()
    assert [d.why for d in harness.settle()] == [
        "hand out epoch 1",
        "record the hand-out of epoch 1",
        "waiting for acknowledgement",
    ]

    # Attempt 1: the pod runs but never reports.
    harness.pod_changes(phase="Running")
    harness.advance(ACK_S)
    assert [d.why for d in harness.settle()] == [
        "AckTimeout -> hand out epoch 2",
        "record the hand-out of epoch 2",
        "waiting for acknowledgement",
    ]

    # Attempt 2: acknowledges, reports a checkpoint, then hangs.
    harness.pod_changes(phase="Running")
    harness.advance(20)
    harness.report(percent=10, checkpoint={"row": 100})
    assert harness.settle()[0].why == "acknowledged"
    harness.advance(60)
    harness.report(percent=20, checkpoint={"row": 200})
    harness.settle()
    harness.advance(PROGRESS_S - 1)
    assert harness.settle()[0].actions == ()
    harness.advance(1)
    steps = harness.settle()
    assert [d.why for d in steps] == [
        "ProgressTimeout -> hand out epoch 3",
        "record the hand-out of epoch 3",
        "waiting for acknowledgement",
    ]
    create = only(steps[0], CreatePod)
    assert json.loads(env(create)[ENV_CHECKPOINT]) == {"row": 200}
    assert env(create)[ENV_ATTEMPT] == "3"

    # Attempt 3: succeeds.
    harness.advance(3)
    harness.report(percent=0)
    harness.settle()
    harness.advance(30)
    harness.report(percent=100)
    harness.write_result("FINISHED")
    assert [d.why for d in harness.settle()] == ["Succeeded -> Succeeded", "release lease", ""]

    task = harness.task
    status = task.status
    assert status.phase == Phase.SUCCEEDED
    assert [a.outcome for a in status.attempts] == [
        Outcome.ACK_TIMEOUT,
        Outcome.PROGRESS_TIMEOUT,
        Outcome.SUCCEEDED,
    ]
    assert [a.epoch for a in status.attempts] == [1, 2, 3]
    assert [a.holder for a in status.attempts] == ["demo-1", "demo-2", "demo-3"]
    assert all(a.end_time is not None for a in status.attempts)
    assert (status.attempt, status.epoch, status.holder) == (3, 3, None)
    assert (task.lease.holder, task.lease.epoch) == (None, 3)
    assert status.start_time == CREATED
    assert status.completion_time == harness.clock.wall
    assert harness.created_pods == ["demo-1", "demo-2", "demo-3"]
    assert harness.deleted_pods == ["demo-1", "demo-2"]
    assert condition(task, CONDITION_COMPLETE).status == "True"


def test_scenario_with_two_attempts_allowed_ends_failed() -> None:
    harness = Harness.new(spec={"retry": {"maxAttempts": 2}})
    harness.settle()
    harness.advance(ACK_S)
    harness.settle()  # attempt 1: AckTimeout; attempt 2 handed out
    harness.advance(10)
    harness.pod_changes(phase="Failed", reason="Evicted", message="The node was low on memory.")

    steps = harness.settle()
    assert [d.why for d in steps] == ["PodFailed -> Failed", "release lease", ""]
    assert of_type(steps[0], DeletePod) == []  # the evicted pod keeps its status for people
    event = only(steps[0], RecordEvent)
    assert (event.type, event.reason) == ("Warning", "PodFailed")

    task = harness.task
    assert task.status.phase == Phase.FAILED
    assert [a.outcome for a in task.status.attempts] == [Outcome.ACK_TIMEOUT, Outcome.POD_FAILED]
    assert [a.epoch for a in task.status.attempts] == [1, 2]
    message = condition(task, CONDITION_COMPLETE).message
    assert message.startswith("retries exhausted after 2 attempt(s); last: PodFailed:")
    assert "Evicted" in message
    assert harness.created_pods == ["demo-1", "demo-2"]
    assert task.lease.holder is None

    harness.advance(3600)
    assert harness.settle()[0].actions == ()


def test_attempt_history_keeps_only_the_latest_attempts() -> None:
    harness = Harness.new(spec={"retry": {"maxAttempts": 25}})
    harness.settle()
    for _ in range(25):
        harness.advance(1)
        harness.pod_changes(gone=True)
        harness.settle()
    status = harness.task.status
    assert status.phase == Phase.FAILED
    assert status.attempt == 25
    assert len(status.attempts) == MAX_ATTEMPT_HISTORY
    assert [a.attempt for a in status.attempts] == list(range(6, 26))
    assert len(harness.created_pods) == 25


# --- invariants over random histories -----------------------------------------------------

POD_CHANGES: list[dict[str, Any]] = [
    {"phase": "Running"},
    {"phase": "Failed", "reason": "Error"},
    {"phase": "Failed", "reason": "Evicted"},
    {"phase": "Succeeded"},
    {"gone": True},
    {"terminating": True},
]
EVENTS = [
    "wait",
    "wake",
    "report",
    "relist",
    "result",
    "zombie",
    "pod",
    "deleted",
    "cancel",
    "restart",
    "crash",
]
WEIGHTS = [6, 6, 8, 2, 2, 1, 3, 2, 0.3, 1, 1]


def random_spec(rng: random.Random) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ackTimeout": rng.choice(["30s", "2m"]),
        "reportProgressTimeout": rng.choice(["2m", "5m", "15m"]),
        "retry": {
            "maxAttempts": rng.randint(1, 4),
            "backoff": {"initial": rng.choice(["0s", "10s", "5m"]), "jitter": rng.choice([0, 0.3])},
            "nonRetryableErrors": ["Fatal"],
        },
    }
    for key, values in (
        ("attemptTimeout", ["10m", "1h"]),
        ("activeDeadline", ["30m", "3h"]),
        ("lateAfter", ["5m", "1h"]),
    ):
        if rng.random() < 0.3:
            spec[key] = rng.choice(values)
    return spec


def random_event(harness: Harness, rng: random.Random) -> None:
    lease = harness.task.lease
    event = rng.choices(EVENTS, WEIGHTS)[0]
    if event == "wait":
        harness.advance(rng.choice([1, 29.5, 60, 119, 120, 121, 300, 899, 900, 1800, 7200]))
    elif event == "wake":
        wake_at = harness.wake_at()
        if wake_at is not None:
            harness.advance_to(max(wake_at - rng.choice([TICK, 0, 0]), harness.clock.monotonic))
    elif event == "report" and lease.holder:
        harness.report(percent=rng.randint(0, 100), checkpoint={"n": rng.randint(0, 3)})
    elif event == "relist":
        harness.observe()
    elif event == "result" and lease.holder:
        harness.write_result(
            rng.choice(["FINISHED", "FAILED", "FALSE"]),
            errorId=rng.choice([None, "Transient", "Fatal"]),
        )
    elif event == "zombie" and lease.epoch > 1:
        old = rng.randint(1, lease.epoch - 1)
        if rng.random() < 0.5:
            harness.report(epoch=old, percent=99)
        else:
            harness.write_result("FINISHED", epoch=old)
    elif event == "pod" and harness.pod() is not None:
        harness.pod_changes(**rng.choice(POD_CHANGES))
    elif event == "deleted":
        for pod in list(harness.pods.values()):
            if pod.terminating:
                harness.pod_changes(pod.name, gone=True)
    elif event == "cancel":
        harness.set_spec(cancel=True)
    elif event == "restart":
        harness.restart_operator()
    elif event == "crash":
        decision = harness.decide()
        if decision.actions:
            harness.perform(decision, crash_after=rng.randrange(len(decision.actions)))
        harness.restart_operator()


def check_state(task: Task, *, max_attempts: int) -> None:
    status, lease = task.status, task.lease
    open_attempts = [a for a in status.attempts if a.end_time is None]
    assert len(open_attempts) == (1 if status.phase in ACTIVE_PHASES else 0)
    assert status.attempt <= max_attempts
    assert status.attempt == len(status.attempts)
    assert [a.attempt for a in status.attempts] == list(range(1, status.attempt + 1))
    epochs = [a.epoch for a in status.attempts]
    assert epochs == sorted(set(epochs))
    assert status.epoch <= lease.epoch
    if lease.epoch > status.epoch:
        # A hand-out wrote the lease and the status has not caught up: the lease stands
        # for an attempt the status does not show yet, and how the open attempt ended is
        # on the lease.
        assert lease.holder is not None
        if status.phase in ACTIVE_PHASES:
            assert task.previous_attempt is not None
            assert task.previous_attempt.epoch == status.attempts[-1].epoch
    elif status.phase in ACTIVE_PHASES:
        current = status.attempts[-1]
        assert lease.holder == status.holder == current.holder
        assert lease.epoch == status.epoch == current.epoch
    for record in status.attempts:
        assert (record.end_time is None) == (record.outcome is None)


def check_step(before: Task, decision: Decision, after_: Task) -> None:
    assert after_.lease.epoch >= before.lease.epoch
    assert after_.status.epoch >= before.status.epoch
    for action in of_type(decision, PatchLease):
        epoch = action.annotations.get(EPOCH_ANNOTATION)
        if epoch is not None:
            assert int(epoch) == before.lease.epoch + 1  # a hand-out takes the next token
    if before.status.phase.is_final:
        # Only the lease is given up, or the generation of a spec changed since observed.
        writes = [a for a in decision.actions if not isinstance(a, RecordEvent)]
        assert writes in ([], [RELEASE]) or decision.why.startswith("observe generation")
        assert _unobserved(after_.status) == _unobserved(before.status)
    if not decision.actions and not after_.status.phase.is_final:
        assert decision.wake_at is not None, "an unfinished task must ask to be woken"


def _unobserved(status: TaskStatus) -> TaskStatus:
    """The status without the generations it observed."""
    conditions = [c.model_copy(update={"observed_generation": None}) for c in status.conditions]
    return status.model_copy(update={"observed_generation": None, "conditions": conditions})


def check_pods(harness: Harness) -> None:
    """No runner is left working that does not hold the lease, unless it reported its end."""
    task = harness.task
    outcomes = {a.epoch: a.outcome for a in task.status.attempts}
    for pod in harness.pods.values():
        if pod.gone or pod.terminating or pod.terminated:
            continue
        holds = (
            task.status.phase in ACTIVE_PHASES
            and pod.epoch == task.lease.epoch
            and pod.name == task.lease.holder
        )
        assert holds or outcomes.get(pod.epoch) in RUNNER_REPORTED, pod
    assert len(harness.created_pods) == len(set(harness.created_pods))


@pytest.mark.parametrize("seed", range(150))
def test_invariants_hold_over_random_histories(seed: int) -> None:
    rng = random.Random(seed)
    spec = random_spec(rng)
    max_attempts = spec["retry"]["maxAttempts"]
    harness = Harness.new(spec=spec)
    for _ in range(60):
        before_event = harness.task
        random_event(harness, rng)
        assert harness.task.lease.epoch >= before_event.lease.epoch
        check_state(harness.task, max_attempts=max_attempts)
        for _ in range(8):  # the reconciler's bound on steps per reconcile
            before = harness.task
            decision = harness.step()
            check_step(before, decision, harness.task)
            check_state(harness.task, max_attempts=max_attempts)
            if not decision.actions:
                break
        else:
            pytest.fail(f"seed {seed}: no quiescence: {[d.why for d in harness.decisions[-8:]]}")
        check_pods(harness)
        assert len(harness.created_pods) <= max_attempts
        if harness.task.status.phase.is_final:
            assert harness.task.lease.holder is None


# --- the status catching up with the lease ------------------------------------------------


def test_a_lease_moved_on_by_hand_closes_the_open_attempt_as_released() -> None:
    harness = running()
    # Someone with patch rights bumps the epoch without the operator's record of the end.
    harness.body["metadata"]["annotations"].update(
        {EPOCH_ANNOTATION: "2", HOLDER_ANNOTATION: "demo-2"}
    )
    decision = harness.decide()
    # Nobody in this process made demo-2's pod: it is made now (AlreadyExists is fine).
    assert decision.why == "finish the hand-out of epoch 2"
    assert only(decision, CreatePod).manifest["metadata"]["name"] == "demo-2"
    task = after(harness, decision)
    first, second = task.status.attempts
    assert (first.outcome, first.message) == (Outcome.RELEASED, "the lease was given to epoch 2")
    assert (second.epoch, second.holder, second.end_time) == (2, "demo-2", None)


def test_a_garbled_previous_attempt_annotation_reads_as_absent() -> None:
    task = make_task(
        metadata={"annotations": {PREVIOUS_ATTEMPT_ANNOTATION: '{"epoch": "not a number"'}}
    )
    assert task.previous_attempt is None


# --- observed generation -------------------------------------------------------------------


def test_a_spec_change_on_a_final_task_is_observed_once() -> None:
    """`kubectl wait --for=condition=Complete` reads a condition only at the current
    generation: a spec edited after the end gets the status and every condition re-stamped,
    their transition times kept, and nothing else."""
    harness = running()
    harness.write_result("FINISHED")
    harness.settle()
    done = harness.task
    assert done.status.phase == Phase.SUCCEEDED and done.status.observed_generation == 1
    harness.advance(60)
    harness.set_spec(priority=5)
    decision = harness.step()
    assert decision.why == "observe generation 2" and kinds(decision) == ["PatchStatus"]
    task = harness.task
    assert task.status.observed_generation == 2
    assert {c.type: c.observed_generation for c in task.status.conditions} == {
        c.type: 2 for c in done.status.conditions
    }
    assert [c.last_transition_time for c in task.status.conditions] == [
        c.last_transition_time for c in done.status.conditions
    ]
    assert harness.step().actions == ()  # once


def test_a_spec_change_that_changes_no_decision_is_observed_on_a_running_task() -> None:
    harness = running()
    harness.set_spec(priority=5)
    decision = harness.step()
    assert decision.why == "observe generation 2"
    assert harness.task.status.observed_generation == 2
    assert harness.task.status.phase == Phase.RUNNING
    assert harness.step().actions == ()


# --- a status written by someone else -----------------------------------------------------


@pytest.mark.parametrize("written", [Phase.SUCCEEDED, Phase.FAILED, Phase.PENDING])
def test_a_foreign_phase_on_a_running_task_is_restored_and_steers_nothing(written: Phase) -> None:
    """`kubectl patch --subresource=status` of status.phase on a running task: the lease
    and the runner's result decide; the live pod keeps its lease, no new epoch is handed
    out, and the phase is put back with a Warning."""
    harness = running()
    harness.body["status"]["phase"] = written.value
    decision = harness.step()
    assert kinds(decision) == ["PatchStatus", "RecordEvent"]
    assert harness.task.status.phase == Phase.RUNNING
    assert only(decision, RecordEvent).reason == "StatusOverwritten"
    harness.settle()
    task = harness.task
    assert (task.lease.epoch, task.lease.holder) == (1, "demo-1")
    assert harness.deleted_pods == [] and harness.created_pods == ["demo-1"]
    assert task.status.phase == Phase.RUNNING
    harness.write_result("FINISHED")
    harness.settle()
    finished = harness.task
    assert finished.status.phase == Phase.SUCCEEDED  # the result decides, as ever


def test_a_foreign_final_phase_on_a_task_never_handed_out_is_restored() -> None:
    harness = Harness.new()
    harness.body.setdefault("status", {})["phase"] = Phase.SUCCEEDED.value
    decision = harness.step()
    assert only(decision, RecordEvent).reason == "StatusOverwritten"
    assert harness.task.status.phase == Phase.PENDING
    assert harness.step().why == "hand out epoch 1"  # and the task runs


# --- a pod the API server refuses to create -----------------------------------------------


def refused_at_hand_out(*, invalid: bool, retry_in_s: float = 2.0) -> Harness:
    """Epoch 1 handed out; the API server refused its pod (the reconciler's PodState)."""
    harness = Harness.new()
    decision = harness.decide()
    harness.perform(decision, crash_after=1)  # the lease write; the pod was refused
    harness.pods["demo-1"] = PodState.refused(
        "demo-1",
        1,
        message="HTTP 422: spec.containers[0].image: Required value",
        invalid=invalid,
        retry_at=None if invalid else harness.clock.monotonic + retry_in_s,
    )
    assert harness.step().why == "record the hand-out of epoch 1"
    return harness


def test_an_invalid_pod_fails_the_task_at_once_with_the_api_servers_message() -> None:
    harness = refused_at_hand_out(invalid=True)
    decision = harness.step()
    task = harness.task
    assert task.status.phase == Phase.FAILED
    assert task.status.attempts[-1].outcome == Outcome.POD_REJECTED
    assert "spec.containers[0].image" in (task.status.attempts[-1].message or "")
    events = of_type(decision, RecordEvent)
    assert next(e.reason for e in events) == "FailedCreate"
    assert harness.created_pods == []
    assert of_type(decision, DeletePod) == []  # there is nothing to stop


def test_a_refused_pod_that_may_clear_is_shown_then_tried_again_after_its_backoff() -> None:
    harness = refused_at_hand_out(invalid=False, retry_in_s=2.0)
    shown = harness.step()
    assert shown.why == "say the pod could not be created"
    leased = next(c for c in harness.task.status.conditions if c.type == "Leased")
    assert leased.reason == "FailedCreate" and "Required value" in leased.message
    waiting = harness.step()
    assert waiting.why == "waiting to create the pod again" and not waiting.actions
    harness.advance(2.0)
    again = harness.step()
    assert kinds(again) == ["CreatePod"]
    assert harness.created_pods == ["demo-1"]


def test_a_refusal_that_lasts_past_the_ack_window_ends_the_attempt_saying_why() -> None:
    harness = refused_at_hand_out(invalid=False, retry_in_s=ACK_S * 2)
    harness.step()  # the condition
    harness.advance(ACK_S)
    decision = harness.step()
    assert decision.why.startswith("AckTimeout")
    harness.step()  # the status records the ended attempt after the next lease
    attempt = harness.task.status.attempts[0]
    assert attempt.outcome == Outcome.ACK_TIMEOUT
    assert "its pod could not be created: HTTP 422" in (attempt.message or "")


def test_a_lease_first_seen_leaves_out_of_its_age_what_this_process_could_not_see() -> None:
    # Handed out 100 s before the listing (the API server's record); the operator that lists
    # it lived through a 90 s outage in that time, when nobody could report.
    task = handed_out().task  # ackTimeout 2m, heartbeats 60 s: a grace of 60 s
    task.metadata[WRITTEN_KEY] = {
        "lease": "2026-12-06T10:00:00Z",
        "listed": "Sun, 06 Dec 2026 10:01:40 GMT",
    }
    blind = {99.0: 90.0}  # the age as `ages` gives it (Date's second taken off) -> blind s
    unaware = observe(None, task, now=1000.0)
    assert unaware.epoch_seen_at == 1000.0 - 60.0  # all but the grace is gone
    aware = observe(None, task, now=1000.0, blind_within=lambda s: blind[s])
    assert aware.epoch_seen_at == 1000.0 - 9.0  # only the 9 s it could see count
