"""The soak's history reader and invariant checker (soak/history.py, soak/checker.py).

Synthetic histories are built by `Recorder`, which writes audit events in the shape the API
server's audit log has them (compare tests/fixtures/soak/clean-small.json): a clean history
passes, and each planted violation is caught under its own invariant and nothing else.

tests/fixtures/soak/clean-small.json is a real recorded history, made once by a script run by
hand (not kept): a control plane started with `soak.audit.apiserver_args`, the CRD applied,
the operator as a process with a client certificate of its own ("tasklease-operator-0",
leader election on), runners played with the SDK on ServiceAccount tokens bound to the
operator's runner pods (a pool runner on a token bound to a pod of its own): "finishes"
succeeds, "fails" reports a non-retryable error, "pooled" is claimed by a pool runner, and
"hangs" stops reporting after its acknowledgement, is handed to epoch 2 as ProgressTimeout,
and its zombie's late report is refused (422); then `History.save`, keeping the events of the
test namespace without their `annotations`, `sourceIPs`, `userAgent`, `requestURI` and
`requestReceivedTimestamp`. failing-zombie-write-accepted.json is the same history with that
refused write turned into an accepted one (later resourceVersions moved up by one), saved
with the violation the checker found.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from soak.audit import POLICY, apiserver_args, audit_log_path
from soak.checker import Invariant, Report, Violation, check, percentile
from soak.history import (
    POD_NAME_EXTRA,
    History,
    parse_audit_lines,
    read_audit_log,
    saved_violations,
    served_again,
)
from tasklease.api.models import (
    CLAIMABLE_LABEL,
    EPOCH_ANNOTATION,
    EPOCH_LABEL,
    HOLDER_ANNOTATION,
    PREVIOUS_ATTEMPT_ANNOTATION,
    TASK_LABEL,
    WORKER_GROUP_LABEL,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "soak"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NS = "soak"
ADMIN = "tasklease-admin"
OPERATOR = "tasklease-operator-0"
RUNNER = f"system:serviceaccount:{NS}:tasklease-runner"
POOL_RUNNER = f"system:serviceaccount:{NS}:tasklease-pool-runner"
SPEC: dict[str, Any] = {
    "ackTimeout": "5s",
    "reportProgressTimeout": "10s",
    "heartbeatInterval": "1s",
    "retry": {"maxAttempts": 3},
}
TEMPLATE = {"spec": {"containers": [{"name": "runner", "image": "busybox"}]}}
NOT_APPLIED = "the server rejected our request due to an error in our request"


def stamp(at_s: float) -> str:
    return (T0 + timedelta(seconds=at_s)).isoformat().replace("+00:00", "Z")


def compact(event: dict[str, Any]) -> str:
    """An event as the API server writes it to its log: one line, no spaces."""
    return json.dumps(event, separators=(",", ":"))


def pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def attempt(
    number: int, epoch: int, holder: str, start_s: float, end_s: float | None = None, **ended: str
) -> dict[str, Any]:
    """An attempt record as the operator writes it (`AttemptRecord`, camelCase)."""
    record: dict[str, Any] = {
        "attempt": number,
        "epoch": epoch,
        "holder": holder,
        "startTime": stamp(start_s),
    }
    if end_s is not None:
        record.update(endTime=stamp(end_s), **ended)
    return record


class Recorder:
    """Audit events of one namespace, as the API server records them, and the Tasks' state.

    Each write is applied to the Task it names only when its code says it was accepted, and
    the response is the Task after it, with a new resourceVersion, as the API server's.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.version = 100

    # --- the audit event ---------------------------------------------------------------

    def event(
        self,
        at_s: float,
        *,
        verb: str,
        resource: str,
        name: str,
        user: str,
        code: int,
        request: Any,
        response: dict[str, Any] | None = None,
        subresource: str = "",
        pod: str | None = None,
    ) -> dict[str, Any]:
        group = {"tasks": "tasklease.io", "pods": "", "leases": "coordination.k8s.io"}[resource]
        ref: dict[str, Any] = {"resource": resource, "namespace": NS, "name": name}
        if group:
            ref["apiGroup"] = group
        if subresource:
            ref["subresource"] = subresource
        user_info: dict[str, Any] = {"username": user, "groups": ["system:authenticated"]}
        if pod is not None:
            user_info["extra"] = {POD_NAME_EXTRA: [pod]}
        status: dict[str, Any] = {"metadata": {}, "code": code}
        if code >= 300:
            status.update(status="Failure", message=NOT_APPLIED, reason="Invalid")
        event: dict[str, Any] = {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "RequestResponse" if resource == "tasks" else "Request",
            "auditID": str(uuid.uuid4()),
            "stage": "ResponseComplete",
            "verb": verb,
            "user": user_info,
            "objectRef": ref,
            "responseStatus": status,
            "requestObject": request,
            "stageTimestamp": stamp(at_s),
        }
        if response is not None:
            event["responseObject"] = response
        self.events.append(event)
        return event

    def task_write(
        self,
        at_s: float,
        name: str,
        change: Callable[[dict[str, Any]], None],
        *,
        user: str,
        request: Any,
        code: int = 200,
        subresource: str = "",
        pod: str | None = None,
        verb: str = "patch",
    ) -> dict[str, Any]:
        response = None
        if 200 <= code < 300:
            task = self.tasks[name]
            change(task)
            self.version += 1
            task["metadata"]["resourceVersion"] = str(self.version)
            response = copy.deepcopy(task)
        return self.event(
            at_s,
            verb=verb,
            resource="tasks",
            name=name,
            user=user,
            code=code,
            request=request,
            response=response,
            subresource=subresource,
            pod=pod,
        )

    # --- what the harness, the operator and the runners write --------------------------

    def create(self, at_s: float, name: str, **spec: Any) -> None:
        body = {
            "apiVersion": "tasklease.io/v1alpha1",
            "kind": "Task",
            "metadata": {"name": name},
            "spec": {**SPEC, **spec},
        }
        self.tasks[name] = {
            **copy.deepcopy(body),
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
            "status": {"phase": "Pending", "attempt": 0, "epoch": 0},
        }
        self.task_write(at_s, name, lambda task: None, user=ADMIN, request=body, verb="create")

    def lease(
        self,
        at_s: float,
        name: str,
        *,
        epoch: int,
        holder: str | None,
        previous: dict[str, Any] | None = None,
        labels: dict[str, str | None] | None = None,
        code: int = 200,
    ) -> None:
        """The operator's compare-and-swap merge patch of the lease annotations."""
        annotations: dict[str, str | None] = {
            HOLDER_ANNOTATION: holder,
            EPOCH_ANNOTATION: str(epoch),
            PREVIOUS_ATTEMPT_ANNOTATION: compact(previous) if previous else None,
        }
        version = self.tasks[name]["metadata"]["resourceVersion"]
        metadata: dict[str, Any] = {"resourceVersion": version, "annotations": annotations}
        if labels:
            metadata["labels"] = labels

        def change(task: dict[str, Any]) -> None:
            for key, changes in (("annotations", annotations), ("labels", labels or {})):
                merged = {**task["metadata"].get(key, {}), **changes}
                task["metadata"][key] = {k: v for k, v in merged.items() if v is not None}

        self.task_write(
            at_s, name, change, user=OPERATOR, request={"metadata": metadata}, code=code
        )

    def status(self, at_s: float, name: str, **status: Any) -> None:
        """The operator's compare-and-swap merge patch of the status."""
        version = self.tasks[name]["metadata"]["resourceVersion"]

        def change(task: dict[str, Any]) -> None:
            merged = {**task["status"], **status}
            task["status"] = {k: v for k, v in merged.items() if v is not None}

        request = {"metadata": {"resourceVersion": version}, "status": status}
        self.task_write(at_s, name, change, user=OPERATOR, request=request, subresource="status")

    def pod(self, at_s: float, task: str, epoch: int, *, code: int = 201) -> None:
        name = f"{task}-{epoch}"
        labels = {TASK_LABEL: task, EPOCH_LABEL: str(epoch), "tasklease.io/role": "runner"}
        request = {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "labels": labels}}
        self.event(at_s, verb="create", resource="pods", name=name, user=OPERATOR, code=code,
                   request=request)  # fmt: skip

    def report(
        self,
        at_s: float,
        name: str,
        *,
        pod: str | None,
        epoch: int,
        holder: str | None = None,
        field: str = "progress",
        code: int = 200,
        user: str = RUNNER,
        **value: Any,
    ) -> None:
        """A runner's fenced JSON Patch of status.progress (or status.result), as the SDK
        makes it: `test` of the epoch and holder it was given, then the value."""
        body = {"epoch": epoch, "reportTime": stamp(at_s), **value}
        request = [
            {"op": "test", "path": f"/metadata/annotations/{pointer(EPOCH_ANNOTATION)}",
             "value": str(epoch)},
            {"op": "test", "path": f"/metadata/annotations/{pointer(HOLDER_ANNOTATION)}",
             "value": holder or pod},
            {"op": "add", "path": f"/status/{field}", "value": body},
        ]  # fmt: skip

        def change(task: dict[str, Any]) -> None:
            task["status"][field] = body

        self.task_write(
            at_s, name, change, user=user, request=request, code=code, subresource="status",
            pod=pod,
        )  # fmt: skip

    def result(self, at_s: float, name: str, *, pod: str | None, epoch: int, **kw: Any) -> None:
        self.report(at_s, name, pod=pod, epoch=epoch, field="result", status="FINISHED", **kw)

    def claim(self, at_s: float, name: str, *, pod: str, epoch: int, to_epoch: int) -> None:
        """A pool runner's claim (`tasklease.runner.pool.claim_patch`)."""
        annotations = "/metadata/annotations/"
        request = [
            {"op": "test", "path": annotations + pointer(EPOCH_ANNOTATION), "value": str(epoch)},
            {"op": "test", "path": "/metadata/labels/" + pointer(CLAIMABLE_LABEL),
             "value": "true"},
            {"op": "add", "path": annotations + pointer(HOLDER_ANNOTATION), "value": pod},
            {"op": "replace", "path": annotations + pointer(EPOCH_ANNOTATION),
             "value": str(to_epoch)},
            {"op": "remove", "path": "/metadata/labels/" + pointer(CLAIMABLE_LABEL)},
        ]  # fmt: skip

        def change(task: dict[str, Any]) -> None:
            task["metadata"]["annotations"].update(
                {HOLDER_ANNOTATION: pod, EPOCH_ANNOTATION: str(to_epoch)}
            )
            task["metadata"]["labels"].pop(CLAIMABLE_LABEL)

        self.task_write(at_s, name, change, user=POOL_RUNNER, request=request, pod=pod)

    def history(self, **harness: Any) -> History:
        """The history as the harness makes it: the log read back, the Tasks as they are."""
        writes = parse_audit_lines(compact(event) for event in self.events)
        return History(
            writes=writes,
            final_tasks=copy.deepcopy(list(self.tasks.values())),
            operator_users={OPERATOR},
            detection_bound_s=5.0,
            **harness,
        )


