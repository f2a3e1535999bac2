"""The Task API models: durations, parsing real objects, the limits the API server shares, lease
annotations, phases."""

from __future__ import annotations

import copy
import errno
import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from tasklease.api.durations import (
    GO_DURATION_PATTERN,
    MAX_DURATION,
    MAX_DURATION_LENGTH,
    format_go_duration,
    parse_go_duration,
    parse_whole_milliseconds,
)
from tasklease.api.models import (
    API_VERSION,
    FINAL_PHASES,
    KIND,
    MAX_PARAMETER_NAME_LENGTH,
    MAX_PARAMETERS,
    MAX_PARAMETERS_BYTES,
    Lease,
    Outcome,
    Phase,
    ResultStatus,
    Task,
    TaskSpec,
)
from tasklease.api.runner_env import ENV_PARAMETERS
from tasklease.lease.pods import runner_pod

TEMPLATE: dict[str, Any] = {"spec": {"containers": [{"name": "runner", "image": "busybox"}]}}

# Go's time.ParseDuration units, in nanoseconds: the reference the parser must agree with.
GO_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}
GO_UNITS["h"] = 3600 * 10**9


def random_timedelta(rng: random.Random) -> timedelta:
    scale = rng.choice([10**3, 10**6, 10**9, 10**12, 10**15, MAX_DURATION // timedelta(0, 0, 1)])
    return timedelta(microseconds=rng.randrange(0, scale))


def random_go_duration(rng: random.Random) -> tuple[str, int]:
    """A random Go duration string and its exact value in nanoseconds."""
    text, nanoseconds = "", 0
    for _ in range(rng.randint(1, 4)):
        unit = rng.choice(list(GO_UNITS))
        whole = rng.randrange(0, 1000)
        if rng.random() < 0.3:
            digits = rng.randint(1, 6)
            fraction = rng.randrange(0, 10**digits)
            text += f"{whole}.{fraction:0{digits}d}{unit}"
            # Go truncates each part's fraction to the nanosecond.
            nanoseconds += whole * GO_UNITS[unit] + fraction * GO_UNITS[unit] // 10**digits
        else:
            text += f"{whole}{unit}"
            nanoseconds += whole * GO_UNITS[unit]
    return text, nanoseconds


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0s", timedelta(0)),
        ("90s", timedelta(seconds=90)),
        ("2m", timedelta(minutes=2)),
        ("15m", timedelta(minutes=15)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h0m30s", timedelta(hours=1, seconds=30)),
        ("1.5h", timedelta(minutes=90)),
        ("500ms", timedelta(milliseconds=500)),
        ("250us", timedelta(microseconds=250)),
        ("250µs", timedelta(microseconds=250)),
        ("250μs", timedelta(microseconds=250)),
        ("2h45m30.5s", timedelta(hours=2, minutes=45, seconds=30.5)),
        ("1000000ns", timedelta(milliseconds=1)),
        ("2562047h", timedelta(hours=2562047)),
    ],
)
def test_go_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_go_duration(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(minutes=2), "2m"),
        (timedelta(seconds=60), "1m"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, seconds=30), "1h30s"),
        (timedelta(days=1), "24h"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(minutes=1, milliseconds=250), "1m0.25s"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(microseconds=1500), "1.5ms"),
        (timedelta(microseconds=7), "7us"),
    ],
)
def test_durations_format_as_the_shortest_go_string(value: timedelta, expected: str) -> None:
    assert format_go_duration(value) == expected


def test_format_then_parse_gives_the_same_duration() -> None:
    rng = random.Random(20240611)
    for _ in range(5000):
        value = random_timedelta(rng)
        text = format_go_duration(value)
        assert re.fullmatch(GO_DURATION_PATTERN, text), text
        assert parse_go_duration(text) == value, text


