"""Helpers for the chart's tests: helm, the chart installed into a test namespace (or once
for a whole module: `ChartInstaller`), and API clients acting as the chart's ServiceAccounts
(real tokens, or impersonation).

Every release installed here watches only its own test namespace and binds its admission
policy to that namespace alone: the control plane is shared by the whole session, and a
clusterwide operator or policy would act on other tests' Tasks.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import secrets
import subprocess
import textwrap
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import GROUP, PLURAL, VERSION
from tasklease.api.times import rfc3339_micro
from tests.integration.support import Cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "tasklease"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
RUNNER_SA = "tasklease-runner"
POOL_RUNNER_SA = "tasklease-pool-runner"


@dataclass(frozen=True)
class Helm:
    binary: Path
    kubeconfig: Path | None = None
    home: Path | None = None

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
        if self.home is not None:
            # helm keeps a cache, config and data dir; keep them out of the user's home.
            for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
                env[name] = str(self.home / name.lower())
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def template(
        self, release: str, namespace: str, values: dict[str, Any], tmp: Path
    ) -> list[dict[str, Any]]:
        values_file = tmp / f"values-{release}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        out = self(
            "template", release, str(CHART), "--namespace", namespace, "-f", str(values_file)
        )
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def scoped_values(namespace: str, **overrides: Any) -> dict[str, Any]:
    """Values that keep a release to one test namespace (operator, runners and policy).

    The unwatched-namespace warning is off: it applies to every namespace but the watched
    ones, so it would warn about other tests' Tasks (its own test turns it on)."""
    values: dict[str, Any] = {
        "watchNamespaces": [namespace],
        "admissionPolicy": {"warnUnwatchedNamespaces": False},
    }
    values.update(overrides)
    return values


@dataclass
class Release:
    name: str
    namespace: str
    documents: list[dict[str, Any]]
    notes: str = ""

    @property
    def fullname(self) -> str:
        return f"{self.name}-tasklease" if "tasklease" not in self.name else self.name

    @property
    def operator_sa(self) -> str:
        return f"{self.fullname}-operator"

    @property
    def operator_user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.operator_sa}"

    def runner_user(self, namespace: str | None = None) -> str:
        return f"system:serviceaccount:{namespace or self.namespace}:{RUNNER_SA}"

    def pool_runner_user(self, namespace: str | None = None) -> str:
        return f"system:serviceaccount:{namespace or self.namespace}:{POOL_RUNNER_SA}"

    def kinds(self) -> list[str]:
        return [doc["kind"] for doc in self.documents]

    def example_task(self) -> str:
        """The Task that NOTES.txt tells the user to apply."""
        lines = self.notes.splitlines()
        start = next(i for i, line in enumerate(lines) if "<<'YAML'" in line) + 1
        end = next(i for i in range(start, len(lines)) if lines[i].strip() == "YAML")
        return textwrap.dedent("\n".join(lines[start:end]))


@contextlib.contextmanager
def installed(
    helm: Helm, namespace: str, tmp: Path, values: dict[str, Any], *, release: str | None = None
) -> Iterator[Release]:
    """`helm install` the chart into `namespace`; `helm uninstall` afterwards (which also
    removes its cluster-scoped objects: ClusterRole, binding, admission policy)."""
    name = release or f"r{namespace.removeprefix('t-')}"
    values_file = tmp / f"install-{name}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    out = helm("install", name, str(CHART), "--namespace", namespace, "-f", str(values_file))
    manifest = helm("get", "manifest", name, "--namespace", namespace).stdout
    documents = [doc for doc in yaml.safe_load_all(manifest) if doc]
    assert "Next steps" in out.stdout, f"NOTES.txt missing from helm install output:\n{out}"
    try:
        yield Release(name, namespace, documents, notes=out.stdout)
    finally:
        helm("uninstall", name, "--namespace", namespace, "--wait", "--timeout=60s", check=False)


@dataclass
class ChartSetup:
    """The chart installed once for a test module (see `ChartInstaller`)."""

    namespace: str  # the release's, the one it watches
    other_namespace: str  # one it does not watch
    release: Release
    control_plane: Any
    admin: client.ApiClient
    kubectl: Any
    tmp: Path

    @functools.cached_property
    def cluster(self) -> Cluster:
        """The admin's shortcuts in the release's namespace."""
        return Cluster(self.admin, self.namespace)

    def can_i(
        self,
        user: str,
        verb: str,
        resource: str,
        namespace: str | None = None,
        *,
        name: str | None = None,
    ) -> bool:
        """`kubectl auth can-i` as `user`: `resource` may name a subresource
        (`tasks.tasklease.io/status`), `name` one object; no namespace means all of them."""
        resource, _, subresource = resource.partition("/")
        args = ["auth", "can-i", verb, f"{resource}/{name}" if name else resource, f"--as={user}"]
        args += [f"--subresource={subresource}"] if subresource else []
        args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
        result = self.kubectl(*args, check=False)
        answer = str(result.stdout).strip()
        assert answer in ("yes", "no"), result.stdout + result.stderr
        return answer == "yes"


S = TypeVar("S", bound=ChartSetup)