# --- the scenarios -----------------------------------------------------------------------


def pod_task_reassigned(
    rec: Recorder,
    *,
    silence_s: float = 10.2,
    zombie_code: int = 422,
    zombie_epoch: int = 1,
    result_pod: str | None = "t-2",
) -> float:
    """Task t: pod t-1 acknowledges, reports until 2.5 s and falls silent; after `silence_s`
    the operator hands epoch 2 to t-2 (ProgressTimeout); t-1's late report is refused; t-2
    finishes. Returns when the reassignment was."""
    rec.create(0.0, "t", template=TEMPLATE)
    rec.lease(0.1, "t", epoch=1, holder="t-1")
    rec.pod(0.12, "t", 1)
    first = attempt(1, 1, "t-1", 0.1)
    rec.status(0.15, "t", phase="Assigned", attempt=1, epoch=1, holder="t-1", attempts=[first])
    rec.report(0.5, "t", pod="t-1", epoch=1, percent=0)
    rec.status(0.55, "t", phase="Running")
    rec.report(1.5, "t", pod="t-1", epoch=1, percent=10)
    rec.report(2.5, "t", pod="t-1", epoch=1, percent=20)
    at = 2.5 + silence_s
    ended = attempt(1, 1, "t-1", 0.1, at, outcome="ProgressTimeout", message="no report")
    rec.lease(at, "t", epoch=2, holder="t-2", previous=ended)
    rec.pod(at + 0.02, "t", 2)
    rec.report(at + 0.05, "t", pod="t-1", epoch=zombie_epoch, code=zombie_code, holder="t-1")
    second = attempt(2, 2, "t-2", at)
    rec.status(at + 0.1, "t", phase="Assigned", attempt=2, epoch=2, holder="t-2",
               attempts=[ended, second])  # fmt: skip
    rec.report(at + 0.5, "t", pod="t-2", epoch=2, percent=20)
    rec.status(at + 0.55, "t", phase="Running")
    rec.result(at + 1.5, "t", pod=result_pod, epoch=2, holder="t-2")
    done = attempt(2, 2, "t-2", at, at + 1.6, outcome="Succeeded")
    rec.status(at + 1.6, "t", phase="Succeeded", holder=None, attempts=[ended, done])
    rec.lease(at + 1.7, "t", epoch=2, holder=None)
    return at


