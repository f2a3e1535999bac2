"""The Task API (`tasklease.io/v1alpha1`): the one source of truth.

The CRD in `crds/` and the chart's copy are rendered from these models by
`python -m tasklease.api.crd` (`make manifests`); a test fails when they drift. Descriptions
here are what `kubectl explain` prints, so they are written for users, not for us.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import enum
import functools
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from tasklease.api.durations import WHOLE_MILLISECONDS_RULE, Duration, format_go_duration
from tasklease.api.runner_env import RESERVED_ENV_PREFIX
from tasklease.api.times import parse_rfc3339, parse_stamp

GROUP = "tasklease.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Task"
PLURAL = "tasks"
SINGULAR = "task"
SHORT_NAMES = ["tl"]
CATEGORIES = ["tasklease"]

# Lease annotations, written only by the operator (or, in a worker pool, by the runner that
# claims the task). The vocabulary follows coordination.k8s.io/v1 Lease.
HOLDER_ANNOTATION = f"{GROUP}/holder"
EPOCH_ANNOTATION = f"{GROUP}/epoch"
ACQUIRE_TIME_ANNOTATION = f"{GROUP}/acquire-time"
# How the attempt that a reassignment superseded ended (an attempt record as JSON), written
# in the same compare-and-swap as the new lease: the status write that records it comes
# after the new runner pod, off the path that detection and hand-out speed are measured on,
# and a crash in between loses nothing (design invariant 5).
PREVIOUS_ATTEMPT_ANNOTATION = f"{GROUP}/previous-attempt"
# What the epoch annotation must look like to be read (anything else reads as 0).
_EPOCH_TEXT = re.compile(r"[0-9]{1,18}")

# Labels the operator puts on runner pods, so it can watch exactly its own pods. ROLE_LABEL
# is on every pod the operator watches (one server-side selector for both kinds), and on
# pool runners' coordination Leases.
TASK_LABEL = f"{GROUP}/task"
EPOCH_LABEL = f"{GROUP}/epoch"
ROLE_LABEL = f"{GROUP}/role"
RUNNER_ROLE = "runner"  # a pod made for one attempt
POOL_RUNNER_ROLE = "pool-runner"  # a long-lived runner of a worker group

# Worker pools: the operator labels a pool Task with its group, and as claimable while no
# runner holds it, so that pool runners select exactly the Tasks they may claim on the
# server side. Pool runner pods and their coordination Leases carry ROLE_LABEL=pool-runner.
WORKER_GROUP_LABEL = f"{GROUP}/worker-group"
CLAIMABLE_LABEL = f"{GROUP}/claimable"

MAX_ATTEMPT_HISTORY = 20
POSITIVE_DURATION_RULE = {"rule": "duration(self) > duration('0s')", "message": "must be > 0"}
# A lease timing of zero means nothing (a heartbeat every 0s); being whole milliseconds, a
# positive one is at least 1ms. These replace the Duration type's rules, so they repeat its
# whole-milliseconds rule.
_MUST_BE_POSITIVE: dict[str, Any] = {
    "x-kubernetes-validations": [POSITIVE_DURATION_RULE, WHOLE_MILLISECONDS_RULE]
}

# Parameters reach the runner JSON-encoded in one environment variable
# (TASKLEASE_PARAMETERS), and Linux refuses an environment string over 128 KiB
# (MAX_ARG_STRLEN): the pod then fails with "Argument list too long". Python's JSON
# escapes a byte of UTF-8 into at most six (a control character: "\u0001"), so 16 KiB of
# names and values plus the quotes and separators of 256 entries stay under 100 KiB in the
# worst case. The bounds on the count and on single names and values keep the CEL rules'
# estimated cost within what the API server admits.
MAX_PARAMETERS = 256
MAX_PARAMETER_NAME_LENGTH = 253
MAX_PARAMETERS_BYTES = 16 * 1024
_PARAMETERS_RULES: dict[str, Any] = {
    "x-kubernetes-validations": [
        {
            "rule": f"self.all(name, size(name) >= 1 && size(name) <= {MAX_PARAMETER_NAME_LENGTH})",
            "message": f"parameter names must be 1 to {MAX_PARAMETER_NAME_LENGTH} characters long",
        },
        {
            "rule": (
                "self.map(name, size(bytes(name)) + size(bytes(self[name]))).sum() "
                f"<= {MAX_PARAMETERS_BYTES}"
            ),
            "message": (
                f"must not exceed {MAX_PARAMETERS_BYTES} bytes of names and values (UTF-8) in "
                "all: the runner gets them in one environment variable (TASKLEASE_PARAMETERS)"
            ),
        },
    ]
}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        # Unknown fields are pruned by the API server; an object written under a newer CRD
        # must still parse under an older operator.
        extra="ignore",
        frozen=True,
    )


_DEFAULT_BACKOFF_MAX = timedelta(minutes=5)
_BACKOFF_MAX_BELOW_INITIAL = (
    f"spec.retry.backoff.max ({format_go_duration(_DEFAULT_BACKOFF_MAX)} unless set) must "
    "not be below spec.retry.backoff.initial"
)


class Backoff(_Model):
    """How long to wait before the next attempt after a failed one."""

    # The models check this in RetryPolicy, where a Backoff is part of a Task; retry_delay
    # caps a bare Backoff whose initial exceeds its max. The has() guards are for the API
    # server's check of the CRD itself, which tries the rule on the object's default ({},
    # its fields not yet defaulted); in a Task both fields are always there.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "!has(self.initial) || !has(self.max) "
                        "|| duration(self.initial) <= duration(self.max)"
                    ),
                    "message": _BACKOFF_MAX_BELOW_INITIAL,
                    "fieldPath": ".max",
                }
            ]
        }
    )

    initial: Duration = Field(
        default=timedelta(seconds=10),
        description=(
            "Delay before the second attempt, e.g. '10s' ('0s': none). Later delays grow by "
            "`factor`."
        ),
    )
    factor: float = Field(
        default=2.0,
        ge=1.0,
        le=10.0,
        description="Multiplier applied to the delay after each further failed attempt.",
    )
    max: Duration = Field(
        default=_DEFAULT_BACKOFF_MAX,
        description="Upper bound of the delay, e.g. '5m'; not below `initial`.",
    )
    jitter: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description=(
            "Fraction of the delay added at random (0.2: up to 20% longer), so tasks that "
            "failed together do not all retry in the same second."
        ),
    )


class DisruptionPolicy(enum.StrEnum):
    """Whether an attempt ended by a disruption counts against spec.retry.maxAttempts."""

    IGNORE = "Ignore"
    COUNT = "Count"


class ReplacementPolicy(enum.StrEnum):
    """When the next attempt's pod may start while the previous one's may still run."""

    OVERLAP = "Overlap"
    AFTER_TERMINATION = "AfterTermination"


class RetryPolicy(_Model):
    """How many attempts a task gets and how long to wait between them."""

    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description=(
            "Attempts in all, the first one included (AWS maximumRetries + 1). Every attempt "
            "that ends without success counts: a runner-reported failure, an acknowledgement "
            "or progress timeout, a failed or lost pod."
        ),
    )
    backoff: Backoff = Field(
        default_factory=Backoff,
        description=(
            "Delay before retrying after a failure the runner reported or a failed pod. A "
            "lease lost to a timeout or a vanished pod is handed out again at once."
        ),
    )
    non_retryable_errors: list[str] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Error ids (the errorId a runner reports with a FAILED result) that fail the "
            "task at once, without further attempts."
        ),
    )

    on_disruption: DisruptionPolicy = Field(
        default=DisruptionPolicy.IGNORE,
        description=(
            "What an attempt ended by a disruption costs: its pod evicted (the Eviction API, "
            "a node drain), preempted, or deleted with its lost node, as the pod's "
            "DisruptionTarget condition says (the Job API's podFailurePolicy reads the same "
            "condition). Ignore: the next attempt starts at once and the attempt does not "
            "count against maxAttempts, up to maxDisruptions of them. Count: it counts like "
            "any failed attempt. The attempt history records it either way."
        ),
    )
    max_disruptions: int = Field(
        default=10,
        ge=0,
        le=1000,
        description=(
            "Disruptions not counted against maxAttempts, at most (onDisruption Ignore); "
            "later ones count like any failed attempt, so a task cannot loop forever."
        ),
    )

    @model_validator(mode="after")
    def _backoff_max_is_not_below_initial(self) -> RetryPolicy:
        if self.backoff.max < self.backoff.initial:
            raise ValueError(_BACKOFF_MAX_BELOW_INITIAL)
        return self


_TEMPLATE_AND_WORKER_GROUP = (
    "spec.workerGroup and spec.template exclude each other: a pool task has no template "
    "(a pool runner of its worker group claims it); set one of the two"
)


_AFTER_TERMINATION_IN_A_POOL = (
    "spec.replacementPolicy AfterTermination needs spec.template: a pool task's runner is a "
    "long-lived pod that serves other tasks, and it stops its own program once it cannot report"
)


class TaskSpec(_Model):
    """What to run, and the lease, retry and deadline policy that governs its attempts.

    Durations are written as Go durations ('90s', '15m', '1h30m', '250ms') and must be whole
    milliseconds.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.template) || has(self.workerGroup)",
                    "message": (
                        "set spec.template (a runner pod per attempt) or spec.workerGroup "
                        "(a pool runner claims the task)"
                    ),
                },
                {
                    "rule": "!(has(self.template) && has(self.workerGroup))",
                    "message": _TEMPLATE_AND_WORKER_GROUP,
                    "fieldPath": ".workerGroup",
                    "reason": "FieldValueForbidden",
                },
                {
                    "rule": (
                        "!has(self.workerGroup) || !has(self.replacementPolicy) "
                        "|| self.replacementPolicy == 'Overlap'"
                    ),
                    "message": _AFTER_TERMINATION_IN_A_POOL,
                    "fieldPath": ".replacementPolicy",
                    "reason": "FieldValueForbidden",
                },
                {
                    "rule": "duration(self.ackTimeout) <= duration(self.reportProgressTimeout)",
                    "message": "spec.ackTimeout must not exceed spec.reportProgressTimeout",
                    "fieldPath": ".ackTimeout",
                },
                {
                    "rule": (
                        "duration(self.heartbeatInterval) < duration(self.reportProgressTimeout)"
                    ),
                    "message": (
                        "spec.heartbeatInterval must be shorter than spec.reportProgressTimeout"
                    ),
                    "fieldPath": ".heartbeatInterval",
                },
            ]
        }
    )

    template: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Pod template for the runner pods, one pod per attempt (a core/v1 "
            "PodTemplateSpec). The operator adds the lease identity to the first "
            "container's environment: TASKLEASE_TASK, TASKLEASE_NAMESPACE, TASKLEASE_EPOCH, "
            "TASKLEASE_POD_NAME, TASKLEASE_PARAMETERS (JSON) and TASKLEASE_CHECKPOINT (the "
            "previous attempt's last checkpoint, JSON). restartPolicy must be Never or unset."
        ),
        json_schema_extra={
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "required": ["spec"],
            "properties": {
                "metadata": {
                    "type": "object",
                    "description": "Labels and annotations for the runner pods.",
                    "x-kubernetes-preserve-unknown-fields": True,
                },
                "spec": {
                    "type": "object",
                    "description": "The runner pod's spec (core/v1 PodSpec).",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "required": ["containers"],
                    "properties": {
                        "restartPolicy": {
                            "type": "string",
                            "enum": ["Never"],
                            "description": (
                                "Must be Never (or unset): each attempt is a new pod with a "
                                "new epoch, and a restarted container would rerun the work "
                                "under the old one."
                            ),
                        },
                        "containers": {
                            "type": "array",
                            "minItems": 1,
                            "description": "The runner's containers; the first one runs the task.",
                            "items": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    },
                },
            },
        },
    )
    parameters: dict[str, Annotated[str, Field(max_length=MAX_PARAMETERS_BYTES)]] = Field(
        default_factory=dict,
        max_length=MAX_PARAMETERS,
        description=(
            "Named string values handed to the runner (AWS: the task's fields), JSON-encoded "
            "in its environment variable TASKLEASE_PARAMETERS. They must fit in one "
            "environment variable, which Linux limits to 128 KiB: at most "
            f"{MAX_PARAMETERS} parameters, names of 1 to {MAX_PARAMETER_NAME_LENGTH} "
            f"characters, and {MAX_PARAMETERS_BYTES} bytes (16 KiB, UTF-8) of names and "
            "values in all. Pass larger inputs by reference (an object store URL, a "
            "ConfigMap's name)."
        ),
        json_schema_extra=_PARAMETERS_RULES,
    )
    worker_group: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=(
            "Worker group whose pool runners may claim this task (AWS workerGroup). Set "
            "either this or spec.template, not both."
        ),
    )
    priority: int = Field(
        default=0,
        ge=-1000,
        le=1000,
        description="Pool runners claim higher priorities first, then older tasks first.",
    )
    cancel: bool = Field(
        default=False,
        description=(
            "Set to true to cancel the task: the runner is told (its next report sees it), "
            "its pod is deleted after the pod's grace period, and the phase becomes Canceled. "
            "Cannot be undone."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self || !oldSelf", "message": "a canceled task cannot be uncanceled"}
            ]
        },
    )
    ack_timeout: Duration = Field(
        default=timedelta(minutes=2),
        description=(
            "How long a new runner has to acknowledge the task with its first progress "
            "report before the lease is taken back (AWS: 2 minutes)."
        ),
        json_schema_extra=_MUST_BE_POSITIVE,
    )
    report_progress_timeout: Duration = Field(
        default=timedelta(minutes=15),
        description=(
            "How long the lease is kept without a progress report (AWS "
            "reportProgressTimeout: 15 minutes). Measured by the operator from the moment it "
            "observed the last report, never from a timestamp the runner wrote."
        ),
        json_schema_extra=_MUST_BE_POSITIVE,
    )
    heartbeat_interval: Duration = Field(
        default=timedelta(seconds=60),
        description=(
            "How often runners should report progress (AWS: every 60 seconds). Must be "
            "well below reportProgressTimeout."
        ),
        json_schema_extra=_MUST_BE_POSITIVE,
    )
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy,
        description="How many attempts the task gets and the delay between them.",
    )
    replacement_policy: ReplacementPolicy = Field(
        default=ReplacementPolicy.OVERLAP,
        description=(
            "When an attempt's pod is replaced, e.g. after a lost lease. Overlap: the next "
            "attempt's pod is created at once and the old pod is deleted in the background "
            "(the lease already refuses the old runner's writes, but not its other side "
            "effects). AfterTermination: the next attempt's pod is created only once the old "
            "pod is gone or has ended (the Job API's podReplacementPolicy Failed); while it "
            "waits, the Leased condition says WaitingForTermination, and TerminationOverdue "
            "when the pod outlives its grace period (its node may be unreachable: the wait "
            "lasts until the pod is gone; `kubectl delete pod --force` ends it). Pod-per-"
            "attempt tasks only: a pool runner stops its own program once it cannot report."
        ),
    )
    ttl_after_finished: Duration | None = Field(
        default=None,
        description=(
            "How long a finished task (Succeeded, Failed, Skipped or Canceled) is kept after "
            "its completionTime; then the operator deletes it, and its runner pods with it "
            "(the Job API's ttlSecondsAfterFinished), e.g. '1h' ('0s': at once). Unset: the "
            "operator's default (the chart's `operator.ttlAfterFinished`), else kept forever."
        ),
    )
    attempt_timeout: Duration | None = Field(
        default=None,
        description=(
            "Longest one attempt may run, from hand-out to result (AWS attemptTimeout). "
            "Unset: no limit."
        ),
        json_schema_extra=_MUST_BE_POSITIVE,
    )
    active_deadline: Duration | None = Field(
        default=None,
        description=(
            "Longest the whole task may take from its creation, all attempts together. "
            "When it passes, the running attempt is stopped and the task Failed. Unset: no limit."
        ),
        json_schema_extra=_MUST_BE_POSITIVE,
    )
    late_after: Duration | None = Field(
        default=None,
        description=(
            "After this long from creation without a final phase, the task is marked Late "
            "(a condition and an Event) and goes on (AWS lateAfterTimeout). Unset: never late."
        ),
        json_schema_extra=_MUST_BE_POSITIVE,
    )

    @field_validator("parameters")
    @classmethod
    def _parameters_fit_in_one_environment_variable(
        cls, parameters: dict[str, str]
    ) -> dict[str, str]:
        for name in parameters:
            if not 1 <= len(name) <= MAX_PARAMETER_NAME_LENGTH:
                raise ValueError(
                    f"spec.parameters: parameter names must be 1 to {MAX_PARAMETER_NAME_LENGTH} "
                    "characters long"
                )
        size = sum(len(name.encode()) + len(value.encode()) for name, value in parameters.items())
        if size > MAX_PARAMETERS_BYTES:
            raise ValueError(
                f"spec.parameters are {size} bytes of names and values (UTF-8); at most "
                f"{MAX_PARAMETERS_BYTES} fit in the runner's environment variable"
            )
        return parameters

    @model_validator(mode="after")
    def _template_or_worker_group(self) -> TaskSpec:
        if self.template is not None and self.worker_group is not None:
            raise ValueError(_TEMPLATE_AND_WORKER_GROUP)
        if self.worker_group is not None and self.replacement_policy != ReplacementPolicy.OVERLAP:
            raise ValueError(_AFTER_TERMINATION_IN_A_POOL)
        return self

    @field_validator("template")
    @classmethod
    def _template_leaves_the_lease_identity_to_the_operator(
        cls, template: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        # The schema keeps the pod template open (a whole PodTemplateSpec would be most of
        # the CRD), so the rules that look inside it live here. The operator refuses such a
        # Task with an Invalid condition instead of starting a runner that would misbehave.
        if template is None:
            return None
        pod_spec = template.get("spec")
        if not isinstance(pod_spec, dict):
            raise ValueError("spec.template.spec must be a pod spec")
        policy = pod_spec.get("restartPolicy", "Never")
        if policy != "Never":
            raise ValueError(
                f"spec.template.spec.restartPolicy is {policy!r}; runner pods must use "
                "'Never' (each attempt is a new pod with a new epoch)"
            )
        for c_index, container in enumerate(pod_spec.get("containers") or []):
            for e_index, env in enumerate((container or {}).get("env") or []):
                name = str((env or {}).get("name", ""))
                if name.startswith(RESERVED_ENV_PREFIX):
                    raise ValueError(
                        f"spec.template.spec.containers[{c_index}].env[{e_index}].name is "
                        f"{name!r}: {RESERVED_ENV_PREFIX}* variables are reserved for the "
                        "lease identity the operator gives each runner pod"
                    )
        return template


class Phase(enum.StrEnum):
    PENDING = "Pending"
    ASSIGNED = "Assigned"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    CANCELED = "Canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_PHASES


FINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.SKIPPED, Phase.CANCELED})


