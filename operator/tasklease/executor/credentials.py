"""A pod process's credentials, as a kubelet gives a container its service-account token.

The kubelet asks the API server for a token of the pod's ServiceAccount *bound to the pod*
(TokenRequest with `boundObjectRef` = the Pod) and projects it into the container. Such a
token dies with the pod (the API server checks the pod's uid on every request) and
authenticates as `system:serviceaccount:<namespace>:<name>` with the user extra
`authentication.kubernetes.io/pod-name` (and `pod-uid`, and the node's name), which an
admission policy can check. Here the token goes into a file beside a per-pod kubeconfig
(server and CA from the executor's own kubeconfig, `tokenFile` pointing at the token), and
the process gets `KUBECONFIG`. The executor rewrites the token file before the token
expires; clients that read the file on each use (client-go, hence kubectl) pick the new one
up, while the Python client reads it once per `load_kube_config`.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import yaml

from tasklease.api.times import parse_rfc3339

TOKEN_FILE: Final = "token"
KUBECONFIG_FILE: Final = "kubeconfig"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the API server is and how to trust it, taken from the executor's own client."""

    server: str
    ca_data: bytes | None
    insecure: bool = False

    @classmethod
    def from_configuration(cls, configuration: Any) -> Endpoint:
        """From a `kubernetes.client.Configuration` loaded from a kubeconfig (its CA, even
        when given inline, is a file by then)."""
        ca_path = getattr(configuration, "ssl_ca_cert", None)
        return cls(
            server=str(configuration.host),
            ca_data=Path(ca_path).read_bytes() if ca_path else None,
            insecure=not bool(getattr(configuration, "verify_ssl", True)),
        )


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: datetime


def token_request(*, pod_name: str, pod_uid: str, expiration_s: int) -> dict[str, Any]:
    """The TokenRequest body for a token bound to one pod; the default audience (the API
    server's own) is what a client of the API needs."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": expiration_s,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid},
        },
    }


def parse_token(response: dict[str, Any]) -> Token:
    status = response.get("status") or {}
    expires = str(status.get("expirationTimestamp", "")).replace("Z", "+00:00")
    return Token(value=str(status["token"]), expires_at=parse_rfc3339(expires))


def _write_private(path: Path, text: str) -> None:
    """Write atomically (a reader never sees half a file) and readable only by its owner."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    temporary.replace(path)


def kubeconfig(*, endpoint: Endpoint, token_file: Path, namespace: str) -> dict[str, Any]:
    cluster: dict[str, Any] = {"server": endpoint.server}
    if endpoint.ca_data is not None:
        cluster["certificate-authority-data"] = base64.b64encode(endpoint.ca_data).decode()
    if endpoint.insecure:
        cluster["insecure-skip-tls-verify"] = True
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "pod", "user": {"tokenFile": str(token_file)}}],
        "contexts": [
            {"name": "pod", "context": {"cluster": "local", "user": "pod", "namespace": namespace}}
        ],
        "current-context": "pod",
        "preferences": {},
    }


def write_credentials(folder: Path, *, endpoint: Endpoint, token: Token, namespace: str) -> Path:
    """Write (or refresh) a pod's token and kubeconfig into `folder`; returns the
    kubeconfig's path."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_file = folder / TOKEN_FILE
    _write_private(token_file, token.value)
    path = folder / KUBECONFIG_FILE
    if not path.exists():
        config = kubeconfig(endpoint=endpoint, token_file=token_file, namespace=namespace)
        _write_private(path, yaml.safe_dump(config, sort_keys=False))
    return path


def refresh_delay_s(token: Token, *, now: datetime | None = None) -> float:
    """Seconds until the token should be replaced: at 80% of its remaining life, as the
    kubelet does, and never sooner than in 10 s (so a short-lived token cannot spin)."""
    current = now or datetime.now(UTC)
    return max(10.0, 0.8 * (token.expires_at - current).total_seconds())
