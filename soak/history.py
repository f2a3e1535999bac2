"""A soak run's history: the writes the API server's audit log recorded, plus what the harness
knows that the log cannot tell (the Tasks as they ended, when the API server was down, who
the operator was).

The audit log is the ground truth because it is written by the one party every write goes
through: a write is in it with the code the API server answered, the identity it was made
with (for a runner, the pod its ServiceAccount token was bound to), the request as sent (a
JSON Patch stays a list of operations) and, for Tasks, the object as it was right after.

A history saves to one JSON file (the audit events as the log had them, and the rest), so a
failing run can be kept as a test fixture and checked again (`tests/unit/test_soak_checker.py`
replays every `tests/fixtures/soak/failing-*.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

from tasklease.api.models import EPOCH_ANNOTATION, HOLDER_ANNOTATION, PLURAL

logger = logging.getLogger(__name__)

POD_NAME_EXTRA: Final = "authentication.kubernetes.io/pod-name"
SERVICE_ACCOUNT_PREFIX: Final = "system:serviceaccount:"
FORMAT_VERSION: Final = 1
# Where an audit event starts: how a line that a killed API server left unfinished, and the
# next start of the API server continued, is cut back to the event that follows.
_EVENT_START: Final = re.compile(r'\{"kind":\s*"Event"')


@dataclass(frozen=True, slots=True)
class Write:
    """One write the API server answered, as its audit event recorded it."""

    at: datetime  # stageTimestamp: when the API server completed it, on its own clock
    verb: str  # create, update, patch, delete
    resource: str  # tasks, pods, leases
    subresource: str  # "" or "status"
    namespace: str
    name: str
    user: str  # the identity the write was made as (the impersonated user, if any)
    pod: str | None  # the pod the user's ServiceAccount token was bound to
    code: int
    request: Any  # the body sent: a JSON Patch is its list of operations
    response: dict[str, Any] | None  # the object after an accepted write (Task writes only)
    audit_id: str
    message: str = ""  # why a refused write was refused, as the API server said
    event: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def runner(self) -> bool:
        """Made by a ServiceAccount: a runner pod, unless it is an operator's identity (the
        checker tells those apart with `History.operator_users`)."""
        return self.user.startswith(SERVICE_ACCOUNT_PREFIX)

    @property
    def task_key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def uid(self) -> str | None:
        return _metadata(self.response).get("uid") if self.response is not None else None

    @property
    def resource_version(self) -> int | None:
        """The response's resourceVersion as an integer (Kubernetes 1.35 made comparing those
        of one resource supported, KEP-5504); None when there is none."""
        text = _metadata(self.response).get("resourceVersion")
        return int(text) if isinstance(text, str) and text.isdigit() else None

    @property
    def epoch(self) -> int | None:
        """The response's epoch annotation; None without a response or a readable one."""
        return epoch_of(self.response) if self.response is not None else None

    @property
    def holder(self) -> str | None:
        return holder_of(self.response) if self.response is not None else None


def epoch_of(task: Mapping[str, Any]) -> int | None:
    text = (_metadata(task).get("annotations") or {}).get(EPOCH_ANNOTATION)
    return int(text) if isinstance(text, str) and text.isdigit() else None


def holder_of(task: Mapping[str, Any]) -> str | None:
    holder = (_metadata(task).get("annotations") or {}).get(HOLDER_ANNOTATION)
    return holder if isinstance(holder, str) and holder else None


