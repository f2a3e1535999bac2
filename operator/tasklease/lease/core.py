"""The lease state machine: a Task, what the operator saw, and a clock in; writes out.

Nothing here performs I/O or knows kopf. `decide` looks at one Task, the state of its
current runner pod, and the operator's own sightings (on the operator's monotonic clock),
and returns the writes that move the Task on, plus when it wants to be asked again. The
reconciler executes the writes in order; every Task write is compare-and-swap on the
resourceVersion the decision was made from, so a decision taken on a stale view is refused
by the API server and simply taken again on a fresh one.

Lease expiry is measured from the moment the operator *observed* a new report
(`Sighting.report_seen_at`), never from the runner's `reportTime`: clocks of runner nodes
and of the operator may disagree (design invariant 3). A lease first seen in a listing
(after a start or a takeover) is taken to be as old as the API server's own record says
(`api/written.py`), but it always keeps a grace to report once more: an operator that
restarts faster than a window still expires dead leases, and one that restarts after an
API server outage does not take leases from runners that could not report through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from tasklease.api.durations import format_go_duration
from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    CLAIMABLE_LABEL,
    EPOCH_ANNOTATION,
    HOLDER_ANNOTATION,
    MAX_ATTEMPT_HISTORY,
    PREVIOUS_ATTEMPT_ANNOTATION,
    WORKER_GROUP_LABEL,
    AttemptRecord,
    Condition,
    DisruptionPolicy,
    Outcome,
    Phase,
    Progress,
    ReplacementPolicy,
    ResultStatus,
    Task,
)
from tasklease.api.times import parse_stamp, rfc3339_model
from tasklease.api.written import ages
from tasklease.lease.backoff import retry_delay
from tasklease.lease.pods import runner_pod, runner_pod_name

ACTIVE_PHASES = frozenset({Phase.ASSIGNED, Phase.RUNNING})
# PodState reasons of a pod that does not exist because its creation was refused: for a
# reason that may clear (quota, a ServiceAccount not there yet, Pod Security, the API server
# away), or because it is invalid (Event reasons too, as the Job controller's).
FAILED_CREATE = "FailedCreate"
POD_REJECTED = "PodRejected"

# Outcomes whose runner reported its own end: its pod is exiting by itself and keeps its
# logs; every other outcome means the runner may still be running and must be stopped.
RUNNER_REPORTED = frozenset({Outcome.SUCCEEDED, Outcome.SKIPPED, Outcome.FAILED})
# Lease losses are handed out again at once (AWS reassigns a task whose reports stopped);
# failures of the work itself wait for the backoff so a crash loop does not spin.
BACKED_OFF = frozenset({Outcome.FAILED, Outcome.POD_FAILED})
# Outcomes that a disruption of the pod (evicted, preempted, its node lost) can explain.
DISRUPTABLE = frozenset({Outcome.POD_LOST, Outcome.POD_FAILED, Outcome.RUNNER_LOST, Outcome.FAILED})

CONDITION_LEASED = "Leased"
CONDITION_COMPLETE = "Complete"
CONDITION_LATE = "Late"
CONDITION_INVALID = "Invalid"
# Leased condition reasons while AfterTermination holds the next attempt back.
WAITING_FOR_TERMINATION = "WaitingForTermination"
TERMINATION_OVERDUE = "TerminationOverdue"
# A pod still there this long after its grace period ended has no kubelet finishing its
# deletion (a kubelet confirms within seconds): its node is unreachable, or gone.
TERMINATION_OVERDUE_AFTER = timedelta(seconds=10)


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Clock:
    """Both clocks, read once per decision. `wall` must be timezone-aware."""

    monotonic: float
    wall: datetime

    def monotonic_at(self, when: datetime) -> float:
        """The monotonic reading at which the wall clock will show `when`."""
        return self.monotonic + (when - self.wall).total_seconds()


@dataclass(frozen=True, slots=True)
class PodState:
    """The operator's view of one runner pod."""

    name: str
    epoch: int
    phase: str = "Pending"  # Pending, Running, Succeeded, Failed, Unknown
    gone: bool = False  # a DELETED event or a 404 was seen: the pod no longer exists
    terminating: bool = False  # deletionTimestamp is set
    reason: str | None = None
    message: str | None = None
    # A pod the API server refused to create (reason FAILED_CREATE, with its message): it
    # may be tried again at `retry_at` (monotonic). An invalid one has reason POD_REJECTED.
    retry_at: float | None = None
    # Its DisruptionTarget condition ("reason: message"): evicted, preempted, or deleted
    # with its lost node.
    disruption: str | None = None
    # metadata.deletionTimestamp as written: when its grace period ends.
    grace_ends: str | None = None

    @classmethod
    def refused(
        cls, name: str, epoch: int, *, message: str, invalid: bool, retry_at: float | None = None
    ) -> PodState:
        """The state of a pod whose creation the API server refused."""
        if invalid:
            return cls(name, epoch, phase="Failed", gone=True, reason=POD_REJECTED, message=message)
        return cls(name, epoch, gone=True, reason=FAILED_CREATE, message=message, retry_at=retry_at)

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class Sighting:
    """What this operator process saw of a Task's lease, on its own monotonic clock.

    Kept in memory only: an operator that restarts starts with no sightings, and a lease it first
    sees in a listing is aged from the API server's own write times (`api/written.py`), keeping
    a grace to report once more. It is kept small (one per Task, tens of thousands of them): a
    report is remembered by a hash of its content, not the report itself.
    """

    epoch: int
    epoch_seen_at: float
    report_key: int | None = None  # hash of the last report seen for this epoch
    report_seen_at: float | None = None
    # This process created (or found) the epoch's runner pod. After a restart nobody knows
    # whether the crash came between the status write and the pod's creation, so the pod
    # is created again once (AlreadyExists is harmless) instead of losing the attempt.
    pod_ensured: bool = False

    @property
    def acknowledged(self) -> bool:
        return self.report_key is not None


def report_key(progress: Progress) -> int:
    """Identifies a report's content: a new key means a new report (a heartbeat)."""
    return hash(progress.model_dump_json())


