"""Helpers for tests that drive the operator against the real API server.

The operator runs as a real subprocess (`python -m tasklease operator`), so a test can kill
it with SIGKILL and start it again exactly as a crash would. Runners are played from the
test process with the SDK, using the identity the operator gave the runner pod.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import GROUP, PLURAL, VERSION
from tasklease.controlplane.process import OperatorProcess
from tasklease.runner import Identity, TaskLease
from tests.waiting import wait_for

T = TypeVar("T")

__all__ = ["OperatorProcess", "wait_for"]  # re-exported: the integration tests import them

# Short lease timings so the suite stays fast; each test overrides what it exercises.
FAST_SPEC: dict[str, Any] = {
    "ackTimeout": "10s",
    "reportProgressTimeout": "30s",
    "heartbeatInterval": "1s",
    "retry": {"maxAttempts": 3, "backoff": {"initial": "0s"}},
}

RUNNER_TEMPLATE: dict[str, Any] = {
    "spec": {
        "containers": [
            {"name": "runner", "image": "busybox", "command": ["sh", "-c", "sleep 3600"]}
        ]
    }
}


class Cluster:
    """Typed shortcuts over the admin client, for one test namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def create_task(self, name: str, **spec: Any) -> dict[str, Any]:
        merged = {**FAST_SPEC, "template": RUNNER_TEMPLATE, **spec}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Task",
            "metadata": {"name": name},
            "spec": merged,
        }
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return created

    def task(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return found

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def status(self, name: str) -> dict[str, Any]:
        return self.task(name).get("status") or {}

    def annotations(self, name: str) -> dict[str, str]:
        return self.task(name)["metadata"].get("annotations") or {}

    def wait_phase(self, name: str, phase: str, *, timeout: float = 30.0) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            last.update(status=self.status(name))
            return last["status"] if last["status"].get("phase") == phase else None

        try:
            return wait_for(f"task {name} to reach phase {phase}", reached, timeout=timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}\nstatus: {dumps(last.get('status'))}") from None

    def wait_epoch(self, name: str, epoch: int, *, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the hand-out of `epoch` is complete (status caught up, phase Assigned+)."""
        handed_out: dict[str, Any] = wait_for(
            f"task {name} to be handed out with epoch {epoch}",
            lambda: (
                s
                if (s := self.status(name)).get("epoch") == epoch
                and s.get("phase") in ("Assigned", "Running")
                else None
            ),
            timeout=timeout,
        )
        return handed_out

    def pods(self, task_name: str) -> list[Any]:
        listed = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"tasklease.io/task={task_name}"
        )
        return list(listed.items)

    def pod(self, name: str) -> Any | None:
        try:
            return self.core.read_namespaced_pod(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def live_pod(self, name: str) -> Any | None:
        """The pod if it exists and is not being deleted."""
        pod = self.pod(name)
        return pod if pod is not None and pod.metadata.deletion_timestamp is None else None

    def events(self, name: str) -> list[Any]:
        listed = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return list(listed.items)

    def event_reasons(self, name: str) -> list[str]:
        return [e.reason for e in self.events(name)]

    def set_pod_phase(self, pod_name: str, phase: str, *, reason: str | None = None) -> None:
        """Play the kubelet: there is none here, so a test reports the pod's fate itself."""
        status: dict[str, Any] = {"phase": phase}
        if reason:
            status["reason"] = reason
            status["message"] = f"set by the test: {reason}"
        self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": status})

    def runner(
        self, task_name: str, *, epoch: int, heartbeat_interval_s: float | None = None
    ) -> TaskLease:
        """A runner holding the identity the operator put into that epoch's pod."""
        pod = wait_for(
            f"runner pod of {task_name} epoch {epoch}",
            lambda: next(
                (
                    p
                    for p in self.pods(task_name)
                    if p.metadata.labels.get("tasklease.io/epoch") == str(epoch)
                ),
                None,
            ),
        )
        identity = identity_from_pod(pod)
        return TaskLease(
            identity, api_client=self.api_client, heartbeat_interval_s=heartbeat_interval_s
        )


def pod_env(pod: Any) -> dict[str, Any]:
    """The first container's environment, downward-API references resolved like a kubelet."""
    env: dict[str, Any] = {}
    for item in pod.spec.containers[0].env or []:
        if item.value_from is not None and item.value_from.field_ref is not None:
            path = item.value_from.field_ref.field_path
            assert path == "metadata.name", f"unexpected downward API field {path}"
            env[item.name] = pod.metadata.name
        else:
            env[item.name] = item.value
    return env


def identity_from_pod(pod: Any) -> Identity:
    return Identity.from_env(pod_env(pod))


def raw_fenced_patch(
    cluster: Cluster, task_name: str, *, epoch: int, holder: str, operations: list[dict[str, Any]]
) -> ApiException | None:
    """A runner write as the SDK makes it; returns the refusal, or None when accepted."""
    fence = [
        {"op": "test", "path": "/metadata/annotations/tasklease.io~1epoch", "value": str(epoch)},
        {"op": "test", "path": "/metadata/annotations/tasklease.io~1holder", "value": holder},
    ]
    try:
        cluster.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            cluster.namespace,
            PLURAL,
            task_name,
            fence + operations,
            _content_type="application/json-patch+json",
        )
    except ApiException as exc:
        return exc
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> dict[str, float]:
    """Prometheus text exposition as {'name{labels}': value}, comments dropped."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


# --- the runner's ServiceAccount -------------------------------------------------------

RUNNER = "runner"


def runner_role(cluster: Cluster) -> None:
    """The runner ServiceAccount and its Role (what the chart's runner Role grants)."""
    rbac = client.RbacAuthorizationV1Api(cluster.api_client)
    cluster.core.create_namespaced_service_account(
        cluster.namespace, {"metadata": {"name": RUNNER}}
    )
    rbac.create_namespaced_role(
        cluster.namespace,
        {
            "metadata": {"name": RUNNER},
            "rules": [
                {"apiGroups": ["tasklease.io"], "resources": ["tasks"], "verbs": ["get", "watch"]},
                {
                    "apiGroups": ["tasklease.io"],
                    "resources": ["tasks/status"],
                    "verbs": ["get", "patch"],
                },
            ],
        },
    )


def bind_runner(cluster: Cluster) -> None:
    client.RbacAuthorizationV1Api(cluster.api_client).create_namespaced_role_binding(
        cluster.namespace,
        {
            "metadata": {"name": RUNNER},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RUNNER},
            "subjects": [
                {"kind": "ServiceAccount", "name": RUNNER, "namespace": cluster.namespace}
            ],
        },
    )


def unbind_runner(cluster: Cluster) -> None:
    client.RbacAuthorizationV1Api(cluster.api_client).delete_namespaced_role_binding(
        RUNNER, cluster.namespace
    )
