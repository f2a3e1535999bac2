"""All operator settings in one place; each one overridable by a TASKLEASE_* variable.

Defaults are right for a real cluster; tests and the demo override through the environment
exactly as a Helm value would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tasklease.api.durations import Duration

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def own_namespace() -> str:
    """The namespace of the pod the operator runs in (its ServiceAccount's), else default."""
    try:
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKLEASE_", frozen=True)

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch (comma-separated in the environment); empty: all.",
    )
    workers: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Tasks reconciled concurrently (each one waits on API round trips).",
    )
    api_qps: float = Field(
        default=50.0,
        gt=0,
        description="Sustained API requests per second of the reconciler (client-go's QPS).",
    )
    api_burst: int = Field(
        default=100,
        ge=1,
        description="Requests the reconciler may make at once (client-go's burst).",
    )
    metrics_port: int = Field(default=8080, ge=0, le=65535, description="0 disables metrics.")
    health_port: int = Field(default=8081, ge=0, le=65535, description="0 disables probes.")
    log_level: str = Field(default="INFO", description="Python logging level name.")
    compact_managed_fields: bool = Field(
        default=True,
        description=(
            "At each hand-out, replace a Task's managedFields by the operator's entry for the "
            "lease, unless a manager applied the Task server-side: each heartbeat then costs "
            "the API server about a quarter less (docs/decisions/compact-managed-fields.md)."
        ),
    )
    ttl_after_finished: Duration | None = Field(
        default=None,
        description=(
            "spec.ttlAfterFinished of Tasks that set none, e.g. '168h' (a Go duration); "
            "unset: such Tasks are kept."
        ),
    )
    leader_election: bool = Field(
        default=False,
        description=(
            "Elect one active replica through a coordination.k8s.io/v1 Lease; the others "
            "stand by, starting nothing, until it stops or fails to renew."
        ),
    )
    leader_election_namespace: str = Field(
        default_factory=own_namespace,
        description="Namespace of the election's Lease; default: the operator pod's own.",
    )
    leader_election_name: str = Field(
        default="tasklease-operator", description="Name of the election's Lease."
    )

    @field_validator("namespaces", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def from_env(cls) -> OperatorSettings:
        return cls()