class ResultStatus(enum.StrEnum):
    """AWS SetTaskStatus taskStatus values."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    FALSE = "FALSE"


class Outcome(enum.StrEnum):
    """Why an attempt ended."""

    SUCCEEDED = "Succeeded"
    SKIPPED = "Skipped"
    FAILED = "Failed"
    ACK_TIMEOUT = "AckTimeout"
    PROGRESS_TIMEOUT = "ProgressTimeout"
    ATTEMPT_TIMEOUT = "AttemptTimeout"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    POD_FAILED = "PodFailed"
    POD_LOST = "PodLost"
    # The API server refused to create the attempt's pod as invalid (HTTP 400 or 422): the
    # template is wrong, and every attempt would be refused alike, so the task fails.
    POD_REJECTED = "PodRejected"
    RUNNER_LOST = "RunnerLost"  # a pool runner's own Lease expired or its pod died
    # The pod was evicted, preempted or lost with its node (its DisruptionTarget condition),
    # and spec.retry.onDisruption Ignore kept the attempt from counting.
    DISRUPTED = "Disrupted"
    RELEASED = "Released"  # a pool runner gave the task back (it was told to stop)
    CANCELED = "Canceled"


class Progress(_Model):
    """The runner's last progress report (AWS ReportTaskProgress), written by the runner."""

    epoch: int = Field(ge=1, description="The lease epoch the runner holds; must be current.")
    percent: float | None = Field(
        default=None, ge=0, le=100, description="Share of the work done, 0 to 100."
    )
    message: str | None = Field(default=None, max_length=1024, description="What it is doing.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Free-form key/value progress details (AWS ReportTaskProgress fields).",
    )
    checkpoint: Any = Field(
        default=None,
        description=(
            "Any JSON value the runner wants the next attempt to resume from. The next "
            "attempt receives it in TASKLEASE_CHECKPOINT."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    report_time: datetime | None = Field(
        default=None,
        description=(
            "When the runner sent this report, by the runner's clock. Shown to users; the "
            "operator never compares it with its own clock."
        ),
    )


class Result(_Model):
    """The runner's outcome (AWS SetTaskStatus), written by the runner."""

    epoch: int = Field(ge=1, description="The lease epoch the runner holds; must be current.")
    status: ResultStatus = Field(
        description=(
            "FINISHED: the work is done. FAILED: it failed (retried per spec.retry unless "
            "errorId is non-retryable). FALSE: a precondition was not met; the task is Skipped."
        )
    )
    error_id: str | None = Field(default=None, max_length=256, description="Error id of a failure.")
    error_message: str | None = Field(default=None, max_length=4096, description="What failed.")
    error_stack_trace: str | None = Field(
        default=None, max_length=32768, description="Stack trace of the failure."
    )
    report_time: datetime | None = Field(default=None, description="When the runner reported it.")


class AttemptRecord(_Model):
    """One attempt: who ran it, when, and how it ended."""

    attempt: int = Field(ge=1, description="Attempt number, from 1.")
    epoch: int = Field(ge=1, description="Lease epoch of this attempt.")
    holder: str = Field(description="The runner pod that held the lease.")
    start_time: datetime = Field(description="When the lease was handed out.")
    end_time: datetime | None = Field(default=None, description="When the attempt ended.")
    outcome: Outcome | None = Field(default=None, description="Why the attempt ended.")
    message: str | None = Field(default=None, max_length=4096, description="Details.")


class Condition(_Model):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(description="Condition type: Leased, Late, Complete or Invalid.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why.")
    message: str = Field(default="", max_length=32768, description="Details for people.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, description="The spec generation the condition was set for."
    )


class TaskStatus(_Model):
    """Observed state. The runner writes progress and result; the operator the rest."""

    phase: Phase = Field(
        default=Phase.PENDING,
        description=(
            "Where the task stands. Pending: waiting for a runner (or backing off before a "
            "retry). Assigned: leased to a runner that has not acknowledged yet. Running: the "
            "runner acknowledged and reports progress. Final: Succeeded, Failed, Skipped (the "
            "runner reported FALSE) or Canceled."
        ),
    )
    attempt: int = Field(default=0, ge=0, description="Attempts started so far.")
    disruptions: int = Field(
        default=0,
        ge=0,
        description=(
            "Attempts ended by a disruption that did not count against "
            "spec.retry.maxAttempts (outcome Disrupted)."
        ),
    )
    epoch: int = Field(
        default=0,
        ge=0,
        description="Current lease epoch (copy of the tasklease.io/epoch annotation).",
    )
    holder: str | None = Field(
        default=None, description="Runner pod holding the lease (copy of tasklease.io/holder)."
    )
    progress: Progress | None = Field(default=None, description="The runner's last report.")
    result: Result | None = Field(default=None, description="The runner's outcome.")
    attempts: list[AttemptRecord] = Field(
        default_factory=list,
        max_length=MAX_ATTEMPT_HISTORY,
        description=f"The last {MAX_ATTEMPT_HISTORY} attempts, oldest first.",
    )
    start_time: datetime | None = Field(default=None, description="First hand-out.")
    completion_time: datetime | None = Field(default=None, description="When it became final.")
    next_attempt_time: datetime | None = Field(
        default=None, description="While backing off: when the next attempt will be handed out."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Leased, Late, Complete and Invalid conditions.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int | None = Field(
        default=None, description="The spec generation the operator last acted on."
    )


class Lease(_Model):
    """The lease annotations, parsed. Epoch 0 means never handed out."""

    holder: str | None = None
    epoch: int = 0
    acquire_time: datetime | None = None


class Task(_Model):
    """A unit of work handed to one runner at a time under a heartbeat lease.

    The operator leases the task to a runner: a pod made from spec.template, or a pool
    runner of spec.workerGroup. The runner acknowledges within spec.ackTimeout and then
    reports progress in status.progress every spec.heartbeatInterval; when reports stop for
    spec.reportProgressTimeout, or the pod dies, the lease is taken back and the task handed
    to a new runner, up to spec.retry.maxAttempts attempts in all.
    """

    # Literals spelled out: mypy cannot narrow the str constants to Literal types.
    api_version: Literal["tasklease.io/v1alpha1"] = "tasklease.io/v1alpha1"
    kind: Literal["Task"] = "Task"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: TaskSpec
    status: TaskStatus = Field(default_factory=TaskStatus)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))

    @property
    def uid(self) -> str:
        return str(self.metadata.get("uid", ""))

    @property
    def generation(self) -> int:
        return int(self.metadata.get("generation", 0))

    @property
    def creation_time(self) -> datetime | None:
        stamp = self.metadata.get("creationTimestamp")
        return parse_rfc3339(stamp) if isinstance(stamp, str) else None

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metadata.get("labels") or {})

    @property
    def is_pool_task(self) -> bool:
        """Claimed by a pool runner (PollForTask) instead of getting a pod per attempt."""
        return self.spec.template is None

    @functools.cached_property
    def lease(self) -> Lease:
        """The lease annotations, read leniently.

        Anyone with patch rights can edit annotations; a garbled one must not make every
        decision about this Task raise. An unreadable epoch reads as 0 and an unreadable
        acquire time as unknown; the operator's next hand-out writes both anew.

        Read once per Task object: the core asks for it five times per watch event, and
        building it each time was a tenth of the operator's CPU per heartbeat. A Task is
        frozen and nothing copies one (`model_copy` would carry the cached lease along).
        """
        annotations = self.metadata.get("annotations") or {}
        epoch_text = str(annotations.get(EPOCH_ANNOTATION, "0"))
        return Lease(
            holder=annotations.get(HOLDER_ANNOTATION) or None,
            epoch=int(epoch_text) if _EPOCH_TEXT.fullmatch(epoch_text) else 0,
            acquire_time=parse_stamp(annotations.get(ACQUIRE_TIME_ANNOTATION)),
        )

    @property
    def previous_attempt(self) -> AttemptRecord | None:
        """The ended attempt recorded with the lease (`PREVIOUS_ATTEMPT_ANNOTATION`), read
        leniently like the lease: a garbled value reads as absent."""
        text = (self.metadata.get("annotations") or {}).get(PREVIOUS_ATTEMPT_ANNOTATION)
        if not isinstance(text, str):
            return None
        try:
            return AttemptRecord.model_validate_json(text)
        except ValidationError:
            return None