def pool_task_claimed(rec: Recorder, *, to_epoch: int = 1) -> None:
    """Task p: offered to the pool, claimed by pool-0, finished."""
    rec.create(0.0, "p", workerGroup="gpu")
    rec.lease(0.1, "p", epoch=0, holder=None,
              labels={WORKER_GROUP_LABEL: "gpu", CLAIMABLE_LABEL: "true"})  # fmt: skip
    rec.claim(0.3, "p", pod="pool-0", epoch=0, to_epoch=to_epoch)
    first = attempt(1, to_epoch, "pool-0", 0.3)
    rec.status(0.35, "p", phase="Assigned", attempt=1, epoch=to_epoch, holder="pool-0",
               attempts=[first])  # fmt: skip
    rec.report(0.6, "p", pod="pool-0", epoch=to_epoch, user=POOL_RUNNER, percent=50)
    rec.result(1.0, "p", pod="pool-0", epoch=to_epoch, user=POOL_RUNNER)
    done = attempt(1, to_epoch, "pool-0", 0.3, 1.1, outcome="Succeeded")
    rec.status(1.1, "p", phase="Succeeded", holder=None, attempts=[done])
    rec.lease(1.2, "p", epoch=to_epoch, holder=None, labels={CLAIMABLE_LABEL: None})


