"""The plugin's talk with the API server: which cluster, user and namespace (as kubectl
picks them), the requests it makes, the API server's clock, and errors worded as kubectl
words them.

The synchronous `kubernetes` client, as the runner uses: the plugin ships in the runner
image, and one request at a time is all a command line needs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tasklease.api.models import GROUP, KIND, PLURAL, VERSION
from tasklease.api.times import ServerClock

DEFAULT_NAMESPACE = "default"
_IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A watch is re-opened after this long, as kubectl's are: a connection silently dropped
# by something in between shows as a watch that ends, not as one that hangs forever.
WATCH_WINDOW_S = 60


class PluginError(Exception):
    """Ends the command with exit status 1 and this message on stderr, as kubectl would."""


def api_error(error: Exception) -> PluginError:
    """An API failure in kubectl's words: `Error from server (NotFound): tasks.tasklease.io
    "x" not found` for the API server's refusals (its Status message verbatim)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        if not error.status:  # no answer (a TLS failure, a request that could not be made)
            return PluginError(f"Unable to connect to the server: {error.reason}")
        try:
            status = json.loads(error.body or "")
        except ValueError:
            status = None
        if isinstance(status, dict) and status.get("kind") == "Status":
            reason = status.get("reason") or error.reason or "Unknown"
            return PluginError(f"Error from server ({reason}): {status.get('message', '')}")
        text = (error.body or "").strip() or error.reason
        return PluginError(f"Error from server ({error.reason}): {text}")
    # urllib3's MaxRetryError: its reason is what went wrong (refused, a name not found).
    return PluginError(f"Unable to connect to the server: {getattr(error, 'reason', error)}")


@dataclass(frozen=True)
class Target:
    """What kubectl's global flags chose: the kubeconfig file(s), the context, and the
    namespace. `namespace_given` tells an explicit `-n` from the context's default."""

    kubeconfig: str | None
    context: str | None
    namespace: str
    namespace_given: bool
    in_cluster: bool = False


def resolve_target(
    *,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    environ: Mapping[str, str] = os.environ,
) -> Target:
    """The namespace kubectl would use: `-n`, else the context's, else "default". In a pod
    with no kubeconfig, the pod's own namespace (kubectl's in-cluster default)."""
    if _in_cluster(kubeconfig, context, environ):
        own = namespace or _read_in_cluster_namespace() or DEFAULT_NAMESPACE
        return Target(None, context, own, namespace is not None, in_cluster=True)
    from kubernetes import config

    try:
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
    except config.ConfigException as error:
        raise PluginError(f"error: {error}") from error
    chosen = current
    if context is not None:
        chosen = next((c for c in contexts or [] if c.get("name") == context), None)
        if chosen is None:
            raise PluginError(f'error: context "{context}" does not exist')
    context_namespace = ((chosen or {}).get("context") or {}).get("namespace")
    return Target(
        kubeconfig=kubeconfig,
        context=context,
        namespace=namespace or context_namespace or DEFAULT_NAMESPACE,
        namespace_given=namespace is not None,
    )


def _in_cluster(kubeconfig: str | None, context: str | None, environ: Mapping[str, str]) -> bool:
    """In a pod, with nothing that names a kubeconfig: its ServiceAccount, as kubectl."""
    if kubeconfig or context or environ.get("KUBECONFIG"):
        return False
    return "KUBERNETES_SERVICE_HOST" in environ and not Path("~/.kube/config").expanduser().exists()


def _read_in_cluster_namespace() -> str | None:
    try:
        return _IN_CLUSTER_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


@dataclass
class Reply:
    """An answer's body (decoded JSON) and the API server's time when it gave it."""

    body: dict[str, Any]
    server_now: datetime


@dataclass
class Session:
    """The requests the commands make, as one user against one cluster."""

    target: Target
    api_client: Any
    clock: ServerClock = field(default_factory=ServerClock)

    @classmethod
    def open(cls, target: Target) -> Session:
        from kubernetes import client, config

        try:
            if target.in_cluster:
                config.load_incluster_config()
                api_client = client.ApiClient()
            else:
                api_client = config.new_client_from_config(
                    config_file=target.kubeconfig, context=target.context, persist_config=False
                )
        except config.ConfigException as error:
            raise PluginError(f"error: {error}") from error
        return cls(target, api_client)

    @property
    def namespace(self) -> str:
        return self.target.namespace

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    def _reply(self, request: Callable[[], Any]) -> Reply:
        try:
            response = request()
        except Exception as error:
            raise api_error(error) from error
        self.clock.observe(response.headers)
        return Reply(json.loads(response.data), self.clock.now())

    # --- Tasks ----------------------------------------------------------------------------

    def get_task(self, name: str, *, namespace: str | None = None) -> Reply:
        return self._reply(
            lambda: self._custom().get_namespaced_custom_object(
                GROUP, VERSION, namespace or self.namespace, PLURAL, name, _preload_content=False
            )
        )

    def list_tasks(self, *, all_namespaces: bool = False) -> Reply:
        if all_namespaces:
            return self._reply(
                lambda: self._custom().list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, _preload_content=False
                )
            )
        return self._reply(
            lambda: self._custom().list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, _preload_content=False
            )
        )

    def merge_patch_task(self, name: str, patch: dict[str, Any]) -> Reply:
        return self._reply(
            lambda: self._custom().patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                patch,
                field_manager="kubectl-tasklease",
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        )

    def create_task(self, body: dict[str, Any]) -> Reply:
        return self._reply(
            lambda: self._custom().create_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                body,
                field_manager="kubectl-tasklease",
                _preload_content=False,
            )
        )

    def watch_task(
        self, name: str, resource_version: str, *, deadline: float | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, Task) for each change of the Task after `resource_version`, until the
        monotonic `deadline` (or for as long as the caller reads); re-opened every
        `WATCH_WINDOW_S` from the last version seen, and read afresh when the API server no
        longer has that version (410 Gone)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        version = resource_version
        while True:
            window_s = WATCH_WINDOW_S
            if deadline is not None:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return
                # The API server ends the watch then: whole seconds, at least one.
                window_s = max(1, min(WATCH_WINDOW_S, math.ceil(left_s)))
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self._custom().list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    field_selector=f"metadata.name={name}",
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=window_s,
                ):
                    task = event["object"]
                    version = task.get("metadata", {}).get("resourceVersion") or version
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        yield event["type"], task
            except ApiException as error:
                if error.status != 410:
                    raise api_error(error) from error
                reread = self.get_task(name)
                version = reread.body["metadata"]["resourceVersion"]
                yield "MODIFIED", reread.body
            except Exception as error:
                raise api_error(error) from error
            finally:
                stream.stop()

    # --- around a Task --------------------------------------------------------------------

    def task_events(self, task: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The core/v1 Events about this Task (this one: its uid, not an earlier Task of the
        same name), as the operator records them (`kube/client.py`: involvedObject of kind
        Task, the Task's name, namespace and uid)."""
        metadata = task.get("metadata") or {}
        selector = [
            f"involvedObject.kind={KIND}",
            f"involvedObject.name={metadata.get('name', '')}",
        ]
        if metadata.get("uid"):
            selector.append(f"involvedObject.uid={metadata['uid']}")
        reply = self._reply(
            lambda: self._core().list_namespaced_event(
                metadata.get("namespace") or self.namespace,
                field_selector=",".join(selector),
                _preload_content=False,
            )
        )
        items: list[dict[str, Any]] = reply.body.get("items") or []
        return items

    def pod_exists(self, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self._core().read_namespaced_pod(name, self.namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return False
            raise api_error(error) from error
        except Exception as error:
            raise api_error(error) from error
        return True


def kubectl_binary(environ: Mapping[str, str] = os.environ) -> str:
    """The kubectl that ran the plugin (it sets KUBECTL_PATH for its plugins), else the
    first on PATH."""
    for variable in ("KUBECTL_PATH", "KUBECTL_PLUGINS_CALLER"):
        path = environ.get(variable)
        if path and os.access(path, os.X_OK):
            return path
    found = shutil.which("kubectl", path=environ.get("PATH"))
    if found is None:
        raise PluginError("error: kubectl not found on PATH (needed for logs)")
    return found