@dataclass(frozen=True)
class ChartInstaller:
    """What installing the chart for a module takes (the `chart_installer` fixture)."""

    helm: Helm
    tmp_path_factory: pytest.TempPathFactory
    control_plane: Any
    admin: client.ApiClient
    kubectl: Any

    @contextlib.contextmanager
    def install(
        self,
        kind: type[S],
        *,
        prefix: str,
        values: Callable[[str], dict[str, Any]] = scoped_values,
    ) -> Iterator[S]:
        """The chart installed into a namespace `t-<prefix>-<random>` of its own, with
        `values` for that namespace, beside a namespace it does not watch; an instance of
        `kind` (ChartSetup or a subclass with defaults for its own fields) describes them.
        `helm uninstall` afterwards, and both namespaces deleted without waiting."""
        core = client.CoreV1Api(self.admin)
        namespace = f"t-{prefix}-{secrets.token_hex(3)}"
        other = f"{namespace}-other"
        tmp = self.tmp_path_factory.mktemp(prefix)
        for name in (namespace, other):
            core.create_namespace({"metadata": {"name": name}})
        try:
            with installed(self.helm, namespace, tmp, values(namespace)) as release:
                yield kind(
                    namespace, other, release, self.control_plane, self.admin, self.kubectl, tmp
                )
        finally:
            for name in (namespace, other):
                core.delete_namespace(name, propagation_policy="Background")


# --- identities -----------------------------------------------------------------------------


def _configuration(control_plane: Any) -> client.Configuration:
    configuration = client.Configuration()
    configuration.host = control_plane.server
    configuration.ssl_ca_cert = str(control_plane.admin_ca)
    configuration.verify_ssl = True
    return configuration


def token_client(control_plane: Any, token: str) -> client.ApiClient:
    """An API client authenticating with a bearer token, nothing else."""
    configuration = _configuration(control_plane)
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(configuration)


def impersonating_client(
    control_plane: Any, user: str, *, pod: str | None = None, groups: tuple[str, ...] = ()
) -> client.ApiClient:
    """The admin acting as `user` (and, with `pod`, as that pod's bound token would)."""
    configuration = _configuration(control_plane)
    configuration.cert_file = str(control_plane.admin_cert)
    configuration.key_file = str(control_plane.admin_key)
    api = client.ApiClient(configuration)
    api.set_default_header("Impersonate-User", user)
    for group in groups:
        # The generated client keeps one value per header; one group is all the tests need.
        api.set_default_header("Impersonate-Group", group)
    if pod is not None:
        key = urllib.parse.quote(POD_NAME_EXTRA, safe="")
        api.set_default_header(f"Impersonate-Extra-{key}", pod)
    return api


def service_account_token(
    core: client.CoreV1Api,
    namespace: str,
    service_account: str,
    *,
    pod: dict[str, Any] | Any | None = None,
) -> str:
    """A real token from the TokenRequest API; bound to `pod` (as a kubelet's projected token
    is) when given, so it carries the pod-name claim."""
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if pod is not None:
        metadata = pod["metadata"] if isinstance(pod, dict) else pod.metadata
        name = metadata["name"] if isinstance(metadata, dict) else metadata.name
        uid = metadata["uid"] if isinstance(metadata, dict) else metadata.uid
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid}
    response = core.create_namespaced_service_account_token(
        service_account, namespace, {"spec": spec}
    )
    token: str = response.status.token
    return token


def write_token_kubeconfig(
    path: Path, control_plane: Any, token: str, user: str, *, server: str | None = None
) -> Path:
    """A kubeconfig authenticating only with `token` (no client certificate), for the API
    server or, with `server`, a relay to it."""
    ca = base64.b64encode(Path(control_plane.admin_ca).read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": server or control_plane.server,
                    "certificate-authority-data": ca,
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump(config, out)
    return path


def runner_pod(
    core: client.CoreV1Api,
    namespace: str,
    name: str,
    *,
    service_account: str = RUNNER_SA,
    labels: dict[str, str] | None = None,
) -> Any:
    """A pod object running as the runner ServiceAccount (no kubelet runs it here)."""
    return core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "serviceAccountName": service_account,
                "restartPolicy": "Never",
                "containers": [{"name": "runner", "image": "busybox", "command": ["true"]}],
            },
        },
    )


# --- Tasks ---------------------------------------------------------------------------------


def leased_task(
    api: client.ApiClient, namespace: str, name: str, *, holder: str, epoch: int
) -> dict[str, Any]:
    """A Task whose lease the admin wrote by hand (no operator): holder and epoch."""
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Task",
        "metadata": {
            "name": name,
            "annotations": {"tasklease.io/holder": holder, "tasklease.io/epoch": str(epoch)},
        },
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "runner", "image": "busybox", "command": ["true"]}]
                }
            }
        },
    }
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return created


def progress(epoch: int, percent: float = 10.0) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "percent": percent,
        "message": "working",
        "reportTime": rfc3339_micro(datetime.now(UTC)),
    }


def result(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "status": "FINISHED", "reportTime": rfc3339_micro(datetime.now(UTC))}


def patch_status(
    api: client.ApiClient, namespace: str, name: str, status: dict[str, Any]
) -> ApiException | None:
    """A merge patch of the status, with no fencing `test` ops (a rogue runner's write):
    only the admission policy stands in its way. Returns the refusal, or None."""
    custom = client.CustomObjectsApi(api)
    try:
        custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
        )
    except ApiException as error:
        return error
    return None


def message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body).get("message", ""))
    except (TypeError, ValueError):
        return str(error.reason)