def final(history: History, name: str) -> dict[str, Any]:
    return next(t for t in history.final_tasks if t["metadata"]["name"] == name)


def planted(plant: str | None) -> History:
    """The clean history (tasks t and p), with one violation planted."""
    rec = Recorder()
    knobs_by_plant: dict[str, dict[str, Any]] = {
        "reassigned-2s-after-the-last-report": {"silence_s": 2.0},
        "reassigned-30s-past-the-window": {"silence_s": 40.2},
        "report-from-a-pod-that-is-not-the-holder": {"zombie_code": 200, "zombie_epoch": 2},
        "result-from-a-token-bound-to-no-pod": {"result_pod": None},
    }
    knobs = knobs_by_plant.get(plant or "", {})
    at = pod_task_reassigned(rec, **knobs)
    pool_task_claimed(rec, to_epoch=2 if plant == "claim-that-skips-an-epoch" else 1)
    if plant == "stale-epoch-report":
        rec.report(at + 1.0, "t", pod="t-2", epoch=1, holder="t-2", percent=30)
    if plant == "two-pods-for-one-epoch":
        rec.pod(at + 0.4, "t", 2)
    if plant == "epoch-goes-down":
        rec.lease(at + 2.0, "t", epoch=1, holder=None)
    history = rec.history()
    status = final(history, "t")["status"]
    if plant == "epoch-without-attempt-record":
        status["attempts"] = status["attempts"][1:]
    if plant == "task-not-final":
        status["phase"] = "Running"
    if plant == "too-many-attempts":
        final(history, "t")["spec"]["retry"]["maxAttempts"] = 1
    return history