def test_parse_agrees_with_go_and_formatting_is_canonical() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        text, nanoseconds = random_go_duration(rng)
        parsed = parse_go_duration(text)
        # Exact to the microsecond, finer values rounded up so positive stays positive.
        assert parsed == timedelta(microseconds=-(-nanoseconds // 1000)), text
        canonical = format_go_duration(parsed)
        assert parse_go_duration(canonical) == parsed, (text, canonical)
        assert format_go_duration(parse_go_duration(canonical)) == canonical


def test_a_positive_duration_never_parses_to_zero() -> None:
    assert parse_go_duration("1ns") == timedelta(microseconds=1)


@pytest.mark.parametrize(
    "value",
    [
        "ten minutes",
        "",
        "1",
        "-1s",
        "+1s",
        "1d",
        "1w",
        "1H",
        "1h 30m",
        " 1h",
        ".5s",
        "1.s",
        "PT2M",
        "2562048h",
        "0" * MAX_DURATION_LENGTH + "1s",  # a valid 1s, but too long a string
        90,
        1.5,
        None,
        True,
        timedelta(seconds=-1),
        MAX_DURATION + timedelta(microseconds=1),
    ],
)
def test_bad_durations_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_go_duration(value)


def test_timedeltas_pass_through() -> None:
    assert parse_go_duration(timedelta(seconds=5)) == timedelta(seconds=5)


def test_a_bad_duration_in_a_spec_names_the_field() -> None:
    with pytest.raises(ValidationError) as error:
        TaskSpec.model_validate({"template": TEMPLATE, "ackTimeout": "ten minutes"})
    [problem] = error.value.errors()
    assert problem["loc"] == ("ackTimeout",)
    assert "'ten minutes' is not a duration" in problem["msg"]


# --- a whole Task --------------------------------------------------------------------------


def realistic_task() -> dict[str, Any]:
    return {
        "apiVersion": "tasklease.io/v1alpha1",
        "kind": "Task",
        "metadata": {
            "name": "nightly-export",
            "namespace": "data",
            "uid": "6f1c2a0e-0000-4000-8000-000000000001",
            "generation": 2,
            "resourceVersion": "4711",
            "creationTimestamp": "2024-06-11T02:00:00Z",
            "annotations": {
                "tasklease.io/holder": "nightly-export-3",
                "tasklease.io/epoch": "3",
                "tasklease.io/acquire-time": "2024-06-11T02:05:00.123456Z",
            },
        },
        "spec": {
            "template": {
                "metadata": {"labels": {"team": "data"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "runner", "image": "export:1.4", "args": ["--all"]}],
                },
            },
            "parameters": {"bucket": "s3://exports", "date": "2024-06-10"},
            "priority": 10,
            "ackTimeout": "2m",
            "reportProgressTimeout": "15m",
            "heartbeatInterval": "60s",
            "retry": {
                "maxAttempts": 5,
                "backoff": {"initial": "30s", "factor": 3, "max": "10m", "jitter": 0.1},
                "nonRetryableErrors": ["BadInput"],
            },
            "attemptTimeout": "1h30m",
            "lateAfter": "4h",
            "someFutureField": "ignored by this version",
        },
        "status": {
            "phase": "Running",
            "attempt": 3,
            "epoch": 3,
            "holder": "nightly-export-3",
            "progress": {
                "epoch": 3,
                "percent": 42.5,
                "message": "exporting table orders",
                "fields": {"rows": "120000"},
                "checkpoint": {"table": "orders", "offset": 120000, "done": ["users"]},
                "reportTime": "2024-06-11T02:20:00Z",
            },
            "attempts": [
                {
                    "attempt": 1,
                    "epoch": 1,
                    "holder": "nightly-export-1",
                    "startTime": "2024-06-11T02:00:01Z",
                    "endTime": "2024-06-11T02:02:01Z",
                    "outcome": "AckTimeout",
                },
                {
                    "attempt": 2,
                    "epoch": 2,
                    "holder": "nightly-export-2",
                    "startTime": "2024-06-11T02:02:02Z",
                    "endTime": "2024-06-11T02:04:00Z",
                    "outcome": "PodFailed",
                    "message": "OOMKilled",
                },
            ],
            "startTime": "2024-06-11T02:00:01Z",
            "conditions": [
                {
                    "type": "Leased",
                    "status": "True",
                    "reason": "HandedOut",
                    "lastTransitionTime": "2024-06-11T02:05:00Z",
                    "observedGeneration": 2,
                }
            ],
            "observedGeneration": 2,
        },
    }


def test_task_parses_a_realistic_object() -> None:
    task = Task.model_validate(realistic_task())

    assert (task.name, task.namespace, task.generation) == ("nightly-export", "data", 2)
    assert task.uid.startswith("6f1c2a0e")
    assert task.creation_time == datetime(2024, 6, 11, 2, 0, tzinfo=UTC)
    spec = task.spec
    assert spec.ack_timeout == timedelta(minutes=2)
    assert spec.heartbeat_interval == timedelta(seconds=60)
    assert spec.attempt_timeout == timedelta(hours=1, minutes=30)
    assert spec.active_deadline is None
    assert spec.late_after == timedelta(hours=4)
    assert spec.retry.max_attempts == 5
    assert spec.retry.backoff.initial == timedelta(seconds=30)
    assert spec.retry.backoff.factor == 3.0
    assert spec.retry.non_retryable_errors == ["BadInput"]
    assert spec.parameters["bucket"] == "s3://exports"
    assert spec.template is not None
    assert spec.template["metadata"]["labels"] == {"team": "data"}

    status = task.status
    assert status.phase is Phase.RUNNING
    assert status.progress is not None
    assert status.progress.percent == 42.5
    assert status.progress.checkpoint == {"table": "orders", "offset": 120000, "done": ["users"]}
    assert status.progress.report_time == datetime(2024, 6, 11, 2, 20, tzinfo=UTC)
    assert [record.outcome for record in status.attempts] == [
        Outcome.ACK_TIMEOUT,
        Outcome.POD_FAILED,
    ]
    assert status.conditions[0].status == "True"
    assert status.result is None


def test_task_serialises_back_to_the_wire_form() -> None:
    wire = Task.model_validate(realistic_task()).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    spec = wire["spec"]
    assert spec["ackTimeout"] == "2m"
    assert spec["heartbeatInterval"] == "1m"
    assert spec["attemptTimeout"] == "1h30m"
    assert spec["retry"]["backoff"] == {
        "initial": "30s",
        "factor": 3.0,
        "max": "10m",
        "jitter": 0.1,
    }
    assert "someFutureField" not in spec
    assert wire["status"]["progress"]["reportTime"] == "2024-06-11T02:20:00Z"
    assert Task.model_validate(wire) == Task.model_validate(realistic_task())


def test_a_minimal_spec_gets_the_aws_defaults() -> None:
    spec = TaskSpec.model_validate({"workerGroup": "pool-a"})
    assert spec.ack_timeout == timedelta(minutes=2)
    assert spec.report_progress_timeout == timedelta(minutes=15)
    assert spec.heartbeat_interval == timedelta(seconds=60)
    assert spec.retry.max_attempts == 3
    assert spec.retry.backoff.initial == timedelta(seconds=10)
    assert spec.cancel is False
    assert spec.template is None


def test_a_task_without_status_is_pending() -> None:
    task = Task.model_validate({"metadata": {"name": "t"}, "spec": {"template": TEMPLATE}})
    assert (task.api_version, task.kind) == (API_VERSION, KIND)
    assert task.status.phase is Phase.PENDING
    assert task.status.attempt == 0
    assert task.lease == Lease(holder=None, epoch=0, acquire_time=None)


def test_lease_annotations_parse() -> None:
    lease = Task.model_validate(realistic_task()).lease
    assert lease.holder == "nightly-export-3"
    assert lease.epoch == 3
    assert lease.acquire_time == datetime(2024, 6, 11, 2, 5, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize("epoch", ["", "x", "-1", "1.5"])
def test_a_malformed_epoch_annotation_reads_as_never_handed_out(epoch: str) -> None:
    raw = realistic_task()
    raw["metadata"]["annotations"]["tasklease.io/epoch"] = epoch
    assert Task.model_validate(raw).lease.epoch == 0


@pytest.mark.parametrize("policy", ["Always", "OnFailure"])
def test_restarting_runner_pods_are_refused(policy: str) -> None:
    template = {"spec": {"restartPolicy": policy, "containers": [{"name": "r", "image": "x"}]}}
    with pytest.raises(ValidationError, match=r"spec\.template\.spec\.restartPolicy") as error:
        TaskSpec.model_validate({"template": template})
    assert policy in str(error.value)


def test_runner_pods_that_are_never_restarted_are_accepted() -> None:
    never = {"spec": {"restartPolicy": "Never", "containers": [{"name": "r", "image": "x"}]}}
    assert TaskSpec.model_validate({"template": never}).template == never
    assert TaskSpec.model_validate({"template": TEMPLATE}).template == TEMPLATE


def test_a_template_without_a_pod_spec_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"spec\.template\.spec must be a pod spec"):
        TaskSpec.model_validate({"template": {"metadata": {}}})


# --- what the API server refuses, the models refuse too -----------------------------------
# (tests/integration/test_task_api.py tries the same against the API server's CEL rules.)

DURATION_FIELDS = [
    "ackTimeout",
    "reportProgressTimeout",
    "heartbeatInterval",
    "attemptTimeout",
    "activeDeadline",
    "lateAfter",
    "retry.backoff.initial",
    "retry.backoff.max",
]


def spec_with(path: str, value: Any) -> dict[str, Any]:
    """A pod-per-attempt spec with the field at a dotted path set."""
    spec: dict[str, Any] = {"template": TEMPLATE}
    *parents, leaf = path.split(".")
    target = spec
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
    return spec


@pytest.mark.parametrize("value", ["1ns", "1us", "1.5ms", "999999ns", "1s1ns", "0.00001m"])
@pytest.mark.parametrize("field", DURATION_FIELDS)
def test_a_duration_finer_than_a_millisecond_is_refused(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match="is not a whole number of milliseconds"):
        TaskSpec.model_validate(spec_with(field, value))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1ms", timedelta(milliseconds=1)),
        ("1000us", timedelta(milliseconds=1)),
        ("1000000ns", timedelta(milliseconds=1)),
        ("1.001s", timedelta(seconds=1, milliseconds=1)),
        ("0.0001m", timedelta(milliseconds=6)),
        ("2562047h", timedelta(hours=2562047)),
    ],
)
def test_whole_milliseconds_are_accepted_however_written(text: str, expected: timedelta) -> None:
    assert parse_whole_milliseconds(text) == expected
    assert TaskSpec.model_validate(spec_with("lateAfter", text)).late_after == expected


