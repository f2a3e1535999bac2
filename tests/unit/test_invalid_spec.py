"""What the operator writes about a Task that does not parse: an Invalid condition (through
the core's `set_condition`) and a Warning Event, once per generation and message."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from tasklease.api.models import Task
from tasklease.lease.core import CONDITION_INVALID
from tasklease.operator.invalid_spec import describe_validation_error, invalid_spec_report
from tests.unit.builders import CREATED, NAME, NAMESPACE, UID, iso, task_body

NOW = CREATED + timedelta(minutes=5)
LEASED = {
    "type": "Leased",
    "status": "False",
    "reason": "WaitingForRunner",
    "message": "waiting",
    "lastTransitionTime": iso(CREATED),
}


def invalid_body(*conditions: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return task_body(metadata={"generation": generation}, status={"conditions": list(conditions)})


def invalid_condition(message: str, *, since: str, generation: int = 1) -> dict[str, Any]:
    return {
        "type": CONDITION_INVALID,
        "status": "True",
        "reason": "InvalidSpec",
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def test_an_invalid_task_is_told_so_by_a_condition_and_a_warning_event() -> None:
    report = invalid_spec_report(invalid_body(LEASED), "spec.ackTimeout: too short", now=NOW)

    assert report is not None
    assert (report.namespace, report.name, report.resource_version) == (NAMESPACE, NAME, "1")
    assert report.status == {
        "conditions": [
            LEASED,
            invalid_condition("spec.ackTimeout: too short", since=iso(NOW)),
        ],
        "observedGeneration": 1,
    }
    assert (report.event.type, report.event.reason) == ("Warning", "InvalidSpec")
    assert report.event.message == "spec.ackTimeout: too short"
    assert (report.event.about.name, report.event.about.uid) == (NAME, UID)


def test_a_task_that_already_says_so_is_not_written_again() -> None:
    said = invalid_condition("bad", since=iso(CREATED))
    assert invalid_spec_report(invalid_body(said), "bad", now=NOW) is None


def test_a_task_still_invalid_keeps_the_conditions_last_transition_time() -> None:
    said = invalid_condition("bad", since=iso(CREATED))
    report = invalid_spec_report(invalid_body(said, generation=2), "worse", now=NOW)

    assert report is not None
    [condition] = report.status["conditions"]
    assert condition == invalid_condition("worse", since=iso(CREATED), generation=2)


def test_a_condition_that_was_false_moves_its_last_transition_time() -> None:
    fixed = invalid_condition("", since=iso(CREATED)) | {"status": "False", "reason": "Valid"}
    report = invalid_spec_report(invalid_body(fixed, generation=3), "bad again", now=NOW)

    assert report is not None
    [condition] = report.status["conditions"]
    assert condition["lastTransitionTime"] == iso(NOW)


def test_json_and_decoded_bodies_give_the_same_report() -> None:
    body = invalid_body(LEASED)
    assert invalid_spec_report(json.dumps(body).encode(), "bad", now=NOW) == (
        invalid_spec_report(body, "bad", now=NOW)
    )


def test_validation_errors_are_described_by_where_and_what() -> None:
    with pytest.raises(ValidationError) as caught:
        Task.model_validate(task_body(spec={"ackTimeout": "soon"}))
    described = describe_validation_error(caught.value)
    assert described.startswith("spec.ackTimeout: ")
    assert "Value error, " not in described