def found(report: Report) -> set[tuple[str, str]]:
    return {(v.invariant.value, v.task) for v in report.violations}


# --- the checker ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (None, set()),
        ("stale-epoch-report", {(Invariant.FENCING, "soak/t")}),
        ("report-from-a-pod-that-is-not-the-holder", {(Invariant.FENCING, "soak/t")}),
        ("claim-that-skips-an-epoch", {(Invariant.FENCING, "soak/p")}),
        ("two-pods-for-one-epoch", {(Invariant.ONE_POD_PER_EPOCH, "soak/t")}),
        ("epoch-goes-down", {(Invariant.EPOCHS, "soak/t")}),
        ("epoch-without-attempt-record", {(Invariant.EPOCHS, "soak/t")}),
        ("task-not-final", {(Invariant.ENDS_FINAL, "soak/t")}),
        ("too-many-attempts", {(Invariant.ENDS_FINAL, "soak/t")}),
        ("result-from-a-token-bound-to-no-pod", {(Invariant.ENDS_FINAL, "soak/t")}),
        ("reassigned-2s-after-the-last-report", {(Invariant.NO_FALSE_REASSIGNMENT, "soak/t")}),
        ("reassigned-30s-past-the-window", {(Invariant.DETECTION_BOUND, "soak/t")}),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_checker_catches_planted_violations(
    plant: str | None, expected: set[tuple[str, str]]
) -> None:
    report = check(planted(plant))

    assert found(report) == expected, [v.detail for v in report.violations]
    for violation in report.violations:
        assert violation.audit_ids or violation.invariant == Invariant.ENDS_FINAL
        assert "soak/" in violation.detail


def test_clean_history_figures() -> None:
    report = check(planted(None))

    assert report.ok
    assert report.tasks == 2
    assert report.accepted_runner_writes == 8  # t: four reports, a result; p: claim, report, result
    assert report.accepted_stale_or_foreign_writes == 0
    assert [(e.task, e.epoch, e.outcome.value) for e in report.expiries] == [
        ("soak/t", 1, "ProgressTimeout")
    ]
    assert report.detection_delays_s == pytest.approx([0.2])


def test_stale_and_foreign_writes_are_counted_once_each() -> None:
    report = check(planted("report-from-a-pod-that-is-not-the-holder"))

    assert report.accepted_stale_or_foreign_writes == 1
    assert "pod t-1 wrote progress while pod t-2 held the lease" in report.violations[0].detail


def test_a_second_pod_for_an_epoch_is_counted_but_a_retried_create_is_not() -> None:
    rec = Recorder()
    pod_task_reassigned(rec)
    rec.pod(20.0, "t", 2, code=409)  # AlreadyExists: the retry after a crash finds it

    assert check(rec.history()).ok

    rec.pod(21.0, "t", 2)
    assert check(rec.history()).double_pods == 1


def test_time_with_the_api_server_down_does_not_count_against_a_lease() -> None:
    rec = Recorder()
    pod_task_reassigned(rec, silence_s=40.2)
    down = (T0 + timedelta(seconds=5), T0 + timedelta(seconds=35))

    excused = check(rec.history(blind=[down]))
    assert excused.ok, [v.detail for v in excused.violations]
    assert excused.detection_delays_s == pytest.approx([0.2])

    late = check(rec.history())
    assert found(late) == {(Invariant.DETECTION_BOUND, "soak/t")}