def test_whole_milliseconds_are_judged_on_the_exact_value() -> None:
    # 999999ns rounds up to the microsecond 1ms, but it is not 1ms.
    assert parse_go_duration("999999ns") == timedelta(milliseconds=1)
    with pytest.raises(ValueError, match="not a whole number of milliseconds"):
        parse_whole_milliseconds("999999ns")
    with pytest.raises(ValueError, match="not a whole number of milliseconds"):
        parse_whole_milliseconds(timedelta(microseconds=1500))
    with pytest.raises(ValueError, match="not a duration"):
        parse_whole_milliseconds("ten minutes")


def test_a_backoff_whose_max_is_below_its_initial_delay_is_refused() -> None:
    for backoff in ({"initial": "1m", "max": "30s"}, {"initial": "10m"}):  # max: 5m by default
        with pytest.raises(ValidationError, match=r"spec\.retry\.backoff\.max \(5m unless set\)"):
            TaskSpec.model_validate(spec_with("retry.backoff", backoff))
    for backoff in ({"initial": "1m", "max": "1m"}, {"initial": "0s", "max": "0s"}):
        TaskSpec.model_validate(spec_with("retry.backoff", backoff))


def test_a_template_and_a_worker_group_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="a pool task has no template"):
        TaskSpec.model_validate({"template": TEMPLATE, "workerGroup": "gpu"})
    assert TaskSpec.model_validate({"workerGroup": "gpu"}).template is None
    assert TaskSpec.model_validate({"template": TEMPLATE}).worker_group is None


