"""The invariants of issue 18, judged over a recorded history (`soak.history`).

Each invariant is stated over what the API server accepted, never over what a client logged:

1. `fencing`: no accepted runner write with a stale epoch or from a pod that did not hold the
   lease, and no pool claim or release but for the writer's own pod.
2. `one-pod-per-epoch`: at most one runner pod created per Task and epoch.
3. `epochs`: a Task's epoch never goes down, and every epoch has its attempt record.
4. `ends-final`: every Task ends final, within its attempts, with a result its holder wrote.
5. `no-false-reassignment`: the operator ends an attempt for a timeout only after a whole
   window without an accepted report (time with the API server down not counted).
6. `detection-bound`: and no later than the window plus the harness's bound.

A runner write is one made as a ServiceAccount that is not an operator's identity: the
harness gives each operator replica a username of its own, and people (admins, the harness
itself) are not ServiceAccounts. Timestamps are the API server's (`stageTimestamp`); the
operator times leases on its own clock, from when it saw a write, so the comparisons of
invariant 5 allow `clock_tolerance_s`.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from soak.history import History, Interval, Write, epoch_of, holder_of
from tasklease.api.durations import parse_go_duration
from tasklease.api.models import (
    EPOCH_ANNOTATION,
    EPOCH_LABEL,
    FINAL_PHASES,
    HOLDER_ANNOTATION,
    MAX_ATTEMPT_HISTORY,
    PLURAL,
    PREVIOUS_ATTEMPT_ANNOTATION,
    TASK_LABEL,
    Outcome,
    RetryPolicy,
    TaskSpec,
)
from tasklease.kube.leader import RENEW_EVERY_S

TIMEOUTS: Final = frozenset({Outcome.PROGRESS_TIMEOUT, Outcome.ACK_TIMEOUT})
_EPOCH_POINTER: Final = "/metadata/annotations/" + EPOCH_ANNOTATION.replace("/", "~1")
_HOLDER_POINTER: Final = "/metadata/annotations/" + HOLDER_ANNOTATION.replace("/", "~1")
_REPORTED: Final = ("progress", "result")


class Invariant(enum.StrEnum):
    FENCING = "fencing"
    ONE_POD_PER_EPOCH = "one-pod-per-epoch"
    EPOCHS = "epochs"
    ENDS_FINAL = "ends-final"
    NO_FALSE_REASSIGNMENT = "no-false-reassignment"
    DETECTION_BOUND = "detection-bound"


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: Invariant
    task: str  # namespace/name
    detail: str
    audit_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant.value,
            "task": self.task,
            "detail": self.detail,
            "audit_ids": list(self.audit_ids),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Violation:
        return cls(
            invariant=Invariant(data["invariant"]),
            task=str(data["task"]),
            detail=str(data.get("detail", "")),
            audit_ids=tuple(data.get("audit_ids") or ()),
        )


@dataclass(frozen=True, slots=True)
class Expiry:
    """An attempt the operator ended for a timeout, measured on the API server's clock."""

    task: str
    epoch: int
    outcome: Outcome
    window_s: float
    since: datetime  # the last accepted report (ProgressTimeout) or the hand-out (AckTimeout)
    ended_at: datetime  # the operator's first accepted write that recorded the end
    blind_s: float  # time between the two with the API server down
    # Time between the two with no operator replica leading (a killed leader's Lease had to
    # expire first), the API server's downtime not counted again: no detection then.
    leaderless_s: float = 0.0

    @property
    def elapsed_s(self) -> float:
        """How long the lease went without a report, the API server's downtime not counted."""
        return (self.ended_at - self.since).total_seconds() - self.blind_s

    @property
    def delay_s(self) -> float:
        """How long after its window the attempt was ended (negative: before)."""
        return self.elapsed_s - self.window_s

    @property
    def detection_s(self) -> float:
        """The delay an operator that was leading is answerable for."""
        return self.delay_s - self.leaderless_s


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    tasks: int = 0
    accepted_runner_writes: int = 0
    accepted_stale_or_foreign_writes: int = 0
    double_pods: int = 0
    false_reassignments: int = 0
    expiries: list[Expiry] = field(default_factory=list)
    # Past the window, of each expiry that was not a false reassignment.
    detection_delays_s: list[float] = field(default_factory=list)
    tasks_not_final: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def detection_percentile(self, q: float) -> float | None:
        """The `q`th percentile of the detection delays (s past the window); None without."""
        return percentile(self.detection_delays_s, q)

    def detection_p50_s(self) -> float | None:
        return self.detection_percentile(50)

    def detection_p99_s(self) -> float | None:
        return self.detection_percentile(99)

    def figures(self) -> dict[str, float | int | None]:
        """The figures the soak prints, by name."""
        return {
            "tasks": self.tasks,
            "accepted_runner_writes": self.accepted_runner_writes,
            "accepted_stale_or_foreign_writes": self.accepted_stale_or_foreign_writes,
            "double_pods": self.double_pods,
            "reassignments_for_timeouts": len(self.expiries),
            "false_reassignments": self.false_reassignments,
            "detection_delay_p50_s": self.detection_p50_s(),
            "detection_delay_p99_s": self.detection_p99_s(),
            "tasks_not_final": self.tasks_not_final,
            "violations": len(self.violations),
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (a value that occurred); None for no values."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


def check(history: History, *, clock_tolerance_s: float = 1.0) -> Report:
    """Judge `history` against the six invariants; the report lists every violation found."""
    checker = _Checker(history, clock_tolerance_s=clock_tolerance_s)
    return checker.run()


# --- one Task's life in the log -------------------------------------------------------------


@dataclass
class _Life:
    """The accepted writes to one Task object (one uid), in resourceVersion order."""

    namespace: str
    name: str
    uid: str
    writes: list[Write] = field(default_factory=list)
    final: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def before(self, write: Write) -> Iterator[Write]:
        """The accepted writes made before `write`, newest first."""
        version = write.resource_version or 0
        return (w for w in reversed(self.writes) if (w.resource_version or 0) < version)

    def spec_at(self, write: Write) -> dict[str, Any]:
        spec = (write.response or {}).get("spec")
        if isinstance(spec, dict):
            return spec
        earlier = next((w.response for w in self.before(write) if w.response), None)
        return dict((earlier or self.final or {}).get("spec") or {})


class _Checker:
    def __init__(self, history: History, *, clock_tolerance_s: float) -> None:
        self.history = history
        self.tolerance_s = clock_tolerance_s
        self.blind = _merged(history.blind)
        self.unled = _merged([*history.blind, *_leaderless(history)])
        self.report = Report()
        self.lives = _lives(history)

    def run(self) -> Report:
        self.report.tasks = len(self.lives)
        self._fencing()
        self._one_pod_per_epoch()
        for life in self.lives:
            self._epochs(life)
            self._ends_final(life)
            self._timeouts(life)
        self._missing_tasks()
        return self.report

    def flag(self, invariant: Invariant, task: str, detail: str, *writes: Write | None) -> None:
        audit_ids = tuple(w.audit_id for w in writes if w is not None)
        self.report.violations.append(Violation(invariant, task, detail, audit_ids))

    def is_runner(self, write: Write) -> bool:
        return write.runner and write.user not in self.history.operator_users

    def is_operator(self, write: Write) -> bool:
        return write.user in self.history.operator_users

    # --- 1. fencing ---------------------------------------------------------------------

    def _fencing(self) -> None:
        by_uid = {life.uid: life for life in self.lives}
        for write in self.history.writes:
            if write.resource != PLURAL or not write.accepted or not self.is_runner(write):
                continue
            self.report.accepted_runner_writes += 1
            life = by_uid.get(write.uid or "")
            if write.subresource == "status":
                problems = _status_fencing(write)
            else:
                problems = _lease_fencing(write, life) if life is not None else []
            if problems:
                self.report.accepted_stale_or_foreign_writes += 1
                self.flag(
                    Invariant.FENCING,
                    write.task_key,
                    f"accepted {write.verb} of task {write.task_key} at {_at(write)} by "
                    f"{_writer(write)}: {'; '.join(problems)}",
                    write,
                )

    # --- 2. one pod per epoch -----------------------------------------------------------

    def _one_pod_per_epoch(self) -> None:
        created: dict[tuple[str, str, str], list[Write]] = defaultdict(list)
        for write in self.history.writes:
            if write.resource != "pods" or write.verb != "create" or write.code != 201:
                continue
            request = write.request if isinstance(write.request, dict) else {}
            labels = (request.get("metadata") or {}).get("labels") or {}
            task, epoch = labels.get(TASK_LABEL), labels.get(EPOCH_LABEL)
            if task is None or epoch is None:
                continue
            created[(write.namespace, str(task), str(epoch))].append(write)
        for (namespace, task, epoch), writes in created.items():
            if len(writes) < 2:
                continue
            self.report.double_pods += len(writes) - 1
            pods = ", ".join(f"{w.name} at {_at(w)} by {w.user}" for w in writes)
            self.flag(
                Invariant.ONE_POD_PER_EPOCH,
                f"{namespace}/{task}",
                f"{len(writes)} pods were created for epoch {epoch} of task {namespace}/{task}: "
                f"{pods}",
                *writes,
            )

    # --- 3. epochs ----------------------------------------------------------------------

    def _epochs(self, life: _Life) -> None:
        highest: tuple[int, Write | None] = (0, None)
        seen: dict[int, Write | None] = {}
        points: list[tuple[int | None, Write | None]] = [(w.epoch, w) for w in life.writes]
        if life.final is not None:
            points.append((epoch_of(life.final), None))
        for epoch, write in points:
            if epoch is None:
                continue
            if epoch < highest[0]:
                where = f"write at {_at(write)} by {write.user}" if write else "final listing"
                self.flag(
                    Invariant.EPOCHS,
                    life.key,
                    f"the epoch of task {life.key} went down from {highest[0]} to {epoch} "
                    f"(the {where})",
                    highest[1],
                    write,
                )
                return
            highest = (epoch, write)
            seen.setdefault(epoch, write)
        if life.final is None or not seen:
            return
        recorded = {a.get("epoch") for a in _status(life.final).get("attempts") or []}
        kept_from = max(seen) - (MAX_ATTEMPT_HISTORY - 1)
        for epoch, write in sorted(seen.items()):
            if epoch >= 1 and epoch >= kept_from and epoch not in recorded:
                self.flag(
                    Invariant.EPOCHS,
                    life.key,
                    f"epoch {epoch} of task {life.key} (first written at "
                    f"{_at(write) if write else 'an unknown time'}) has no record in the "
                    f"final status.attempts (epochs recorded: {_listing(recorded)})",
                    write,
                )

    # --- 4. every Task ends final -------------------------------------------------------

    def _ends_final(self, life: _Life) -> None:
        final = life.final
        if final is None:
            return
        status = _status(final)
        phase = status.get("phase")
        if phase not in FINAL_PHASES:
            self.report.tasks_not_final += 1
            self.flag(
                Invariant.ENDS_FINAL,
                life.key,
                f"task {life.key} ended the run in phase {phase or 'none'} (epoch "
                f"{epoch_of(final)}, holder {holder_of(final)}), not final",
            )
        attempts = status.get("attempts") or []
        used = max(len(attempts), int(status.get("attempt") or 0))
        allowed = _max_attempts(final.get("spec") or {})
        if used > allowed:
            self.flag(
                Invariant.ENDS_FINAL,
                life.key,
                f"task {life.key} used {used} attempts, more than spec.retry.maxAttempts "
                f"({allowed}): epochs {_listing(a.get('epoch') for a in attempts)}",
            )
        result = status.get("result")
        if isinstance(result, dict):
            self._result_from_holder(life, result, attempts)

    def _result_from_holder(
        self, life: _Life, result: dict[str, Any], attempts: list[dict[str, Any]]
    ) -> None:
        epoch = result.get("epoch")
        write = next(
            (
                w
                for w in reversed(life.writes)
                if "result" in _touched(w) and _status(w.response).get("result") == result
            ),
            None,
        )
        if write is None:
            self.flag(
                Invariant.ENDS_FINAL,
                life.key,
                f"no accepted write of task {life.key}'s final result (epoch {epoch}, "
                f"{result.get('status')}) is in the audit log (lost with an API server "
                f"killed between committing it and logging it, or written unrecorded)",
            )
            return
        record = next((a for a in attempts if a.get("epoch") == epoch), None)
        holder = (record or {}).get("holder") or write.holder
        if write.pod is None or write.pod != holder:
            self.flag(
                Invariant.ENDS_FINAL,
                life.key,
                f"the final result of task {life.key} (epoch {epoch}, {result.get('status')}) "
                f"was written at {_at(write)} by {_writer(write)}, not by pod {holder}, "
                f"which held epoch {epoch}",
                write,
            )

    def _missing_tasks(self) -> None:
        deleted = {
            w.task_key
            for w in self.history.writes
            if w.resource == PLURAL and w.verb == "delete" and w.accepted
        }
        for life in self.lives:
            if life.final is None and life.key not in deleted:
                self.report.tasks_not_final += 1
                last = life.writes[-1]
                self.flag(
                    Invariant.ENDS_FINAL,
                    life.key,
                    f"task {life.key} (uid {life.uid}, last written at {_at(last)}) is missing "
                    f"from the final listing and was not deleted",
                    last,
                )

    # --- 5 and 6. timeouts: never early, never too late ---------------------------------

    def _timeouts(self, life: _Life) -> None:
        ended = self._ends(life)
        for record in _status(life.final).get("attempts") or []:
            epoch, outcome = record.get("epoch"), record.get("outcome")
            if outcome in TIMEOUTS and isinstance(epoch, int) and epoch not in ended:
                ended[epoch] = (Outcome(outcome), _parse_time(record.get("endTime")), None)
        for epoch, (outcome, at, write) in sorted(ended.items()):
            if at is not None:
                self._judge_timeout(life, epoch, outcome, at, write)

    def _ends(self, life: _Life) -> dict[int, tuple[Outcome, datetime | None, Write | None]]:
        """Per epoch ended for a timeout: the outcome and the operator's first accepted write
        that recorded it (the next lease's previous-attempt annotation, or the status)."""
        ended: dict[int, tuple[Outcome, datetime | None, Write | None]] = {}
        for write in life.writes:
            if not self.is_operator(write) or not isinstance(write.request, dict):
                continue
            for record in _ended_records(write):
                epoch, outcome = record.get("epoch"), record.get("outcome")
                if isinstance(epoch, int) and outcome in TIMEOUTS and epoch not in ended:
                    ended[epoch] = (Outcome(outcome), write.at, write)
        return ended

    def _judge_timeout(
        self, life: _Life, epoch: int, outcome: Outcome, ended_at: datetime, ending: Write | None
    ) -> None:
        if ending is not None:
            spec = life.spec_at(ending)
            earlier = list(life.before(ending))
        else:
            spec = dict((life.final or {}).get("spec") or {})
            earlier = [w for w in reversed(life.writes) if w.at <= ended_at]
        reports = [
            w
            for w in earlier
            if not self.is_operator(w) and "progress" in _touched(w) and _reported_epoch(w) == epoch
        ]
        handout = next((w for w in reversed(earlier) if w.epoch == epoch), None)
        if outcome == Outcome.ACK_TIMEOUT:
            window_s, since = _window_s(spec, "ackTimeout"), handout
            what, reference = "spec.ackTimeout", "the hand-out"
            if reports:
                self.report.false_reassignments += 1
                self.flag(
                    Invariant.NO_FALSE_REASSIGNMENT,
                    life.key,
                    f"the operator ended epoch {epoch} of task {life.key} as AckTimeout at "
                    f"{_at(ending) if ending else ended_at.isoformat()}, but its runner's "
                    f"report was accepted at {_at(reports[0])}",
                    reports[0],
                    ending,
                )
                return
        else:
            window_s = _window_s(spec, "reportProgressTimeout")
            since = reports[0] if reports else handout
            what = "spec.reportProgressTimeout"
            reference = "the runner's last accepted report" if reports else "the hand-out"
        if since is None:
            return  # the hand-out predates the log (a trimmed history): nothing to measure from
        expiry = Expiry(
            task=life.key,
            epoch=epoch,
            outcome=outcome,
            window_s=window_s,
            since=since.at,
            ended_at=ended_at,
            blind_s=_overlap_s(self.blind, since.at, ended_at),
            leaderless_s=_overlap_s(self.unled, since.at, ended_at)
            - _overlap_s(self.blind, since.at, ended_at),
        )
        self.report.expiries.append(expiry)
        down = f" ({expiry.blind_s:.1f}s of it with the API server down)" if expiry.blind_s else ""
        when = _at(ending) if ending else f"{ended_at.isoformat()} (its attempt record)"
        if expiry.elapsed_s < window_s - self.tolerance_s:
            self.report.false_reassignments += 1
            self.flag(
                Invariant.NO_FALSE_REASSIGNMENT,
                life.key,
                f"the operator ended epoch {epoch} of task {life.key} as {outcome} at {when}, "
                f"{expiry.elapsed_s:.1f}s after {reference} at {_at(since)}{down}: less than "
                f"the {window_s:g}s {what}",
                since,
                ending,
            )
            return
        self.report.detection_delays_s.append(max(0.0, expiry.detection_s))
        if expiry.detection_s > self.history.detection_bound_s:
            unled = (
                f", {expiry.leaderless_s:.1f}s of it with no operator leading"
                if expiry.leaderless_s
                else ""
            )
            self.flag(
                Invariant.DETECTION_BOUND,
                life.key,
                f"the operator ended epoch {epoch} of task {life.key} as {outcome} at {when}, "
                f"{expiry.elapsed_s:.1f}s after {reference} at {_at(since)}{down}{unled}: "
                f"{expiry.detection_s:.1f}s past the {window_s:g}s {what}, more than the bound "
                f"of {self.history.detection_bound_s:g}s",
                since,
                ending,
            )


# --- reading writes -------------------------------------------------------------------------


def _lives(history: History) -> list[_Life]:
    lives: dict[str, _Life] = {}
    for write in history.writes:
        uid = write.uid
        if write.resource != PLURAL or not write.accepted or uid is None:
            continue
        life = lives.setdefault(uid, _Life(write.namespace, write.name, uid))
        life.writes.append(write)
    for task in history.final_tasks:
        metadata = task.get("metadata") or {}
        uid = str(metadata.get("uid", ""))
        life = lives.setdefault(
            uid, _Life(str(metadata.get("namespace", "")), str(metadata.get("name", "")), uid)
        )
        life.final = task
    for life in lives.values():
        life.writes.sort(key=lambda w: w.resource_version or 0)
    return sorted(lives.values(), key=lambda life: (life.key, life.uid))


def _status(task: Mapping[str, Any] | None) -> dict[str, Any]:
    status = (task or {}).get("status")
    return status if isinstance(status, dict) else {}


def _touched(write: Write) -> set[str]:
    """Which of status.progress and status.result the write's request changes."""
    request = write.request
    if isinstance(request, list):
        touched = set()
        for op in request:
            if not isinstance(op, dict) or op.get("op") == "test":
                continue
            for pointer in (op.get("path"), op.get("from")):
                for name in _REPORTED:
                    prefix = f"/status/{name}"
                    if isinstance(pointer, str) and (
                        pointer == prefix or pointer.startswith(prefix + "/")
                    ):
                        touched.add(name)
        return touched
    if isinstance(request, dict):
        status = request.get("status")
        return {n for n in _REPORTED if isinstance(status, dict) and n in status}
    return set()


def _written_epoch(write: Write, name: str) -> int | None:
    """The epoch a write of status.<name> carried: in the value sent when it sent one whole,
    else as the object has it after the write."""
    request = write.request
    value: Any = None
    if isinstance(request, list):
        for op in request:
            whole = isinstance(op, dict) and op.get("path") == f"/status/{name}"
            if whole and op.get("op") in ("add", "replace"):
                value = op.get("value")
    elif isinstance(request, dict):
        value = (request.get("status") or {}).get(name)
    if not isinstance(value, dict):
        value = _status(write.response).get(name)
    epoch = value.get("epoch") if isinstance(value, dict) else None
    return epoch if isinstance(epoch, int) else None


def _reported_epoch(write: Write) -> int | None:
    return _written_epoch(write, "progress")


def _status_fencing(write: Write) -> list[str]:
    problems: list[str] = []
    current, holder = write.epoch, write.holder
    for name in sorted(_touched(write)):
        written = _written_epoch(write, name)
        if written is not None and written != current:
            problems.append(
                f"status.{name} written with epoch {written} while the task's epoch was "
                f"{current} (stale epoch)"
            )
    if _touched(write) and write.pod is not None and write.pod != holder:
        problems.append(
            f"pod {write.pod} wrote {' and '.join(sorted(_touched(write)))} while pod "
            f"{holder or 'none'} held the lease"
        )
    return problems


def _tested(write: Write, pointer: str) -> str | None:
    if not isinstance(write.request, list):
        return None
    for op in write.request:
        if isinstance(op, dict) and op.get("op") == "test" and op.get("path") == pointer:
            value = op.get("value")
            return value if isinstance(value, str) else None
    return None


def _lease_fencing(write: Write, life: _Life) -> list[str]:
    """A pool runner's write of the main resource: a claim for its own pod raising the epoch
    by one, or a release of a lease its own pod held."""
    previous = next(life.before(write), None)
    tested_epoch = _tested(write, _EPOCH_POINTER)
    before_epoch = (
        int(tested_epoch)
        if tested_epoch is not None and tested_epoch.isdigit()
        else (previous.epoch if previous is not None else None)
    )
    tested_holder = _tested(write, _HOLDER_POINTER)
    before_holder = tested_holder or (previous.holder if previous is not None else None)
    after_epoch, after_holder = write.epoch, write.holder
    if after_epoch != before_epoch or (after_holder and after_holder != before_holder):
        problems = []
        if after_holder != write.pod:
            problems.append(f"a claim that made {after_holder or 'nobody'} the holder")
        if before_epoch is not None and after_epoch != before_epoch + 1:
            problems.append(f"a claim that moved the epoch from {before_epoch} to {after_epoch}")
        return problems
    if before_holder and not after_holder and before_holder != write.pod:
        return [f"a release of the lease pod {before_holder} held"]
    return []


def _ended_records(write: Write) -> Iterable[dict[str, Any]]:
    """The attempt records an operator write ends: the previous-attempt annotation a lease
    write carries, and the ended attempts of a status write."""
    request = write.request if isinstance(write.request, dict) else {}
    annotations = (request.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(PREVIOUS_ATTEMPT_ANNOTATION)
    if isinstance(text, str):
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if isinstance(record, dict):
            yield record
    for record in (request.get("status") or {}).get("attempts") or []:
        if isinstance(record, dict) and record.get("endTime"):
            yield record


def _window_s(spec: Mapping[str, Any], name: str) -> float:
    field_name = {"ackTimeout": "ack_timeout", "reportProgressTimeout": "report_progress_timeout"}
    default: timedelta = TaskSpec.model_fields[field_name[name]].default
    try:
        return parse_go_duration(spec.get(name, default)).total_seconds()
    except ValueError:
        return default.total_seconds()


def _max_attempts(spec: Mapping[str, Any]) -> int:
    default: int = RetryPolicy.model_fields["max_attempts"].default
    value = (spec.get("retry") or {}).get("maxAttempts", default)
    return value if isinstance(value, int) else default


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:
        return None


def _leaderless(history: History) -> list[Interval]:
    """When no operator replica led, from the election Lease's writes (the only Lease the
    operator writes): a leader renews every `RENEW_EVERY_S`; a longer gap between accepted
    writes is a leader gone (killed, or stepped down) until its successor took the Lease,
    counted from its death when the harness knows it, else from when its next renewal was
    due."""
    writes = sorted(
        (w for w in history.writes
         if w.resource == "leases" and w.accepted and w.user in history.operator_users),
        key=lambda w: w.at,
    )  # fmt: skip
    due = timedelta(seconds=RENEW_EVERY_S)
    slack = timedelta(seconds=1.0)
    gaps = []
    for a, b in itertools.pairwise(writes):
        if b.at - a.at <= due + slack:
            continue
        deaths = [
            _aware(when)
            for user, when in history.operator_deaths
            if user == a.user and a.at <= _aware(when) <= a.at + due
        ]
        gaps.append((min([a.at + due, *deaths]), b.at))
    return gaps


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _merged(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted((_aware(s), _aware(e)) for s, e in intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap_s(intervals: Iterable[Interval], start: datetime, end: datetime) -> float:
    return sum(max(0.0, (min(end, e) - max(start, s)).total_seconds()) for s, e in intervals)


def _at(write: Write | None) -> str:
    return write.at.isoformat() if write is not None else "an unknown time"


def _writer(write: Write) -> str:
    return f"pod {write.pod} ({write.user})" if write.pod else write.user


def _listing(values: Iterable[Any]) -> str:
    kept = sorted(v for v in values if isinstance(v, int))
    return ", ".join(str(v) for v in kept) or "none"


__all__ = [
    "Expiry",
    "Invariant",
    "Report",
    "Violation",
    "check",
    "percentile",
]