def first_seen_at(
    now: float, *, age_s: float | None, window: timedelta, heartbeat: timedelta
) -> float:
    """When to take a lease (or report) first seen at `now` to have been seen: `age_s`
    earlier (the API server's record, when the body came from a listing), but never so
    early that less than a grace to report once more is left of `window` (two heartbeat
    intervals, at most half the window)."""
    if age_s is None:
        return now
    window_s = window.total_seconds()
    grace_s = min(2 * heartbeat.total_seconds(), window_s / 2)
    return now - min(age_s, max(window_s - grace_s, 0.0))


def observe(
    previous: Sighting | None,
    task: Task,
    *,
    now: float,
    blind_within: Callable[[float], float] | None = None,
) -> Sighting:
    """Fold one observation of `task` into the sighting.

    A report counts as new when its content differs from the last one seen for the same
    epoch. A lease first seen by this process counts as seen now, or, when it came in a
    listing, as old as the API server's record of its last write (see `first_seen_at`),
    less what `blind_within(age)` says this process could not see of that time (an outage
    it lived through: nobody could report then).
    """
    epoch = task.lease.epoch
    progress = task.status.progress
    key = report_key(progress) if progress is not None and progress.epoch == epoch else None
    if previous is None or previous.epoch != epoch:
        age = ages(task.metadata) if previous is None else {}
        if blind_within is not None:
            age = {what: max(0.0, s - blind_within(s)) for what, s in age.items()}
        spec = task.spec
        return Sighting(
            epoch=epoch,
            epoch_seen_at=first_seen_at(
                now,
                age_s=age.get("lease"),
                window=spec.ack_timeout,
                heartbeat=spec.heartbeat_interval,
            ),
            report_key=key,
            report_seen_at=None
            if key is None
            else first_seen_at(
                now,
                age_s=age.get("report"),
                window=spec.report_progress_timeout,
                heartbeat=spec.heartbeat_interval,
            ),
        )
    if key is not None and key != previous.report_key:
        return Sighting(
            epoch=epoch,
            epoch_seen_at=previous.epoch_seen_at,
            report_key=key,
            report_seen_at=now,
            pod_ensured=previous.pod_ensured,
        )
    return previous


# --- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatchLease:
    """Merge these lease annotations and labels (None removes one). Compare-and-swap."""

    annotations: dict[str, str | None]
    labels: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PatchStatus:
    """Merge this into `status` through the status subresource. Compare-and-swap."""

    status: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CreatePod:
    """Create this runner pod; AlreadyExists means an earlier try made it and is fine."""

    manifest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeletePod:
    """Delete this runner pod; NotFound is fine."""

    name: str


@dataclass(frozen=True, slots=True)
class DeleteTask:
    """Delete the Task (spec.ttlAfterFinished), and with it, by their owner references, its
    runner pods. Preconditioned on the uid and resourceVersion decided on."""

    uid: str
    resource_version: str


@dataclass(frozen=True, slots=True)
class RecordEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = PatchLease | PatchStatus | CreatePod | DeletePod | DeleteTask | RecordEvent


@dataclass(slots=True)
class Decision:
    """What `decide` concluded: the writes to make in order, and when to be asked again.

    Filled in rule by rule while `decide` runs (`_Plan`); nothing changes it afterwards.
    """

    actions: tuple[Action, ...] = ()
    wake_at: float | None = None  # monotonic; ask again then even if nothing changes
    why: str = ""
    # For metrics: the attempt this decision ends, whether the task goes on to another
    # attempt, and for a timeout the monotonic time its deadline passed.
    ended: Outcome | None = None
    retrying: bool = False
    expired_at: float | None = None
    handed_out: int | None = None  # the epoch this decision hands out
    # Only bookkeeping: the writer may put it off while its API budget is spent elsewhere.
    deferrable: bool = False

    @property
    def writes(self) -> bool:
        return any(not isinstance(a, RecordEvent) for a in self.actions)

    @property
    def deletes_task(self) -> bool:
        return any(isinstance(a, DeleteTask) for a in self.actions)


@dataclass(slots=True)
class _Plan:
    """The decision being made, and the clock it is made by, while `decide` walks the rules."""

    clock: Clock
    decision: Decision = field(default_factory=Decision)

    def add(self, action: Action) -> None:
        self.decision.actions += (action,)

    def wake(self, at: float) -> None:
        wake_at = self.decision.wake_at
        self.decision.wake_at = at if wake_at is None else min(wake_at, at)


# --- helpers ------------------------------------------------------------------------------


