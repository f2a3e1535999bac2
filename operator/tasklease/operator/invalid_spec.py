"""A Task that does not parse, said on the Task itself: an `Invalid` condition and a
Warning Event, once per generation and message.

The core decides only about Tasks that parse, so this is the one status the operator
writes without it. The condition goes through the core's `set_condition`, as every other
condition does: a Task that stays invalid keeps the condition's lastTransitionTime however
its message changes. Once the spec is fixed, the core turns the condition False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from tasklease.api.models import Condition
from tasklease.kube.refs import ObjectRef
from tasklease.lease.core import CONDITION_INVALID, dump_conditions, set_condition
from tasklease.operator.cache import Body
from tasklease.operator.events import PendingEvent

REASON = "InvalidSpec"
_MAX_MESSAGE = 32768  # metav1.Condition's limit


@dataclass(frozen=True, slots=True)
class InvalidSpecReport:
    """The status patch that says a Task is invalid, and the Warning Event that says it too."""

    namespace: str
    name: str
    resource_version: str  # the version the patch is compare-and-swap against
    status: dict[str, Any]
    event: PendingEvent


def describe_validation_error(error: ValidationError) -> str:
    """'spec.template: restartPolicy is ...; spec.ackTimeout: ...' from pydantic's errors."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        text = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {text}" if where else text)
    return "; ".join(parts)


def invalid_spec_report(raw: Body, message: str, *, now: datetime) -> InvalidSpecReport | None:
    """What to write about the invalid Task in `raw`; None when it already says so."""
    body: Any = raw
    if isinstance(raw, bytes):
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
    if not isinstance(body, dict):
        body = {}
    metadata = body.get("metadata") or {}
    generation = metadata.get("generation")
    conditions = list((body.get("status") or {}).get("conditions") or [])
    current = next(
        (c for c in conditions if isinstance(c, dict) and c.get("type") == CONDITION_INVALID),
        None,
    )
    if (
        current is not None
        and current.get("status") == "True"
        and current.get("message") == message
        and current.get("observedGeneration") == generation
    ):
        return None
    updated = set_condition(
        _as_conditions(current),
        type_=CONDITION_INVALID,
        status="True",
        reason=REASON,
        message=message[:_MAX_MESSAGE],
        now=now,
        generation=generation,
    )
    others = [
        c for c in conditions if not (isinstance(c, dict) and c.get("type") == CONDITION_INVALID)
    ]
    status = {"conditions": others + dump_conditions(updated), "observedGeneration": generation}
    return InvalidSpecReport(
        namespace=metadata["namespace"],
        name=metadata["name"],
        resource_version=metadata["resourceVersion"],
        status=status,
        event=PendingEvent(ObjectRef.of(metadata), "Warning", REASON, message),
    )


def _as_conditions(written: dict[str, Any] | None) -> list[Condition]:
    """The Invalid condition as written, when it reads as one (else none: it gets a new
    lastTransitionTime)."""
    if written is None:
        return []
    try:
        return [Condition.model_validate(written)]
    except ValidationError:
        return []