def _metadata(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    metadata = (obj or {}).get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def write_from_event(event: Mapping[str, Any]) -> Write | None:
    """The write an audit event records; None for an event of another stage, or one that
    names no object."""
    if event.get("stage") != "ResponseComplete":
        return None
    ref = event.get("objectRef") or {}
    if not ref.get("resource"):
        return None
    # An impersonated request is recorded with the impersonator as `user`; the write was made
    # as `impersonatedUser`, which carries the pod-name claim if one was impersonated too.
    user = event.get("impersonatedUser") or event.get("user") or {}
    pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or []
    status = event.get("responseStatus") or {}
    code = int(status.get("code", 0))
    response = event.get("responseObject")
    return Write(
        at=datetime.fromisoformat(event["stageTimestamp"]),
        verb=str(event.get("verb", "")),
        resource=str(ref["resource"]),
        subresource=str(ref.get("subresource", "")),
        namespace=str(ref.get("namespace", "")),
        name=str(ref.get("name", "")),
        user=str(user.get("username", "")),
        pod=str(pods[0]) if pods else None,
        code=code,
        request=event.get("requestObject"),
        response=_object(response) if 200 <= code < 300 else None,
        audit_id=str(event.get("auditID", "")),
        message=str(status.get("message", "")),
        event=dict(event),
    )


def _object(response: Any) -> dict[str, Any] | None:
    """The object in a responseObject; None for the Status a refusal (or a deletion) gets."""
    if not isinstance(response, dict) or response.get("kind") == "Status":
        return None
    return response


def parse_audit_lines(lines: Iterable[str]) -> list[Write]:
    """The writes in audit log lines (JSON, one event a line), in order (see `in_order`).

    A line the API server did not finish (killed mid-write; the next start appends after it)
    is cut back to the event that follows it on the same line, if any, and else skipped.
    """
    writes: list[Write] = []
    skipped = 0
    for line in lines:
        event = _event_from_line(line.strip())
        if event is None:
            skipped += line.strip() != ""
            continue
        write = write_from_event(event)
        if write is not None:
            writes.append(write)
    if skipped:
        logger.warning("skipped %d unreadable audit log line(s)", skipped)
    return in_order(writes)


def _event_from_line(line: str) -> dict[str, Any] | None:
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        starts = [match.start() for match in _EVENT_START.finditer(line)]
        start = starts[-1] if starts else 0
        if start == 0:
            return None
        try:
            event = json.loads(line[start:])
        except ValueError:
            return None
    return event if isinstance(event, dict) else None


def read_audit_log(path: Path | str) -> list[Write]:
    """The writes in the audit log at `path` (see `parse_audit_lines`)."""
    with Path(path).open(encoding="utf-8", errors="replace") as log:
        return parse_audit_lines(log)


def in_order(writes: Iterable[Write]) -> list[Write]:
    """By completion time, then (for Task writes completed in the same microsecond) by the
    resourceVersion they made; file order otherwise. Completion order is not commit order:
    the checker orders one Task's writes by resourceVersion where that matters."""

    def key(write: Write) -> tuple[datetime, int]:
        version = write.resource_version if write.resource == PLURAL else None
        return (write.at, version if version is not None else 0)

    return sorted(writes, key=key)


Interval = tuple[datetime, datetime]


class Finding(Protocol):
    """What a checker found, as it is saved beside a history (`soak.checker.Violation`)."""

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class History:
    """The recorded writes, and what the harness knew besides."""

    writes: list[Write]
    # The Task objects as listed when the run ended.
    final_tasks: list[dict[str, Any]] = field(default_factory=list)
    # When the API server was down (from the harness, which stopped it): nobody could report
    # then, and the operator's lease clocks stand still.
    blind: list[Interval] = field(default_factory=list)
    # The usernames the operator's replicas write as (one client certificate each).
    operator_users: set[str] = field(default_factory=set)
    # When an operator replica died, by the user it writes as: killed by the harness, or
    # found dead by it (a failpoint), then at most a poll of the harness late.
    operator_deaths: list[tuple[str, datetime]] = field(default_factory=list)
    # How long past a lease's window the operator may take to end it.
    detection_bound_s: float = 5.0

    @classmethod
    def from_audit_log(
        cls,
        path: Path | str,
        *,
        final_tasks: Sequence[Mapping[str, Any]] = (),
        blind: Sequence[Interval] = (),
        operator_users: Iterable[str] = (),
        operator_deaths: Iterable[tuple[str, datetime]] = (),
        detection_bound_s: float = 5.0,
    ) -> History:
        return cls(
            writes=read_audit_log(path),
            final_tasks=[dict(task) for task in final_tasks],
            blind=list(blind),
            operator_users=set(operator_users),
            operator_deaths=list(operator_deaths),
            detection_bound_s=detection_bound_s,
        )

    def restricted_to(self, tasks: Collection[str]) -> History:
        """The part of the history about some Tasks (`namespace/name`): their writes, their
        runner pods' (`<task>-<epoch>`), the leader election's Lease, and the pool runners'
        Leases when one of them is a pool task; so that a failing history is saved at the
        size of what failed."""
        keep = set(tasks)
        pooled = any(
            write.resource == "tasks"
            and write.task_key in keep
            and "workerGroup" in ((write.response or {}).get("spec") or {})
            for write in self.writes
        )

        def about(write: Write) -> bool:
            match write.resource:
                case "tasks":
                    return write.task_key in keep
                case "pods":
                    return f"{write.namespace}/{write.name.rsplit('-', 1)[0]}" in keep
                case "leases":  # a pool runner's is written by its ServiceAccount
                    return pooled or not write.runner
                case _:
                    return True

        return dataclasses.replace(
            self,
            writes=[write for write in self.writes if about(write)],
            final_tasks=[
                task
                for task in self.final_tasks
                if f"{_metadata(task).get('namespace')}/{_metadata(task).get('name')}" in keep
            ],
        )

    def save(self, path: Path | str, *, expected: Iterable[Finding] = ()) -> None:
        """Write the history as JSON: the audit events as recorded, and the rest. `expected`
        (the checker's violations) are kept beside it, so that a replay can tell whether the
        checker still finds what it found (`saved_violations`)."""
        # One event (and one Task, one violation) a line, as in the audit log itself: a saved
        # history diffs line by line, and a violation can be planted by editing one line.
        fields: dict[str, str] = {
            "version": json.dumps(FORMAT_VERSION),
            "operator_users": json.dumps(sorted(self.operator_users)),
            "operator_deaths": _json_lines(
                [user, when.isoformat()] for user, when in self.operator_deaths
            ),
            "detection_bound_s": json.dumps(self.detection_bound_s),
            "blind": _json_lines([start.isoformat(), end.isoformat()] for start, end in self.blind),
            "violations": _json_lines(finding.to_json() for finding in expected),
            "final_tasks": _json_lines(self.final_tasks),
            "audit": _json_lines(write.event for write in self.writes),
        }
        body = ",\n".join(f"{json.dumps(key)}: {value}" for key, value in fields.items())
        Path(path).write_text("{\n" + body + "\n}\n")

    @classmethod
    def load(cls, path: Path | str) -> History:
        document = _load_document(path)
        writes = [w for e in document["audit"] if (w := write_from_event(e)) is not None]
        return cls(
            writes=in_order(writes),
            final_tasks=list(document.get("final_tasks") or []),
            blind=[
                (datetime.fromisoformat(start), datetime.fromisoformat(end))
                for start, end in document.get("blind") or []
            ],
            operator_users=set(document.get("operator_users") or []),
            operator_deaths=[
                (user, datetime.fromisoformat(when))
                for user, when in document.get("operator_deaths") or []
            ],
            detection_bound_s=float(document.get("detection_bound_s", 5.0)),
        )


def served_again(
    writes: Iterable[Write], *, restarted_at: datetime, ready_at: datetime
) -> datetime:
    """When a restarted API server first served: the first write the audit log records
    completed after the new process started (it serves before its /readyz says so, and the
    operator and the runners with it), or when /readyz answered if none came earlier."""
    served = [w.at for w in writes if w.at >= restarted_at]
    return min([ready_at, *served])


def _json_lines(items: Iterable[Any]) -> str:
    lines = [json.dumps(item, sort_keys=True) for item in items]
    return "[\n" + ",\n".join(lines) + "\n]" if lines else "[]"


def saved_violations(path: Path | str) -> list[dict[str, Any]]:
    """The violations saved beside a history (`History.save`), as JSON objects
    (`soak.checker.Violation.from_json` reads one)."""
    return list(_load_document(path).get("violations") or [])


def _load_document(path: Path | str) -> dict[str, Any]:
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a saved soak history (version {FORMAT_VERSION})")
    return document
