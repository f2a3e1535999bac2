"""Worker pools: long-lived runners that claim Tasks of their worker group (PollForTask).

    from tasklease.runner.pool import PoolRunner

    with PoolRunner("gpu") as runner:              # renews this pod's runner Lease
        while not runner.stopping:
            task = runner.poll_for_task(timeout_s=90)   # long poll, like PollForTask
            if task is None:
                continue
            with task:                                  # the same handle as tasklease.runner
                work(task.parameters, task.checkpoint)

A claim is one compare-and-swap on the Task's lease annotations (a JSON Patch that `test`s
the current epoch and the claimable label, then writes holder, epoch + 1 and acquire time
and removes the label), so of two runners racing for a task exactly one wins; the other's
patch is refused and it moves on to the next task.

The runner's own liveness (AWS ReportTaskRunnerHeartbeat) is a `coordination.k8s.io/v1`
Lease named after its pod, renewed every few seconds. When it expires, or the pod dies, the
operator hands every task this runner holds back to the pool at once. A runner that is told
to stop (SIGTERM, or its Lease deleted) releases the tasks it has not finished.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    CLAIMABLE_LABEL,
    EPOCH_ANNOTATION,
    GROUP,
    HOLDER_ANNOTATION,
    PLURAL,
    POOL_RUNNER_ROLE,
    ROLE_LABEL,
    VERSION,
    WORKER_GROUP_LABEL,
)
from tasklease.api.runner_env import ENV_NAMESPACE, ENV_POD_NAME
from tasklease.api.times import rfc3339_micro
from tasklease.runner.sdk import Identity, TaskLease, default_api_client, json_pointer

logger = logging.getLogger(__name__)

JSON_PATCH = "application/json-patch+json"


def claim_order(task: dict[str, Any]) -> tuple[int, str, str]:
    """Higher spec.priority first, then older first (then by name, for a stable order)."""
    spec = task.get("spec") or {}
    metadata = task.get("metadata") or {}
    return (
        -int(spec.get("priority") or 0),
        str(metadata.get("creationTimestamp", "")),
        str(metadata.get("name", "")),
    )


def claim_patch(*, epoch: int, holder: str, acquire_time: str) -> list[dict[str, Any]]:
    """The compare-and-swap that claims a claimable Task at `epoch` for `holder`."""
    annotations = "/metadata/annotations/"
    return [
        {"op": "test", "path": annotations + json_pointer(EPOCH_ANNOTATION), "value": str(epoch)},
        {
            "op": "test",
            "path": "/metadata/labels/" + json_pointer(CLAIMABLE_LABEL),
            "value": "true",
        },
        {"op": "add", "path": annotations + json_pointer(HOLDER_ANNOTATION), "value": holder},
        {
            "op": "replace",
            "path": annotations + json_pointer(EPOCH_ANNOTATION),
            "value": str(epoch + 1),
        },
        {
            "op": "add",
            "path": annotations + json_pointer(ACQUIRE_TIME_ANNOTATION),
            "value": acquire_time,
        },
        {"op": "remove", "path": "/metadata/labels/" + json_pointer(CLAIMABLE_LABEL)},
    ]


def release_patch(*, epoch: int, holder: str) -> list[dict[str, Any]]:
    """Give a held Task back: fenced on epoch and holder, removes the holder."""
    annotations = "/metadata/annotations/"
    return [
        {"op": "test", "path": annotations + json_pointer(EPOCH_ANNOTATION), "value": str(epoch)},
        {"op": "test", "path": annotations + json_pointer(HOLDER_ANNOTATION), "value": holder},
        {"op": "remove", "path": annotations + json_pointer(HOLDER_ANNOTATION)},
    ]


class PoolRunner:
    """One pool runner process: its runner Lease, its claims, its clean shutdown."""

    def __init__(
        self,
        worker_group: str,
        *,
        namespace: str | None = None,
        pod_name: str | None = None,
        api_client: Any = None,
        lease_duration_s: int = 15,
        renew_interval_s: float = 5.0,
    ) -> None:
        from kubernetes import client

        self.worker_group = worker_group
        self.namespace = namespace or _own_namespace()
        self.pod_name = pod_name or os.environ.get(ENV_POD_NAME) or os.environ["HOSTNAME"]
        self._api_client = api_client or default_api_client()
        self._custom = client.CustomObjectsApi(self._api_client)
        self._coordination = client.CoordinationV1Api(self._api_client)
        self.lease_duration_s = lease_duration_s
        self.renew_interval_s = renew_interval_s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._held: list[TaskLease] = []
        self.stopping = False  # told to stop: finish or release, claim nothing new

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> PoolRunner:
        delay = 0.5
        while True:  # the API server may be away a while (restarting, or this pod is early)
            try:
                self._write_lease(create=True)
                break
            except Exception as error:
                if not _transient(error):
                    raise
                logger.warning("runner lease not created yet: %s", error)
                time.sleep(delay)
                delay = min(delay * 2, self.renew_interval_s)
        self._renewer = threading.Thread(
            target=self._renew_loop, daemon=True, name=f"tasklease-runner-lease-{self.pod_name}"
        )
        self._renewer.start()
        return self

    def stop(self, *, release: bool = True) -> None:
        """Stop claiming; give back unfinished tasks; delete the runner Lease."""
        self.stopping = True
        if release:
            for task in list(self._held):
                self.release(task)
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        from kubernetes.client.exceptions import ApiException

        try:
            self._coordination.delete_namespaced_lease(self.pod_name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                logger.warning("could not delete runner lease %s: %s", self.pod_name, error)
        except Exception as error:  # the API server away: the Lease expires by itself
            logger.warning("could not delete runner lease %s: %s", self.pod_name, error)

    def __enter__(self) -> PoolRunner:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- PollForTask ----------------------------------------------------------------------

    def poll_for_task(self, *, timeout_s: float = 90.0) -> TaskLease | None:
        """Claim the next Task of this worker group, waiting up to `timeout_s` for one.

        Returns an un-started task handle (use it as a context manager to acknowledge and
        heartbeat), or None when the wait ended without a task or the runner is stopping.
        """
        from kubernetes import watch

        deadline = time.monotonic() + timeout_s
        selector = f"{WORKER_GROUP_LABEL}={self.worker_group},{CLAIMABLE_LABEL}=true"
        delay = 0.5
        while not self.stopping and time.monotonic() < deadline:
            try:
                listed = self._custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, label_selector=selector
                )
            except Exception as error:
                if not _transient(error):
                    raise
                # The API server away (restarting): poll again, as AWS's PollForTask
                # clients do after a failed call.
                logger.warning("cannot list claimable tasks yet: %s", error)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            for task in sorted(listed.get("items", []), key=claim_order):
                claimed = self._claim(task)
                if claimed is not None:
                    return claimed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Wait for a new claimable task instead of polling: a watch from the list's
            # resourceVersion sees exactly what changed since.
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self._custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    label_selector=selector,
                    resource_version=listed["metadata"]["resourceVersion"],
                    # Short watches, so a stopping runner notices within seconds.
                    timeout_seconds=max(1, int(min(remaining, 5))),
                ):
                    if self.stopping:
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        claimed = self._claim(event["object"])
                        if claimed is not None:
                            return claimed
            except Exception as error:
                if not _transient(error):
                    raise
                logger.warning("watching claimable tasks failed: %s; listing again", error)
            finally:
                stream.stop()
        return None

    def release(self, task: TaskLease) -> bool:
        """Give `task` back to the pool; False when it was no longer ours."""
        from kubernetes.client.exceptions import ApiException

        task.close()
        if task in self._held:
            self._held.remove(task)
        identity = task.identity
        try:
            self._custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                identity.namespace,
                PLURAL,
                identity.task,
                release_patch(epoch=identity.epoch, holder=identity.pod_name),
                _content_type=JSON_PATCH,
            )
        except ApiException as error:
            if error.status in (404, 409, 422):
                return False
            raise
        logger.info("released task %s (epoch %d)", identity.task, identity.epoch)
        return True

    def _claim(self, task: dict[str, Any]) -> TaskLease | None:
        from kubernetes.client.exceptions import ApiException

        metadata = task["metadata"]
        annotations = metadata.get("annotations") or {}
        epoch_text = annotations.get(EPOCH_ANNOTATION, "")
        if not epoch_text.isdigit() or (task.get("status") or {}).get("phase") not in (
            None,
            "Pending",
        ):
            return None
        epoch = int(epoch_text)
        try:
            claimed = self._custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                metadata["namespace"],
                PLURAL,
                metadata["name"],
                claim_patch(
                    epoch=epoch, holder=self.pod_name, acquire_time=rfc3339_micro(datetime.now(UTC))
                ),
                _content_type=JSON_PATCH,
            )
        except ApiException as error:
            if error.status in (404, 409, 422):
                return None  # another runner won, or the task moved on
            if _transient(error):
                # Not claimed; the next poll tries again. A refusal may pass (an API server
                # restarting), but say it: a policy refusing every claim is a misconfiguration.
                logger.warning("claim of task %s refused: %s", metadata["name"], _reason(error))
                return None
            raise
        except Exception as error:
            if _transient(error):
                return None
            raise
        status = claimed.get("status") or {}
        progress = status.get("progress") or {}
        identity = Identity(
            task=metadata["name"],
            namespace=metadata["namespace"],
            epoch=epoch + 1,
            pod_name=self.pod_name,
            attempt=int(status.get("attempt") or 0) + 1,
            parameters=dict((claimed.get("spec") or {}).get("parameters") or {}),
            checkpoint=progress.get("checkpoint"),
        )
        logger.info("claimed task %s (epoch %d)", identity.task, identity.epoch)
        handle = _HeldTask(identity, api_client=self._api_client, pool=self)
        self._held.append(handle)
        return handle

    # --- ReportTaskRunnerHeartbeat --------------------------------------------------------

    def _lease_body(self) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.pod_name,
                "namespace": self.namespace,
                "labels": {ROLE_LABEL: POOL_RUNNER_ROLE, WORKER_GROUP_LABEL: self.worker_group},
            },
            "spec": {
                "holderIdentity": self.pod_name,
                "leaseDurationSeconds": self.lease_duration_s,
                "renewTime": rfc3339_micro(datetime.now(UTC)),
            },
        }

    def _write_lease(self, *, create: bool) -> None:
        from kubernetes.client.exceptions import ApiException

        body = self._lease_body()
        if create:
            try:
                self._coordination.create_namespaced_lease(self.namespace, body)
                return
            except ApiException as error:
                if error.status != 409:
                    raise
        self._coordination.patch_namespaced_lease(
            self.pod_name, self.namespace, {"spec": body["spec"]}
        )

    def _renew_loop(self) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self._stop.wait(self.renew_interval_s):
            try:
                self._write_lease(create=False)
            except ApiException as error:
                if error.status == 404:
                    # Someone deleted our Lease: the way to tell a runner to stop.
                    logger.warning("runner lease %s was deleted: stopping", self.pod_name)
                    self.stopping = True
                    return
                logger.warning("runner lease not renewed: %s", error)
            except Exception as error:  # network trouble: try again next tick
                logger.warning("runner lease not renewed: %s", error)


class _HeldTask(TaskLease):
    """A claimed task: forgets itself in its pool runner when it ends."""

    def __init__(self, identity: Identity, *, api_client: Any, pool: PoolRunner) -> None:
        super().__init__(identity, api_client=api_client)
        self._pool = pool

    def close(self) -> None:
        super().close()
        if self in self._pool._held and (self.lost or self._result_sent):
            self._pool._held.remove(self)


def _reason(error: Any) -> str:
    try:
        return str(json.loads(error.body).get("message"))
    except Exception:
        return str(getattr(error, "reason", error))


def _transient(error: BaseException) -> bool:
    """A failure to retry: no answer at all, or one that says the API server is not itself
    (5xx, 429) or not ready to say who we are (401/403 right after a restart)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        return error.status in (401, 403, 429) or error.status >= 500
    return isinstance(error, OSError) or "urllib3" in type(error).__module__


def _own_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.path.exists(path):
        with open(path) as file:
            return file.read().strip()
    namespace = os.environ.get(ENV_NAMESPACE) or os.environ.get("POD_NAMESPACE")
    if not namespace:
        raise RuntimeError(f"cannot tell this runner's namespace: set {ENV_NAMESPACE}")
    return namespace


__all__ = ["PoolRunner", "claim_order", "claim_patch", "release_patch"]