def test_a_detection_late_only_because_no_operator_led_is_within_the_bound() -> None:
    """A killed leader's Lease must expire before its standby takes over: the election
    Lease's renewals (every 5 s) stop, and no operator can detect anything until the next
    write. That time does not count against detection; a late expiry while led does."""
    rec = Recorder()
    for renewal_s in (0.0, 5.0, 10.0, 30.0, 35.0, 40.0):  # the leader died after 10 s
        rec.event(
            renewal_s, verb="update", resource="leases", name="tasklease-operator",
            user=OPERATOR, code=200, request={},
        )  # fmt: skip
    # Silent from 2.5 s, ended at 28.5 s: 16 s past the 10 s window, 13.5 s of them with no
    # operator leading (from 15 s, when the dead leader's renewal was due, to 30 s).
    pod_task_reassigned(rec, silence_s=26.0)

    report = check(rec.history())
    assert report.ok, [v.detail for v in report.violations]
    assert report.detection_delays_s == pytest.approx([2.5])
    assert report.expiries[0].leaderless_s == pytest.approx(13.5)


def test_a_leader_killed_right_after_renewing_leads_no_more() -> None:
    """The harness knows when it killed the leader (11 s, a second after its renewal): no
    operator led from then on, not only from when its next renewal was due."""
    rec = Recorder()
    for renewal_s in (0.0, 5.0, 10.0, 30.0, 35.0, 40.0):
        rec.event(
            renewal_s, verb="update", resource="leases", name="tasklease-operator",
            user=OPERATOR, code=200, request={},
        )  # fmt: skip
    pod_task_reassigned(rec, silence_s=26.0)
    killed = T0 + timedelta(seconds=11)

    report = check(rec.history(operator_deaths=[(OPERATOR, killed)]))
    assert report.expiries[0].leaderless_s == pytest.approx(17.5)  # 11 s to 28.5 s
    other = check(rec.history(operator_deaths=[("tasklease-operator-9", killed)]))
    assert other.expiries[0].leaderless_s == pytest.approx(13.5)  # not the leader's death


def test_an_api_server_serves_again_from_its_first_write_after_the_restart() -> None:
    """The audit log is the witness: the new process served from its first recorded write,
    before its /readyz answered; a write the old one completed before it stopped is not
    one."""
    rec = Recorder()
    for at_s in (1.0, 12.5, 13.0):
        rec.event(
            at_s, verb="update", resource="leases", name="tasklease-operator",
            user=OPERATOR, code=200, request={},
        )  # fmt: skip
    writes = rec.history().writes
    restarted, ready = T0 + timedelta(seconds=10), T0 + timedelta(seconds=15)
    assert served_again(writes, restarted_at=restarted, ready_at=ready) == T0 + timedelta(
        seconds=12.5
    )
    late = T0 + timedelta(seconds=14)
    assert served_again(writes, restarted_at=late, ready_at=ready) == ready


def test_a_reassignment_early_only_because_of_downtime_is_false() -> None:
    rec = Recorder()
    pod_task_reassigned(rec, silence_s=12.0)
    down = (T0 + timedelta(seconds=4), T0 + timedelta(seconds=8))

    report = check(rec.history(blind=[down]))

    assert found(report) == {(Invariant.NO_FALSE_REASSIGNMENT, "soak/t")}
    assert report.false_reassignments == 1
    assert "4.0s of it with the API server down" in report.violations[0].detail


