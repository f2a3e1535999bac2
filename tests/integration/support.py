"""Helpers for tests that drive the operator against the real API server.

The operator runs as a real subprocess (`python -m tasklease operator`), so a test can kill
it with SIGKILL and start it again exactly as a crash would. Runners are played from the
test process with the SDK, using the identity the operator gave the runner pod.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import CLAIMABLE_LABEL, GROUP, HOLDER_ANNOTATION, PLURAL, VERSION
from tasklease.controlplane.process import OperatorProcess
from tasklease.controlplane.scrape import scrape as scrape_url
from tasklease.runner import Identity, TaskLease
from tests.waiting import wait_for

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

    def create_pool_task(self, name: str, group: str, **spec: Any) -> None:
        """A Task for the pool runners of worker group `group` (no pod template)."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Task",
            "metadata": {"name": name},
            "spec": {**FAST_SPEC, "workerGroup": group, **spec},
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def task(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return found

    def tasks(self) -> list[dict[str, Any]]:
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        items: list[dict[str, Any]] = listed["items"]
        return items

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def status(self, name: str) -> dict[str, Any]:
        return status_of(self.task(name))

    def annotations(self, name: str) -> dict[str, str]:
        return self.task(name)["metadata"].get("annotations") or {}

    def wait_phase(self, name: str, phase: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """The Task's status once it is in `phase`."""
        task = wait_phase(f"task {name}", lambda: self.task(name), phase, timeout=timeout)
        status: dict[str, Any] = task["status"]
        return status

    def wait_offered(self, name: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """The pool Task once it is offered to its pool: claimable, and held by nobody."""

        def offered() -> dict[str, Any] | None:
            task = self.task(name)
            labels = task["metadata"].get("labels") or {}
            annotations = task["metadata"].get("annotations") or {}
            if labels.get(CLAIMABLE_LABEL) == "true" and HOLDER_ANNOTATION not in annotations:
                return task
            return None

        return wait_for(f"task {name} to be offered to the pool", offered, timeout=timeout)

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

    def wait_events(self, name: str, *reasons: str, timeout: float = 30) -> list[str]:
        """The reasons of the Events about `name` once all of `reasons` are among them. The
        operator sends Events from their own queue, a moment after the status write a test
        waits for, so a test never reads them at once."""
        wanted = set(reasons)
        return wait_for(
            f"the {', '.join(reasons)} Event(s) of {name}",
            lambda: self.event_reasons(name),
            until=lambda found: wanted <= set(found),
            timeout=timeout,
        )

    def set_pod_phase(self, pod_name: str, phase: str, *, reason: str | None = None) -> None:
        """Play the kubelet: there is none here, so a test reports the pod's fate itself."""
        status: dict[str, Any] = {"phase": phase}
        if reason:
            status["reason"] = reason
            status["message"] = f"set by the test: {reason}"
        self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": status})

    def runner(
        self,
        task_name: str,
        *,
        epoch: int,
        heartbeat_interval_s: float | None = None,
        api_client: client.ApiClient | None = None,
    ) -> TaskLease:
        """A runner holding the identity the operator put into that epoch's pod, writing
        with the admin's credentials or `api_client`'s (a runner ServiceAccount's)."""
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
            identity,
            api_client=api_client or self.api_client,
            heartbeat_interval_s=heartbeat_interval_s,
        )


def wait_phase(
    what: str, read: Callable[[], dict[str, Any] | None], *phases: str, timeout: float = 30.0
) -> dict[str, Any]:
    """The object `read` returns (a Task, a pod; None while there is none) once its
    status.phase is one of `phases`; a failure shows the last status seen."""
    seen: list[dict[str, Any] | None] = [None]

    def reached() -> dict[str, Any] | None:
        seen[0] = read()
        return seen[0] if seen[0] and status_of(seen[0]).get("phase") in phases else None

    try:
        return wait_for(f"{what} to reach phase {' or '.join(phases)}", reached, timeout=timeout)
    except AssertionError as error:
        last = status_of(seen[0]) if seen[0] else None
        raise AssertionError(f"{error}\nstatus: {dumps(last)}") from None


def status_of(body: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = body.get("status") or {}
    return status


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


def scrape(port: int) -> dict[str, float]:
    """The operator's metrics on `port`, each sample keyed by `scrape.sample_key`."""
    return scrape_url(f"http://127.0.0.1:{port}/metrics")


def watches_opened(api_client: client.ApiClient) -> threading.Event:
    """An Event set each time a request through `api_client` opens a watch (clear it to wait
    for the next one): a long poll that watches has listed, and waits for what comes next.
    Set as the request is sent; the watch starts from the list's resourceVersion, so nothing
    written after the Event is set can pass it by."""
    opened = threading.Event()
    call_api = api_client.call_api

    def noting(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if "watch=true" in urllib.parse.urlsplit(url).query.split("&"):
            opened.set()
        return call_api(method, url, *args, **kwargs)

    api_client.call_api = noting
    return opened


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


# --- runner pods under the wrapper (`tasklease run`) ----------------------------------


def wrapped(script: str) -> dict[str, Any]:
    """A pod template whose container runs `script` under `tasklease run`."""
    return {
        "spec": {
            "containers": [
                {
                    "name": "runner",
                    "image": "tasklease",
                    "command": [
                        sys.executable,
                        "-m",
                        "tasklease",
                        "run",
                        "--grace-period",
                        "2",
                        "--",
                        "sh",
                        "-c",
                        script,
                    ],
                }
            ]
        }
    }


def shell(body: str) -> str:
    """`body` with a `progress TEXT` function that writes the progress file atomically (to
    a temporary name, then a rename); TEXT's `\\n` become newlines."""
    write = (
        'printf %b "$1" > "$TASKLEASE_PROGRESS_FILE.tmp" && '
        'mv "$TASKLEASE_PROGRESS_FILE.tmp" "$TASKLEASE_PROGRESS_FILE"'
    )
    return f"progress() {{ {write}; }}\n{body}"