def set_condition(
    conditions: list[Condition],
    *,
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Conditions with one replaced; lastTransitionTime moves only when status changes."""
    previous = next((c for c in conditions if c.type == type_), None)
    transition = (
        previous.last_transition_time if previous is not None and previous.status == status else now
    )
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [updated]


def dump_conditions(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions]


def _dump_attempts(attempts: list[AttemptRecord]) -> list[dict[str, Any]]:
    kept = attempts[-MAX_ATTEMPT_HISTORY:]
    return [a.model_dump(mode="json", by_alias=True, exclude_none=True) for a in kept]


def _condition_is(task: Task, type_: str, status: str) -> bool:
    return any(c.type == type_ and c.status == status for c in task.status.conditions)


def _counted_attempts(task: Task) -> int:
    """Attempts that count against spec.retry.maxAttempts: those disrupted are left out."""
    return task.status.attempt - task.status.disruptions


def _attempt_label(task: Task, attempt: int, disruptions: int) -> str:
    """'attempt 2/3', or with disruptions left out 'attempt 4 (2/3 counted, 2 disrupted)'."""
    max_attempts = task.spec.retry.max_attempts
    if disruptions == 0:
        return f"attempt {attempt}/{max_attempts}"
    return (
        f"attempt {attempt} ({attempt - disruptions}/{max_attempts} counted, "
        f"{disruptions} disrupted)"
    )


def _disrupted(
    task: Task, pod: PodState | None, outcome: Outcome, message: str
) -> tuple[Outcome, str]:
    """How an attempt that would end with `outcome` ends when its pod was disrupted (its
    DisruptionTarget condition): Disrupted, which does not count against maxAttempts, while
    spec.retry allows; otherwise `outcome`, saying why it counts."""
    if pod is None or pod.disruption is None or pod.epoch != task.lease.epoch:
        return outcome, message
    retry = task.spec.retry
    what = f"{message} (pod {pod.name} disrupted: {pod.disruption})"
    if retry.on_disruption == DisruptionPolicy.COUNT:
        return outcome, f"{what}; counted, as spec.retry.onDisruption is Count"
    if task.status.disruptions >= retry.max_disruptions:
        return outcome, (
            f"{what}; counted: spec.retry.maxDisruptions ({retry.max_disruptions}) were "
            "already left out"
        )
    return Outcome.DISRUPTED, f"{what}; not counted against spec.retry.maxAttempts"


# --- transitions --------------------------------------------------------------------------


def _hand_out(task: Task, plan: _Plan, *, previous: AttemptRecord | None = None) -> None:
    """Give the task to a new runner pod: the lease, then the pod (an Event beside them).

    The lease is written first so that it fences the previous holder before anyone else
    acts; the pod's runner can acknowledge as soon as it starts. The status is not written
    here: the next decision sees the lease ahead of the status and records the hand-out
    (`_record_hand_out`), a write the reconciler may put off while the API budget is spent
    on hand-outs. Two writes on the critical path, not three: a hand-out's rate and a
    reassignment's delay are bounded by these round trips (docs/decisions/two-write-hand-out.md).
    `previous` is the attempt this hand-out supersedes, recorded with the lease so that
    nothing about it is lost if the status write never comes (an operator crash in between).
    """
    now = plan.clock.wall
    epoch = task.lease.epoch + 1
    holder = runner_pod_name(task.name, epoch)
    attempt = task.status.attempt + 1
    plan.add(
        PatchLease(
            {
                HOLDER_ANNOTATION: holder,
                EPOCH_ANNOTATION: str(epoch),
                ACQUIRE_TIME_ANNOTATION: rfc3339_model(now),
                PREVIOUS_ATTEMPT_ANNOTATION: (
                    previous.model_dump_json(by_alias=True, exclude_none=True)
                    if previous is not None
                    else None
                ),
            }
        )
    )
    checkpoint = task.status.progress.checkpoint if task.status.progress else None
    plan.add(CreatePod(runner_pod(task, epoch=epoch, attempt=attempt, checkpoint=checkpoint)))
    disruptions = task.status.disruptions + (
        previous is not None and previous.outcome == Outcome.DISRUPTED
    )
    plan.add(
        RecordEvent(
            "Normal",
            "HandedOut",
            f"{_attempt_label(task, attempt, disruptions)}: lease epoch {epoch} handed to pod "
            f"{holder}",
        )
    )
    plan.decision.why = f"hand out epoch {epoch}"
    plan.decision.handed_out = epoch


def _record_hand_out(task: Task, plan: _Plan, *, sighting: Sighting, pod: PodState | None) -> None:
    """The lease is ahead of the status: write the attempt the lease stands for.

    This is the normal second step of every hand-out (`_hand_out`), of a pool runner's
    claim (the runner wrote the lease), and the recovery from a crash between the lease
    and the pod. The attempt the lease superseded, if the status still shows it open, is
    closed as the lease annotation recorded it. If the runner already acknowledged, the
    attempt is written as Running at once: one status write for what used to be two.
    """
    now = plan.clock.wall
    status = task.status
    lease = task.lease
    epoch = lease.epoch
    holder = lease.holder or runner_pod_name(task.name, epoch)
    # A pool runner's claim carries its own clock's acquire time: never in the future.
    acquired = min(lease.acquire_time, now) if lease.acquire_time else now
    attempt = status.attempt + 1
    attempts = list(status.attempts)
    disruptions = status.disruptions
    if attempts and attempts[-1].end_time is None and attempts[-1].epoch < epoch:
        recorded = task.previous_attempt
        if recorded is not None and recorded.epoch == attempts[-1].epoch:
            attempts[-1] = recorded
            disruptions += recorded.outcome == Outcome.DISRUPTED
        else:
            # Only someone editing the lease annotations by hand gets here.
            attempts[-1] = attempts[-1].model_copy(
                update={
                    "end_time": acquired,
                    "outcome": Outcome.RELEASED,
                    "message": f"the lease was given to epoch {epoch}",
                }
            )
    attempts.append(AttemptRecord(attempt=attempt, epoch=epoch, holder=holder, start_time=acquired))
    acknowledged = sighting.epoch == epoch and sighting.acknowledged
    conditions = _leased(task, plan, holder=holder, epoch=epoch, acknowledged=acknowledged)
    plan.add(
        PatchStatus(
            {
                "phase": (Phase.RUNNING if acknowledged else Phase.ASSIGNED).value,
                "attempt": attempt,
                "disruptions": disruptions,
                "epoch": epoch,
                "holder": holder,
                "attempts": _dump_attempts(attempts),
                "startTime": rfc3339_model(status.start_time or acquired),
                "nextAttemptTime": None,
                "conditions": dump_conditions(conditions),
                "observedGeneration": task.generation,
            }
        )
    )
    plan.decision.why = f"record the hand-out of epoch {epoch}"
    # A pool task has no pod of its own: the runner that claimed it is the holder.
    if task.spec.template is not None and pod is None and not sighting.pod_ensured:
        # Nobody in this process made the pod: the lease was written just before a crash.
        checkpoint = status.progress.checkpoint if status.progress else None
        plan.add(CreatePod(runner_pod(task, epoch=epoch, attempt=attempt, checkpoint=checkpoint)))
        plan.decision.why = f"finish the hand-out of epoch {epoch}"
    if task.is_pool_task:
        plan.add(
            RecordEvent(
                "Normal",
                "Claimed",
                f"{_attempt_label(task, attempt, disruptions)}: lease epoch {epoch} claimed "
                f"by pool runner {holder}",
            )
        )
        plan.decision.handed_out = epoch
    if acknowledged:
        plan.add(_acknowledged_event(holder))
    # Only a bookkeeping write is left: it may wait for a free API budget. Anything that
    # makes a pod, or a cancellation, may not.
    plan.decision.deferrable = not task.spec.cancel and not any(
        isinstance(action, CreatePod) for action in plan.decision.actions
    )


def _leased(
    task: Task, plan: _Plan, *, holder: str, epoch: int, acknowledged: bool
) -> list[Condition]:
    """The conditions with Leased true: Assigned until the holder acknowledges, then Running."""
    return set_condition(
        task.status.conditions,
        type_=CONDITION_LEASED,
        status="True",
        reason="Running" if acknowledged else "Assigned",
        message=(
            f"pod {holder} acknowledged lease epoch {epoch}"
            if acknowledged
            else f"pod {holder} holds lease epoch {epoch}; waiting for its acknowledgement"
        ),
        now=plan.clock.wall,
        generation=task.generation,
    )


def _acknowledged_event(holder: str) -> RecordEvent:
    return RecordEvent("Normal", "Acknowledged", f"pod {holder} acknowledged the task")


def _acknowledge(task: Task, plan: _Plan) -> None:
    holder = task.lease.holder or ""
    conditions = _leased(task, plan, holder=holder, epoch=task.lease.epoch, acknowledged=True)
    plan.add(
        PatchStatus(
            {
                "phase": Phase.RUNNING.value,
                "conditions": dump_conditions(conditions),
                "observedGeneration": task.generation,
            }
        )
    )
    plan.add(_acknowledged_event(holder))
    plan.decision.why = "acknowledged"


def _end_attempt(
    task: Task,
    plan: _Plan,
    *,
    outcome: Outcome,
    message: str,
    final_phase: Phase | None = None,
    pod: PodState | None = None,
) -> None:
    """Close the current attempt and either finish the task or schedule the next attempt.

    `final_phase` None means: retry if the policy allows, else fail. An outcome of the pod or
    the runner failing (`DISRUPTABLE`) becomes Disrupted when the pod was disrupted.
    """
    if final_phase is None and outcome in DISRUPTABLE:
        outcome, message = _disrupted(task, pod, outcome, message)
    now = plan.clock.wall
    status = task.status
    spec = task.spec
    attempts = list(status.attempts)
    if attempts and attempts[-1].epoch == task.lease.epoch and attempts[-1].end_time is None:
        attempts[-1] = attempts[-1].model_copy(
            update={"end_time": now, "outcome": outcome, "message": message}
        )

    next_attempt_time: datetime | None = None
    if final_phase is None:
        if outcome != Outcome.DISRUPTED and _counted_attempts(task) >= spec.retry.max_attempts:
            final_phase = Phase.FAILED
            left_out = f" ({status.disruptions} disrupted left out)" if status.disruptions else ""
            message = (
                f"retries exhausted after {status.attempt} attempt(s){left_out}; last: "
                f"{outcome.value}: {message}"
            )
        elif outcome in BACKED_OFF:
            delay = retry_delay(
                spec.retry.backoff, failed_attempt=status.attempt, task_uid=task.uid
            )
            if delay > timedelta(0):
                next_attempt_time = now + delay

    plan.decision.ended = outcome
    plan.decision.retrying = final_phase is None
    straight_on = final_phase is None and next_attempt_time is None and spec.template is not None
    waits_for = ""
    if (
        straight_on
        and spec.replacement_policy == ReplacementPolicy.AFTER_TERMINATION
        and not (pod is not None and (pod.gone or pod.terminated))
    ):
        # The next pod waits for this one to end (`_wait_for_termination`).
        straight_on = False
        waits_for = (
            f"; the next attempt waits for pod {task.lease.holder or 'of this attempt'} to "
            "end (spec.replacementPolicy AfterTermination)"
        )
    if straight_on:
        # Straight on to the next attempt (a lost lease, AWS's reassignment): the new lease
        # carries the end of this attempt, and the status records both afterwards.
        ended = attempts[-1] if attempts and attempts[-1].epoch == task.lease.epoch else None
        _hand_out(task, plan, previous=ended)
        plan.decision.why = f"{outcome.value} -> {plan.decision.why}"
        _stop_runner(task, plan, outcome=outcome, pod=pod)
        text = f"attempt {status.attempt} ended: {message}"
        plan.add(RecordEvent("Warning", outcome.value, text))
        return

    patch: dict[str, Any] = {
        "attempts": _dump_attempts(attempts),
        "holder": None,
        "observedGeneration": task.generation,
    }
    if outcome == Outcome.DISRUPTED:
        patch["disruptions"] = status.disruptions + 1
    conditions = status.conditions
    if final_phase is not None:
        patch["phase"] = final_phase.value
        patch["completionTime"] = rfc3339_model(now)
        patch["nextAttemptTime"] = None
        conditions = set_condition(
            conditions,
            type_=CONDITION_LEASED,
            status="False",
            reason=outcome.value,
            message=message,
            now=now,
            generation=task.generation,
        )
        conditions = set_condition(
            conditions,
            type_=CONDITION_COMPLETE,
            status="True",
            reason=final_phase.value,
            message=message,
            now=now,
            generation=task.generation,
        )
        event_type: Literal["Normal", "Warning"] = (
            "Normal" if final_phase in (Phase.SUCCEEDED, Phase.SKIPPED) else "Warning"
        )
        event_reason = final_phase.value if outcome in RUNNER_REPORTED else outcome.value
        plan.decision.why = f"{outcome.value} -> {final_phase.value}"
    else:
        patch["phase"] = Phase.PENDING.value
        patch["nextAttemptTime"] = rfc3339_model(next_attempt_time) if next_attempt_time else None
        wait = (
            f"; next attempt at {rfc3339_model(next_attempt_time)}"
            if next_attempt_time
            else waits_for
        )
        conditions = set_condition(
            conditions,
            type_=CONDITION_LEASED,
            status="False",
            reason=outcome.value,
            message=f"attempt {status.attempt} ended: {message}{wait}",
            now=now,
            generation=task.generation,
        )
        event_type = "Warning"
        event_reason = outcome.value
        message = f"attempt {status.attempt} ended: {message}{wait}"
        plan.decision.why = f"{outcome.value} -> retry"
    patch["conditions"] = dump_conditions(conditions)
    plan.add(PatchStatus(patch))
    _stop_runner(task, plan, outcome=outcome, pod=pod)
    plan.add(RecordEvent(event_type, event_reason, message))


def _stop_runner(task: Task, plan: _Plan, *, outcome: Outcome, pod: PodState | None) -> None:
    """Delete the ended attempt's pod when its runner may still be running."""
    holder = task.lease.holder
    runner_may_still_run = outcome not in RUNNER_REPORTED
    # Only pods made for this attempt are ours to stop; a pool runner serves other tasks.
    pod_per_attempt = task.spec.template is not None
    pod_done = pod is not None and (pod.gone or pod.terminated)
    if holder and pod_per_attempt and runner_may_still_run and not pod_done:
        plan.add(DeletePod(holder))


def _mark_late(task: Task, plan: _Plan, *, late_after: timedelta) -> None:
    text = f"not finished {format_go_duration(late_after)} after creation (spec.lateAfter)"
    conditions = set_condition(
        task.status.conditions,
        type_=CONDITION_LATE,
        status="True",
        reason="LateAfterExceeded",
        message=text,
        now=plan.clock.wall,
        generation=task.generation,
    )
    plan.add(PatchStatus({"conditions": dump_conditions(conditions)}))
    plan.add(RecordEvent("Warning", "Late", text))


def _release_lease(plan: _Plan, *, claimable: bool | None = None) -> None:
    """Remove the holder; for pool tasks also set or clear the claimable label.

    The epoch stays: it is the fencing token, and the next hand-out increments it.
    """
    labels: dict[str, str | None] = {}
    if claimable is not None:
        labels[CLAIMABLE_LABEL] = "true" if claimable else None
    plan.add(PatchLease({HOLDER_ANNOTATION: None}, labels))
    plan.decision.why = "release lease" if not claimable else "back to the pool"


# --- the decision -------------------------------------------------------------------------


def decide(
    task: Task,
    *,
    sighting: Sighting,
    pod: PodState | None,
    clock: Clock,
    ttl_after_finished: timedelta | None = None,
) -> Decision:
    """The next writes for `task`; `pod` is the current epoch's runner pod, if seen.
    `ttl_after_finished` is the operator's default for a Task that sets none."""
    plan = _Plan(clock)
    status = task.status
    spec = task.spec
    lease = task.lease
    now = clock.wall

    if _condition_is(task, CONDITION_INVALID, "True"):
        # The spec was fixed: say so before anything else happens to the task.
        conditions = set_condition(
            status.conditions,
            type_=CONDITION_INVALID,
            status="False",
            reason="Valid",
            message="the spec is valid",
            now=now,
            generation=task.generation,
        )
        plan.add(PatchStatus({"conditions": dump_conditions(conditions)}))
        plan.decision.why = "spec fixed"
        return plan.decision

    if (restored := _phase_from_facts(task, sighting)) is not None:
        _restore_phase(task, plan, restored)
        return plan.decision

    if status.phase.is_final:
        if lease.holder or CLAIMABLE_LABEL in task.labels:
            _release_lease(plan, claimable=False if task.is_pool_task else None)
        elif _generation_unobserved(task):
            _observe_generation(task, plan)
        else:
            _expire(task, plan, spec.ttl_after_finished or ttl_after_finished)
        return plan.decision

    if lease.epoch > status.epoch and lease.holder:
        # A hand-out or a pool runner's claim wrote the lease; the status follows. Before
        # anything else: every other rule reads the current attempt from the status.
        _record_hand_out(task, plan, sighting=sighting, pod=pod)
        return plan.decision

    if spec.cancel:
        if status.phase in ACTIVE_PHASES:
            _end_attempt(
                task,
                plan,
                outcome=Outcome.CANCELED,
                message="spec.cancel is true",
                final_phase=Phase.CANCELED,
                pod=pod,
            )
        else:
            _finish_without_attempt(task, plan, Phase.CANCELED, "Canceled", "spec.cancel is true")
        return plan.decision

    created = task.creation_time
    if spec.active_deadline is not None and created is not None:
        deadline = created + spec.active_deadline
        if now >= deadline:
            text = f"spec.activeDeadline of {format_go_duration(spec.active_deadline)} passed"
            if status.phase in ACTIVE_PHASES:
                _end_attempt(
                    task,
                    plan,
                    outcome=Outcome.DEADLINE_EXCEEDED,
                    message=text,
                    final_phase=Phase.FAILED,
                    pod=pod,
                )
            else:
                _finish_without_attempt(task, plan, Phase.FAILED, "DeadlineExceeded", text)
            return plan.decision
        plan.wake(clock.monotonic_at(deadline))

    if spec.late_after is not None and created is not None:
        late_at = created + spec.late_after
        if now >= late_at:
            if not _condition_is(task, CONDITION_LATE, "True"):
                _mark_late(task, plan, late_after=spec.late_after)
                # One write at a time: the next decision sees the condition and goes on.
                return plan.decision
        else:
            plan.wake(clock.monotonic_at(late_at))

    if status.phase == Phase.PENDING:
        _decide_pending(task, plan, sighting=sighting, pod=pod)
    else:
        _decide_active(task, plan, sighting=sighting, pod=pod)
    if not plan.decision.actions and _generation_unobserved(task):
        _observe_generation(task, plan)
    return plan.decision


def _generation_unobserved(task: Task) -> bool:
    """The spec changed since the status or one of its conditions was written (as far as
    they say: a status written without observedGeneration says nothing)."""
    generation = task.generation
    if generation is None:
        return False
    status = task.status
    if status.observed_generation is not None and status.observed_generation < generation:
        return True
    return any(
        c.observed_generation is not None and c.observed_generation < generation
        for c in status.conditions
    )


def _observe_generation(task: Task, plan: _Plan) -> None:
    """A spec change that changes nothing the operator does is still observed: the status
    and each condition say they were made from the current generation (`kubectl wait
    --for=condition=...` reads a condition only at the current generation)."""
    conditions = [
        c.model_copy(update={"observed_generation": task.generation})
        for c in task.status.conditions
    ]
    patch: dict[str, Any] = {"observedGeneration": task.generation}
    if conditions:
        patch["conditions"] = dump_conditions(conditions)
    plan.add(PatchStatus(patch))
    plan.decision.why = f"observe generation {task.generation}"


def _phase_from_facts(task: Task, sighting: Sighting) -> Phase | None:
    """The phase the lease and the attempt history say, when `status.phase` says otherwise
    (someone other than the operator wrote it: the status subresource is writable by users
    with access to it). None when the phase agrees with them.

    What the operator itself writes never disagrees: it ends the current attempt (outcome)
    in the same write that leaves the active phases, and writes a final phase only with the
    `Complete` condition saying so. So the phase is foreign when it is not active while the
    current attempt is open (no outcome) and its runner still holds the lease, or when it is
    final without `Complete` saying so."""
    status, lease = task.status, task.lease
    current = next((a for a in reversed(status.attempts) if a.epoch == lease.epoch), None)
    open_attempt = (
        current is not None
        and current.outcome is None
        and lease.holder is not None
        and status.epoch == lease.epoch
    )
    if open_attempt and status.phase not in ACTIVE_PHASES:
        acknowledged = sighting.acknowledged or (
            status.progress is not None and status.progress.epoch == lease.epoch
        )
        return Phase.RUNNING if acknowledged else Phase.ASSIGNED
    if status.phase.is_final and not _condition_is_reason(
        task, CONDITION_COMPLETE, "True", str(status.phase)
    ):
        return Phase.PENDING if not open_attempt else Phase.ASSIGNED
    return None


def _condition_is_reason(task: Task, type_: str, status: str, reason: str) -> bool:
    return any(
        c.type == type_ and c.status == status and c.reason == reason
        for c in task.status.conditions
    )


def _restore_phase(task: Task, plan: _Plan, phase: Phase) -> None:
    """Put back the phase that follows from the lease, and say so: the status must end
    consistent, and whoever wrote it should learn that it did not steer anything."""
    written = task.status.phase
    patch: dict[str, Any] = {"phase": str(phase), "completionTime": None}
    if _condition_is(task, CONDITION_COMPLETE, "True"):
        conditions = set_condition(
            task.status.conditions,
            type_=CONDITION_COMPLETE,
            status="False",
            reason=str(phase),
            message="the task is not final",
            now=plan.clock.wall,
            generation=task.generation,
        )
        patch["conditions"] = dump_conditions(conditions)
    plan.add(PatchStatus(patch))
    plan.add(
        RecordEvent(
            type="Warning",
            reason="StatusOverwritten",
            message=(
                f"status.phase {written} was written by someone other than the operator and "
                f"does not follow from the lease: restored to {phase} (the lease and the "
                f"runner's result decide a task's phase; set spec.cancel to stop it)"
            ),
        )
    )
    plan.decision.why = f"restore phase {phase} over a foreign {written}"


def _finish_without_attempt(
    task: Task, plan: _Plan, phase: Phase, reason: str, message: str
) -> None:
    now = plan.clock.wall
    conditions = set_condition(
        task.status.conditions,
        type_=CONDITION_COMPLETE,
        status="True",
        reason=phase.value,
        message=message,
        now=now,
        generation=task.generation,
    )
    plan.add(
        PatchStatus(
            {
                "phase": phase.value,
                "completionTime": rfc3339_model(now),
                "nextAttemptTime": None,
                "conditions": dump_conditions(conditions),
                "observedGeneration": task.generation,
            }
        )
    )
    plan.add(RecordEvent("Normal" if phase == Phase.CANCELED else "Warning", reason, message))
    plan.decision.why = f"{reason} -> {phase.value}"


def _decide_pending(task: Task, plan: _Plan, *, sighting: Sighting, pod: PodState | None) -> None:
    status = task.status
    if _counted_attempts(task) >= task.spec.retry.max_attempts:
        _finish_without_attempt(
            task,
            plan,
            Phase.FAILED,
            "RetriesExhausted",
            f"{_counted_attempts(task)} attempt(s) used of spec.retry.maxAttempts",
        )
        return
    if status.next_attempt_time is not None and plan.clock.wall < status.next_attempt_time:
        if task.lease.holder or CLAIMABLE_LABEL in task.labels:
            _release_lease(plan, claimable=False if task.is_pool_task else None)
        plan.wake(plan.clock.monotonic_at(status.next_attempt_time))
        plan.decision.why = plan.decision.why or "backing off"
        return
    if task.is_pool_task:
        _offer_to_pool(task, plan)
        return
    if (
        task.spec.replacement_policy == ReplacementPolicy.AFTER_TERMINATION
        and status.attempt > 0
        and not _previous_pod_ended(task, sighting=sighting, pod=pod)
    ):
        _wait_for_termination(task, plan, pod=pod)
        return
    _hand_out(task, plan)


def _previous_pod_ended(task: Task, *, sighting: Sighting, pod: PodState | None) -> bool:
    """Whether the pod of the attempt that ended (the lease's epoch) is gone or has ended.
    A pod not seen counts as gone, unless this process created it (its watch event is
    still on its way); after a restart the pod watch's listing is complete."""
    epoch = task.lease.epoch
    if pod is None or pod.epoch != epoch:
        return not (sighting.epoch == epoch and sighting.pod_ensured)
    return pod.gone or pod.terminated


def _wait_for_termination(task: Task, plan: _Plan, *, pod: PodState | None) -> None:
    """Hold the next attempt back until the previous pod ends (AfterTermination), and say
    so on the Task: WaitingForTermination, then TerminationOverdue once the pod outlives
    its grace period by TERMINATION_OVERDUE_AFTER (no kubelet finishes its deletion)."""
    if task.lease.holder:  # a pod-per-attempt task: never claimable
        _release_lease(plan)  # the old runner is fenced while it winds down
        return
    status = task.status
    now = plan.clock.wall
    name = pod.name if pod is not None else runner_pod_name(task.name, task.lease.epoch)
    reason = WAITING_FOR_TERMINATION
    message = (
        f"attempt {status.attempt + 1} waits for pod {name} of attempt {status.attempt} to "
        "end (spec.replacementPolicy AfterTermination)"
    )
    event_type: Literal["Normal", "Warning"] = "Normal"
    grace_ends = parse_stamp(pod.grace_ends) if pod is not None else None
    if grace_ends is not None:
        overdue_at = grace_ends + TERMINATION_OVERDUE_AFTER
        if now >= overdue_at:
            reason, event_type = TERMINATION_OVERDUE, "Warning"
            message = (
                f"pod {name} has not terminated though its grace period ended at "
                f"{rfc3339_model(grace_ends)}: its node may be unreachable. Attempt "
                f"{status.attempt + 1} waits until the pod is gone or has ended "
                f"(spec.replacementPolicy AfterTermination); once its process is known to "
                f"be stopped, `kubectl delete pod {name} --grace-period=0 --force` lets it "
                "start"
            )
        else:
            plan.wake(plan.clock.monotonic_at(overdue_at))
    if not _condition_is_reason(task, CONDITION_LEASED, "False", reason):
        conditions = set_condition(
            status.conditions,
            type_=CONDITION_LEASED,
            status="False",
            reason=reason,
            message=message,
            now=now,
            generation=task.generation,
        )
        plan.add(PatchStatus({"conditions": dump_conditions(conditions)}))
        plan.add(RecordEvent(event_type, reason, message))
        plan.decision.why = f"{reason}: pod {name}"
    plan.decision.why = plan.decision.why or f"waiting for pod {name} to end"


def _expire(task: Task, plan: _Plan, ttl: timedelta | None) -> None:
    """Delete a finished Task once its ttlAfterFinished has passed; until then, be asked
    again then (the deadline queue, no timer of its own)."""
    completed = task.status.completion_time
    if ttl is None or completed is None:
        return
    expires = completed + ttl
    if plan.clock.wall < expires:
        plan.wake(plan.clock.monotonic_at(expires))
        return
    version = str(task.metadata.get("resourceVersion", ""))
    plan.add(DeleteTask(uid=task.uid, resource_version=version))
    plan.decision.why = f"ttlAfterFinished of {format_go_duration(ttl)} passed: delete"


def _offer_to_pool(task: Task, plan: _Plan) -> None:
    """Make a pool task claimable by runners of its worker group (PollForTask's queue).

    The epoch annotation is written too, so a claim can always be a `test` of its current
    value: exactly one of two racing runners wins.
    """
    group = task.spec.worker_group or ""
    labels = task.labels
    lease = task.lease
    if (
        lease.holder is not None
        or labels.get(CLAIMABLE_LABEL) != "true"
        or labels.get(WORKER_GROUP_LABEL) != group
        or task.metadata.get("annotations", {}).get(EPOCH_ANNOTATION) != str(lease.epoch)
    ):
        plan.add(
            PatchLease(
                {HOLDER_ANNOTATION: None, EPOCH_ANNOTATION: str(lease.epoch)},
                {WORKER_GROUP_LABEL: group, CLAIMABLE_LABEL: "true"},
            )
        )
        plan.decision.why = "offer to the pool"
    leased = next((c for c in task.status.conditions if c.type == CONDITION_LEASED), None)
    if leased is None or leased.reason != "WaitingForRunner":
        conditions = set_condition(
            task.status.conditions,
            type_=CONDITION_LEASED,
            status="False",
            reason="WaitingForRunner",
            message=f"waiting for a runner of worker group {group} to claim it",
            now=plan.clock.wall,
            generation=task.generation,
        )
        plan.add(PatchStatus({"conditions": dump_conditions(conditions)}))
        plan.decision.why = plan.decision.why or "waiting for a runner"


def _decide_active(task: Task, plan: _Plan, *, sighting: Sighting, pod: PodState | None) -> None:
    status = task.status
    spec = task.spec
    lease = task.lease
    clock = plan.clock

    result = status.result
    if result is not None and result.epoch == lease.epoch:
        _decide_result(task, plan, pod=pod)
        return

    if lease.holder is None:
        # Only a pool runner can remove the holder of an active attempt: it gave the task
        # back because it was told to stop.
        _end_attempt(
            task, plan, outcome=Outcome.RELEASED, message="the runner released the task", pod=pod
        )
        return

    if pod is not None and pod.epoch == lease.epoch and task.is_pool_task:
        if pod.gone or pod.terminating or pod.terminated:
            _end_attempt(
                task,
                plan,
                outcome=Outcome.RUNNER_LOST,
                message=pod.message or f"pool runner {pod.name} is gone",
                pod=pod,
            )
            return
    elif pod is not None and pod.epoch == lease.epoch and pod.reason == POD_REJECTED:
        message = f"the API server refused to create pod {pod.name}: {pod.message}"
        plan.add(RecordEvent("Warning", FAILED_CREATE, message))
        _end_attempt(
            task, plan, outcome=Outcome.POD_REJECTED, message=message, final_phase=Phase.FAILED,
            pod=pod,
        )  # fmt: skip
        return
    elif pod is not None and pod.epoch == lease.epoch and pod.reason != FAILED_CREATE:
        if pod.gone or pod.terminating:
            what = "was deleted" if pod.gone else "is being deleted"
            _end_attempt(
                task, plan, outcome=Outcome.POD_LOST, message=f"pod {pod.name} {what}", pod=pod
            )
            return
        if pod.terminated:
            detail = ": ".join(p for p in (pod.reason, pod.message) if p)
            text = f"pod {pod.name} ended ({pod.phase}) without reporting a result" + (
                f" ({detail})" if detail else ""
            )
            _end_attempt(task, plan, outcome=Outcome.POD_FAILED, message=text, pod=pod)
            return

    if spec.attempt_timeout is not None and (task.is_pool_task or lease.acquire_time):
        # A pool runner writes the acquire time of its own claim, so for pool tasks the
        # attempt is timed from the operator's sighting of the epoch, like the other timeouts.
        if task.is_pool_task or lease.acquire_time is None:
            attempt_deadline_mono = sighting.epoch_seen_at + spec.attempt_timeout.total_seconds()
        else:
            attempt_deadline_mono = clock.monotonic_at(lease.acquire_time + spec.attempt_timeout)
        if clock.monotonic >= attempt_deadline_mono:
            plan.decision.expired_at = attempt_deadline_mono
            _end_attempt(
                task,
                plan,
                outcome=Outcome.ATTEMPT_TIMEOUT,
                message=f"spec.attemptTimeout of {format_go_duration(spec.attempt_timeout)} passed",
                pod=pod,
            )
            return
        plan.wake(attempt_deadline_mono)

    acknowledged = sighting.acknowledged
    if status.phase == Phase.ASSIGNED:
        if acknowledged:
            _acknowledge(task, plan)
            return
        refused = pod is not None and pod.reason == FAILED_CREATE
        ack_deadline = sighting.epoch_seen_at + spec.ack_timeout.total_seconds()
        if refused and clock.monotonic < ack_deadline:
            assert pod is not None
            if not _condition_is_reason(task, CONDITION_LEASED, "True", FAILED_CREATE):
                # Shown while it lasts: the Task says why it has no runner.
                conditions = set_condition(
                    status.conditions,
                    type_=CONDITION_LEASED,
                    status="True",
                    reason=FAILED_CREATE,
                    message=f"pod {pod.name} could not be created (retrying): {pod.message}",
                    now=clock.wall,
                    generation=task.generation,
                )
                plan.add(PatchStatus({"conditions": dump_conditions(conditions)}))
                plan.decision.why = "say the pod could not be created"
                return
            if pod.retry_at is not None and clock.monotonic < pod.retry_at:
                plan.wake(min(pod.retry_at, ack_deadline))
                plan.decision.why = "waiting to create the pod again"
                return
        if (
            (pod is None or refused)
            and not sighting.pod_ensured
            and spec.template is not None
            and (not refused or clock.monotonic < ack_deadline)
        ):
            checkpoint = status.progress.checkpoint if status.progress else None
            plan.add(
                CreatePod(
                    runner_pod(
                        task, epoch=lease.epoch, attempt=status.attempt, checkpoint=checkpoint
                    )
                )
            )
            plan.decision.why = (
                "create the runner pod again" if refused else "ensure the runner pod exists"
            )
            return
        if clock.monotonic >= ack_deadline:
            plan.decision.expired_at = ack_deadline
            why = (
                f"; its pod could not be created: {pod.message}"
                if pod is not None and pod.reason == FAILED_CREATE
                else ""
            )
            _end_attempt(
                task,
                plan,
                outcome=Outcome.ACK_TIMEOUT,
                message=(
                    f"no progress report within spec.ackTimeout "
                    f"({format_go_duration(spec.ack_timeout)}){why}"
                ),
                pod=pod,
            )
            return
        plan.wake(ack_deadline)
        plan.decision.why = plan.decision.why or "waiting for acknowledgement"
        return

    # Running: the lease lives while reports keep coming.
    last_seen = (
        sighting.report_seen_at if sighting.report_seen_at is not None else (sighting.epoch_seen_at)
    )
    progress_deadline = last_seen + spec.report_progress_timeout.total_seconds()
    if clock.monotonic >= progress_deadline:
        plan.decision.expired_at = progress_deadline
        _end_attempt(
            task,
            plan,
            outcome=Outcome.PROGRESS_TIMEOUT,
            message=(
                f"no progress report for spec.reportProgressTimeout "
                f"({format_go_duration(spec.report_progress_timeout)})"
            ),
            pod=pod,
        )
        return
    plan.wake(progress_deadline)
    plan.decision.why = plan.decision.why or "lease held"


def _decide_result(task: Task, plan: _Plan, *, pod: PodState | None) -> None:
    result = task.status.result
    assert result is not None
    if result.status == ResultStatus.FINISHED:
        _end_attempt(
            task,
            plan,
            outcome=Outcome.SUCCEEDED,
            message="the runner reported FINISHED",
            final_phase=Phase.SUCCEEDED,
        )
        return
    if result.status == ResultStatus.FALSE:
        _end_attempt(
            task,
            plan,
            outcome=Outcome.SKIPPED,
            message="the runner reported FALSE (a precondition was not met)",
            final_phase=Phase.SKIPPED,
        )
        return
    error = result.error_id or "unknown"
    text = f"the runner reported FAILED ({error})"
    if result.error_message:
        text += f": {result.error_message}"
    if result.error_id is not None and result.error_id in task.spec.retry.non_retryable_errors:
        _end_attempt(
            task,
            plan,
            outcome=Outcome.FAILED,
            message=f"{text}; {error} is in spec.retry.nonRetryableErrors",
            final_phase=Phase.FAILED,
        )
        return
    # A runner stopped by its pod's eviction reports FAILED (the wrapper: Interrupted); the
    # pod's DisruptionTarget condition, written before the eviction's SIGTERM, says why.
    _end_attempt(task, plan, outcome=Outcome.FAILED, message=text, pod=pod)


# A runner that reported its result normally exits within seconds; one that has not after
# this long is hung in its shutdown and is stopped like any other stale runner.
RUNNER_EXIT_GRACE = timedelta(seconds=60)
_NOW = datetime.min.replace(tzinfo=UTC)


def when_to_stop_pod(task: Task, pod: PodState) -> datetime | None:
    """When the operator must stop `pod` because it no longer holds the lease, or None.

    Pods that ended or are already being deleted are left alone, and so is the current
    holder. A pod whose attempt ended with a result it reported gets RUNNER_EXIT_GRACE to
    exit by itself (and keeps its logs); any other stale pod is stopped at once.
    """
    if pod.gone or pod.terminating or pod.terminated:
        return None
    lease = task.lease
    if pod.epoch > lease.epoch:
        # A pod from an epoch we have not seen yet: our view of the Task is behind.
        return None
    record = next((a for a in task.status.attempts if a.epoch == pod.epoch), None)
    if (
        pod.epoch == lease.epoch
        and lease.holder == pod.name
        and (record is None or record.end_time is None)
    ):
        # The lease holder, its attempt not ended. Its status may not say so yet: the pod's
        # watch event can overtake the Task's (two streams), so "Assigned" may still be on
        # its way. Measured in the scale benchmark: without this, hand-outs under load
        # deleted their own fresh pods.
        return None
    if record is not None and record.outcome in RUNNER_REPORTED:
        return (record.end_time or _NOW) + RUNNER_EXIT_GRACE
    return _NOW


def stale_pod(task: Task, pod: PodState, *, now: datetime | None = None) -> bool:
    """Whether `pod` must be stopped now (see `when_to_stop_pod`)."""
    when = when_to_stop_pod(task, pod)
    if when is None:
        return False
    return when <= (now if now is not None else datetime.now(UTC))