def ack_timeout(rec: Recorder, *, acknowledged: bool, after_s: float = 5.2) -> None:
    """Task a: pod a-1 never (or once) reports; the operator ends epoch 1 as AckTimeout."""
    rec.create(0.0, "a", template=TEMPLATE)
    rec.lease(0.1, "a", epoch=1, holder="a-1")
    rec.pod(0.12, "a", 1)
    first = attempt(1, 1, "a-1", 0.1)
    rec.status(0.15, "a", phase="Assigned", attempt=1, epoch=1, holder="a-1", attempts=[first])
    if acknowledged:
        rec.report(1.0, "a", pod="a-1", epoch=1)
    at = 0.1 + after_s
    ended = attempt(1, 1, "a-1", 0.1, at, outcome="AckTimeout")
    rec.lease(at, "a", epoch=2, holder="a-2", previous=ended)
    rec.status(at + 0.1, "a", attempt=2, epoch=2, holder="a-2",
               attempts=[ended, attempt(2, 2, "a-2", at)])  # fmt: skip
    rec.result(at + 1.0, "a", pod="a-2", epoch=2)
    done = attempt(2, 2, "a-2", at, at + 1.1, outcome="Succeeded")
    rec.status(at + 1.1, "a", phase="Succeeded", holder=None, attempts=[ended, done])


def test_an_ack_timeout_is_measured_from_the_hand_out() -> None:
    rec = Recorder()
    ack_timeout(rec, acknowledged=False)

    report = check(rec.history())

    assert report.ok, [v.detail for v in report.violations]
    assert report.detection_delays_s == pytest.approx([0.2])


def test_an_ack_timeout_after_an_accepted_report_is_a_false_reassignment() -> None:
    rec = Recorder()
    ack_timeout(rec, acknowledged=True)

    report = check(rec.history())

    assert found(report) == {(Invariant.NO_FALSE_REASSIGNMENT, "soak/a")}


def test_an_expiry_missing_from_the_log_is_judged_from_its_attempt_record() -> None:
    rec = Recorder()
    pod_task_reassigned(rec, silence_s=2.0)
    history = rec.history()
    # Both operator writes that recorded the end (the lease, then the status) were lost.
    history.writes = [w for w in history.writes if "ProgressTimeout" not in json.dumps(w.request)]

    report = check(history)

    assert (Invariant.NO_FALSE_REASSIGNMENT, "soak/t") in found(report)
    assert "(its attempt record)" in report.violations[0].detail


def test_a_task_written_but_missing_from_the_final_listing_is_not_final() -> None:
    rec = Recorder()
    pool_task_claimed(rec)
    history = rec.history()
    history.final_tasks = []

    report = check(history)

    assert found(report) == {(Invariant.ENDS_FINAL, "soak/p")}
    assert report.tasks_not_final == 1


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 99) == 99.0
    assert percentile([0.5], 99) == 0.5


# --- the history ------------------------------------------------------------------------