@pytest.mark.parametrize(
    ("parameters", "refusal"),
    [
        ({f"p{i}": "x" for i in range(MAX_PARAMETERS + 1)}, "at most 256 items"),
        ({"": "x"}, "names must be 1 to 253 characters"),
        ({"n" * (MAX_PARAMETER_NAME_LENGTH + 1): "x"}, "names must be 1 to 253 characters"),
        ({"v": "x" * (MAX_PARAMETERS_BYTES + 1)}, "at most 16384 characters"),
        ({"a": "x" * MAX_PARAMETERS_BYTES}, "16385 bytes of names and values"),
        # Bytes of UTF-8, not characters: 8192 characters of two bytes each, and the name.
        ({"a": "é" * (MAX_PARAMETERS_BYTES // 2)}, "16385 bytes of names and values"),
    ],
    ids=["257-parameters", "empty-name", "long-name", "long-value", "16KiB+1", "utf8"],
)
def test_parameters_beyond_the_limits_are_refused(parameters: dict[str, str], refusal: str) -> None:
    with pytest.raises(ValidationError, match=refusal):
        TaskSpec.model_validate({"template": TEMPLATE, "parameters": parameters})


# Characters Python's JSON escapes as six bytes ("\u0001"): the worst case per byte.
_SIX_BYTE_ESCAPES = [chr(c) for c in (*range(0x20), 0x7F) if chr(c) not in "\b\t\n\f\r"]


def worst_case_parameters() -> dict[str, str]:
    """As many parameters and bytes as the limits admit, every byte escaped to six."""
    names = [a + b for a in _SIX_BYTE_ESCAPES for b in _SIX_BYTE_ESCAPES][:MAX_PARAMETERS]
    value_bytes = (MAX_PARAMETERS_BYTES - 2 * MAX_PARAMETERS) // MAX_PARAMETERS
    return {name: _SIX_BYTE_ESCAPES[0] * value_bytes for name in names}


@pytest.mark.skipif(sys.platform != "linux", reason="MAX_ARG_STRLEN is Linux's limit")
def test_the_largest_parameters_the_limits_admit_reach_the_runners_environment() -> None:
    parameters = worst_case_parameters()
    assert sum(len(k.encode()) + len(v.encode()) for k, v in parameters.items()) == (
        MAX_PARAMETERS_BYTES
    )
    task = Task.model_validate(
        {"metadata": {"name": "t"}, "spec": {"template": TEMPLATE, "parameters": parameters}}
    )
    pod = runner_pod(task, epoch=1, attempt=1, checkpoint=None)
    [env] = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == ENV_PARAMETERS]
    entry = f"{ENV_PARAMETERS}={env['value']}".encode()
    assert len(entry) + 1 < 100 * 1024  # well below Linux's MAX_ARG_STRLEN of 128 KiB
    assert json.loads(env["value"]) == parameters

    # Started for real with it (the runner's interpreter, which reads it back) ...
    check = "import os, sys; sys.exit(len(os.environ['TASKLEASE_PARAMETERS']) == 0)"
    environment = {ENV_PARAMETERS: env["value"]}
    subprocess.run([sys.executable, "-c", check], env=environment, check=True)
    # ... where 128 KiB is refused: "Argument list too long", the failure the limits prevent.
    with pytest.raises(OSError, match="Argument list too long") as refused:
        subprocess.run([sys.executable, "-c", ""], env={ENV_PARAMETERS: "x" * 128 * 1024})
    assert refused.value.errno == errno.E2BIG


def test_a_progress_report_needs_a_current_looking_epoch() -> None:
    raw = realistic_task()
    raw["status"]["progress"]["epoch"] = 0
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Task.model_validate(raw)


# --- phases and results --------------------------------------------------------------------


@pytest.mark.parametrize("phase", list(Phase))
def test_phase_is_final(phase: Phase) -> None:
    expected = phase in {Phase.SUCCEEDED, Phase.FAILED, Phase.SKIPPED, Phase.CANCELED}
    assert phase.is_final is expected
    assert (phase in FINAL_PHASES) is expected


def test_result_statuses_are_the_aws_ones() -> None:
    assert {status.value for status in ResultStatus} == {"FINISHED", "FAILED", "FALSE"}


def _with(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `body` with the value at a dotted path replaced."""
    changed = copy.deepcopy(body)
    *parents, leaf = path.split(".")
    target: Any = changed
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    target[leaf] = value
    return changed


# The reconciler parses a watched body as decoded (a worker takes it at once) or as JSON
# (it waited behind a backlog): the two must never disagree about a Task.
_BODIES_AS_WATCHED: list[tuple[str, dict[str, Any]]] = [
    ("realistic", realistic_task()),
    ("no status", {k: v for k, v in realistic_task().items() if k != "status"}),
    ("numbers as strings", _with(realistic_task(), "spec.retry.maxAttempts", "5")),
    ("a bad duration", _with(realistic_task(), "spec.ackTimeout", "2 minutes")),
    ("a duration as a number", _with(realistic_task(), "spec.ackTimeout", 120)),
    ("a restarting runner", _with(realistic_task(), "spec.template.spec.restartPolicy", "Always")),
    ("an unknown phase", _with(realistic_task(), "status.phase", "Dancing")),
    ("a time as a number", _with(realistic_task(), "status.progress.reportTime", 1718072400)),
    ("a garbled time", _with(realistic_task(), "status.progress.reportTime", "yesterday")),
    ("a list for a map", _with(realistic_task(), "spec.parameters", ["a"])),
    ("null spec", _with(realistic_task(), "spec", None)),
    ("a sub-millisecond duration", _with(realistic_task(), "spec.ackTimeout", "1500us")),
    ("a template and a worker group", _with(realistic_task(), "spec.workerGroup", "gpu")),
    ("an empty parameter name", _with(realistic_task(), "spec.parameters", {"": "x"})),
]


_WORDED_PER_INPUT = {"dict_type", "model_type"}


@pytest.mark.parametrize(
    "body", [b for _, b in _BODIES_AS_WATCHED], ids=[n for n, _ in _BODIES_AS_WATCHED]
)
def test_a_body_parses_the_same_decoded_and_as_json(body: dict[str, Any]) -> None:
    def outcome(parse: Callable[[], Task]) -> Any:
        try:
            return parse().model_dump(mode="json")
        except ValidationError as error:
            # Where a map was expected pydantic words it per input ("a valid dictionary",
            # "an object"); the API server's schema refuses such a Task before we see it.
            return [
                (e["loc"], e["type"], None if e["type"] in _WORDED_PER_INPUT else e["msg"])
                for e in error.errors()
            ]

    as_json = outcome(lambda: Task.model_validate_json(json.dumps(body)))
    decoded = outcome(lambda: Task.model_validate(body))

    assert decoded == as_json


def test_the_lease_is_read_once_per_task() -> None:
    task = Task.model_validate(realistic_task())

    assert task.lease is task.lease
    assert task.lease == Task.model_validate(realistic_task()).lease
