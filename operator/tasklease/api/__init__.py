"""The Task API (`tasklease.io/v1alpha1`).

`models` is the one source of truth: the pydantic models the operator and the runner SDK
use, with the descriptions, defaults and validation rules the CRD carries. `crd` renders
the CustomResourceDefinition from them (`python -m tasklease.api.crd`, `make manifests`);
it is not imported here, so importing the models does not pull in the renderer.
"""

from tasklease.api.durations import Duration, format_go_duration, parse_go_duration
from tasklease.api.models import (
    API_VERSION,
    FINAL_PHASES,
    GROUP,
    KIND,
    VERSION,
    AttemptRecord,
    Backoff,
    Condition,
    Lease,
    Outcome,
    Phase,
    Progress,
    Result,
    ResultStatus,
    RetryPolicy,
    Task,
    TaskSpec,
    TaskStatus,
)

__all__ = [
    "API_VERSION",
    "FINAL_PHASES",
    "GROUP",
    "KIND",
    "VERSION",
    "AttemptRecord",
    "Backoff",
    "Condition",
    "Duration",
    "Lease",
    "Outcome",
    "Phase",
    "Progress",
    "Result",
    "ResultStatus",
    "RetryPolicy",
    "Task",
    "TaskSpec",
    "TaskStatus",
    "format_go_duration",
    "parse_go_duration",
]