def test_an_unfinished_last_line_is_skipped(tmp_path: Path) -> None:
    rec = Recorder()
    pool_task_claimed(rec)
    lines = [compact(event) for event in rec.events]
    log = tmp_path / "audit.log"
    log.write_text("\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2])

    assert len(read_audit_log(log)) == len(lines)


def test_a_line_cut_by_a_killed_api_server_gives_the_event_appended_after_it() -> None:
    rec = Recorder()
    pool_task_claimed(rec)
    first, second, *rest = (compact(event) for event in rec.events)

    writes = parse_audit_lines([first[:40] + second, *rest])

    assert [w.audit_id for w in writes] == [e["auditID"] for e in rec.events[1:]]


def test_writes_are_ordered_by_completion_then_resource_version() -> None:
    rec = Recorder()
    pool_task_claimed(rec)
    rec.events[3]["stageTimestamp"] = rec.events[2]["stageTimestamp"]
    shuffled = [rec.events[3], rec.events[2], *rec.events[:2], *rec.events[4:]]

    writes = parse_audit_lines(compact(event) for event in shuffled)

    assert [w.audit_id for w in writes] == [e["auditID"] for e in rec.events]


def test_a_write_made_by_impersonation_counts_as_the_impersonated_pod() -> None:
    rec = Recorder()
    pool_task_claimed(rec)
    report_event = next(e for e in rec.events if e["user"].get("extra"))
    report_event["impersonatedUser"] = report_event["user"]
    report_event["user"] = {"username": ADMIN, "groups": ["system:masters"]}

    write = next(w for w in parse_audit_lines([compact(report_event)]))

    assert (write.user, write.pod) == (POOL_RUNNER, "pool-0")


def test_a_refused_write_keeps_its_reason_and_no_object() -> None:
    rec = Recorder()
    pod_task_reassigned(rec)

    refused = next(w for w in rec.history().writes if w.code == 422)

    assert (refused.accepted, refused.response, refused.message) == (False, None, NOT_APPLIED)
    assert refused.request[0]["op"] == "test"


def test_a_history_checks_the_same_after_save_and_load(tmp_path: Path) -> None:
    history = planted("stale-epoch-report")
    history.blind = [(T0, T0 + timedelta(seconds=1))]
    history.operator_deaths = [(OPERATOR, T0 + timedelta(seconds=2))]
    report = check(history)
    path = tmp_path / "history.json"

    history.save(path, expected=report.violations)
    loaded = History.load(path)

    assert [w.audit_id for w in loaded.writes] == [w.audit_id for w in history.writes]
    assert (loaded.blind, loaded.operator_users) == (history.blind, history.operator_users)
    assert loaded.operator_deaths == history.operator_deaths
    assert check(loaded).violations == report.violations
    assert [Violation.from_json(v) for v in saved_violations(path)] == report.violations


# --- recorded histories -----------------------------------------------------------------


def test_a_recorded_clean_history_passes() -> None:
    history = History.load(FIXTURES / "clean-small.json")

    report = check(history)

    assert report.ok, [v.detail for v in report.violations]
    assert report.tasks == 4
    assert report.accepted_stale_or_foreign_writes == report.double_pods == 0
    assert [(e.task, e.epoch, e.outcome.value) for e in report.expiries] == [
        ("soak/hangs", 1, "ProgressTimeout")
    ]
    assert report.false_reassignments == 0
    assert 0 <= report.detection_delays_s[0] < history.detection_bound_s
    refused = [w for w in history.writes if w.resource == "tasks" and not w.accepted]
    assert any(w.pod == "hangs-1" and w.code == 422 for w in refused)


def test_the_part_of_a_history_about_one_task_is_checked_alike() -> None:
    history = History.load(FIXTURES / "clean-small.json")

    part = history.restricted_to({"soak/hangs"})

    # Its writes, its pods', and the leader election's Lease (no pool runner's: not a pool task).
    assert {(w.resource, w.task_key) for w in part.writes} == {
        ("tasks", "soak/hangs"),
        ("pods", "soak/hangs-1"),
        ("pods", "soak/hangs-2"),
        ("leases", "soak/tasklease-operator"),
    }
    assert [t["metadata"]["name"] for t in part.final_tasks] == ["hangs"]
    report = check(part)
    assert report.ok and report.tasks == 1
    assert [(e.task, e.epoch) for e in report.expiries] == [("soak/hangs", 1)]


@pytest.mark.parametrize(
    "path",
    sorted(FIXTURES.glob("failing-*.json")),
    ids=lambda path: path.stem,
)
def test_a_saved_failing_history_is_replayed(path: Path) -> None:
    expected = {(v["invariant"], v["task"]) for v in saved_violations(path)}

    report = check(History.load(path))

    assert expected, f"{path.name} keeps no violations beside its history"
    assert expected <= found(report), [v.detail for v in report.violations]


# --- the audit policy -------------------------------------------------------------------


def test_the_api_server_is_told_to_log_every_audited_write_unrotated(tmp_path: Path) -> None:
    args = apiserver_args(tmp_path / "audit")
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in args)

    assert yaml.safe_load(Path(flags["audit-policy-file"]).read_text()) == POLICY
    assert flags["audit-log-path"] == str(audit_log_path(tmp_path / "audit"))
    assert flags["audit-log-mode"] == "blocking"
    assert flags["audit-log-format"] == "json"
    assert flags["audit-log-maxsize"] == flags["audit-log-maxbackup"] == "0"
    assert POLICY["rules"][-1] == {"level": "None"}
    assert "RequestReceived" in POLICY["omitStages"]
