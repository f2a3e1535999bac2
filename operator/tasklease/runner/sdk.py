"""The runner SDK: what a runner pod's Python code uses to hold a Task's lease.

    from tasklease.runner import lease

    with lease() as task:                      # acknowledges, then heartbeats in background
        start = (task.checkpoint or {}).get("row", 0)
        for row in range(start, 1000):
            if task.canceled:                   # cancelled, or the lease went to another pod
                break
            work(row)
            task.progress(percent=row / 10, checkpoint={"row": row})
    # leaving the block: FINISHED; an exception escaping it: FAILED with its stack trace

Every write is fenced: a JSON Patch that first `test`s the Task's epoch and holder
annotations, so the API server itself refuses the write of a runner whose lease was handed
to someone else (design invariant 2). A refused write sets `canceled`: the AWS
ReportTaskProgress answer `{"canceled": true}`.

Thread-safe: the heartbeat thread and the caller's threads share one lock around the
state and the sends, so reports reach the API server in the order they were made.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from tasklease.api.durations import parse_go_duration
from tasklease.api.models import (
    EPOCH_ANNOTATION,
    GROUP,
    HOLDER_ANNOTATION,
    PLURAL,
    VERSION,
    ResultStatus,
)
from tasklease.lease.pods import (
    ENV_ATTEMPT,
    ENV_CHECKPOINT,
    ENV_EPOCH,
    ENV_NAMESPACE,
    ENV_PARAMETERS,
    ENV_POD_NAME,
    ENV_TASK,
)

logger = logging.getLogger(__name__)

_UNSET: Any = object()


def _json_pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class LeaseLost(Exception):
    """The API server refused a fenced write: this runner no longer holds the lease."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this runner is, as the operator told it through the environment."""

    task: str
    namespace: str
    epoch: int
    pod_name: str
    attempt: int = 1
    parameters: dict[str, str] = field(default_factory=dict)
    checkpoint: Any = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Identity:
        missing = [
            n for n in (ENV_TASK, ENV_NAMESPACE, ENV_EPOCH, ENV_POD_NAME) if not environ.get(n)
        ]
        if missing:
            raise RuntimeError(
                f"not running as a tasklease runner: {', '.join(missing)} not set "
                "(the operator sets them in runner pods)"
            )
        return cls(
            task=environ[ENV_TASK],
            namespace=environ[ENV_NAMESPACE],
            epoch=int(environ[ENV_EPOCH]),
            pod_name=environ[ENV_POD_NAME],
            attempt=int(environ.get(ENV_ATTEMPT, "1")),
            parameters=json.loads(environ.get(ENV_PARAMETERS) or "{}"),
            checkpoint=json.loads(environ[ENV_CHECKPOINT]) if environ.get(ENV_CHECKPOINT) else None,
        )


def default_api_client() -> Any:
    """A `kubernetes` ApiClient from the pod's service account, else from KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class TaskLease:
    """A held lease on one Task. Use as a context manager, or call start()/close()."""

    def __init__(
        self,
        identity: Identity,
        *,
        api_client: Any = None,
        heartbeat_interval_s: float | None = None,
    ) -> None:
        from kubernetes import client

        self.identity = identity
        self._api = client.CustomObjectsApi(api_client or default_api_client())
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: dict[str, Any] = {"epoch": identity.epoch}
        self._canceled = False
        self._lost = False
        self._result_sent = False
        self.cancel_reason: str | None = None
        self.last_report_error: str | None = None
        self.release_requested = False

    # --- what the runner reads ------------------------------------------------------------

    @property
    def parameters(self) -> dict[str, str]:
        return self.identity.parameters

    @property
    def checkpoint(self) -> Any:
        """The last checkpoint of the previous attempt (None on the first attempt)."""
        return self.identity.checkpoint

    @property
    def epoch(self) -> int:
        return self.identity.epoch

    @property
    def canceled(self) -> bool:
        """True once the task was cancelled or the lease was lost: stop working."""
        return self._canceled

    def request_release(self, reason: str) -> None:
        """Ask the work to stop so the task can be given back (pool runners).

        Safe from a signal handler: it only sets flags; `canceled` becomes true, and the
        pool runner releases the task once the work has stopped.
        """
        self.release_requested = True
        self._canceled = True
        self.cancel_reason = reason

    @property
    def lost(self) -> bool:
        """True once a fenced write was refused: another runner holds the task now."""
        return self._lost

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> TaskLease:
        """Read the Task, acknowledge it with a first report, start heartbeating."""
        task = self._get_task()
        spec = task.get("spec") or {}
        if self._heartbeat_interval_s is None:
            self._heartbeat_interval_s = parse_go_duration(
                spec.get("heartbeatInterval", "60s")
            ).total_seconds()
        self._note_cancel(task)
        self.report()
        self._thread = threading.Thread(
            target=self._heartbeat_loop,
            name=f"tasklease-heartbeat-{self.identity.task}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> TaskLease:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._result_sent or self._lost:
                return
            if exc is None:
                self.succeed()
            elif isinstance(exc, Exception):
                self.fail(
                    type(exc).__name__,
                    str(exc) or type(exc).__name__,
                    stack_trace="".join(traceback.format_exception(exc_type, exc, tb)),
                )
        except LeaseLost:
            logger.warning("lease lost before the result could be written")
        finally:
            self.close()

    # --- reports --------------------------------------------------------------------------

    def progress(
        self,
        *,
        percent: float | None = None,
        message: str | None = None,
        fields: Mapping[str, str] | None = None,
        checkpoint: Any = _UNSET,
    ) -> bool:
        """Record progress and report it at once. Returns False when it was refused."""
        with self._lock:
            if percent is not None:
                self._progress["percent"] = max(0.0, min(100.0, float(percent)))
            if message is not None:
                self._progress["message"] = message[:1024]
            if fields is not None:
                self._progress["fields"] = {str(k): str(v) for k, v in fields.items()}
            if checkpoint is not _UNSET:
                self._progress["checkpoint"] = checkpoint
        return self.report()

    def report(self) -> bool:
        """Send the current progress as a heartbeat. False when refused or not delivered."""
        with self._lock:
            if self._lost or self._result_sent:
                return False
            body = dict(self._progress, reportTime=_now())
            try:
                task = self._fenced_patch(
                    [{"op": "add", "path": "/status/progress", "value": body}]
                )
            except LeaseLost:
                return False
            except Exception as error:  # network trouble: the next heartbeat tries again
                self.last_report_error = str(error)
                logger.warning("progress report not delivered: %s", error)
                return False
            self.last_report_error = None
            self._note_cancel(task)
            return True

    def succeed(self) -> None:
        self._set_result(ResultStatus.FINISHED)

    def skip(self, message: str | None = None) -> None:
        """Report FALSE (AWS: a precondition was not met); the task becomes Skipped."""
        self._set_result(ResultStatus.FALSE, error_message=message)

    def fail(self, error_id: str, message: str, *, stack_trace: str | None = None) -> None:
        """Report FAILED; the operator retries unless error_id is non-retryable."""
        self._set_result(
            ResultStatus.FAILED,
            error_id=error_id[:256],
            error_message=message[-4096:],
            error_stack_trace=stack_trace[-32768:] if stack_trace else None,
        )

    def _set_result(self, status: ResultStatus, **details: str | None) -> None:
        result: dict[str, Any] = {
            "epoch": self.identity.epoch,
            "status": status.value,
            "reportTime": _now(),
        }
        result.update({_camel(k): v for k, v in details.items() if v is not None})
        with self._lock:
            if self._result_sent:
                raise RuntimeError("the result was already reported")
            # Retry transient errors: a result lost to a network blip would cost a whole
            # progress timeout and an attempt.
            for delay in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
                time.sleep(delay)
                try:
                    self._fenced_patch([{"op": "add", "path": "/status/result", "value": result}])
                except LeaseLost:
                    raise
                except Exception as error:
                    if getattr(error, "status", None) == 400:
                        raise  # our request is malformed: retrying cannot help
                    logger.warning("result not delivered yet: %s", error)
                    continue
                self._result_sent = True
                break
            else:
                raise RuntimeError("could not deliver the result to the API server")
        self._stop.set()

    # --- plumbing -------------------------------------------------------------------------

    def _fenced_patch(self, operations: list[dict[str, Any]]) -> dict[str, Any]:
        identity = self.identity
        fence = [
            {
                "op": "test",
                "path": f"/metadata/annotations/{_json_pointer(EPOCH_ANNOTATION)}",
                "value": str(identity.epoch),
            },
            {
                "op": "test",
                "path": f"/metadata/annotations/{_json_pointer(HOLDER_ANNOTATION)}",
                "value": identity.pod_name,
            },
        ]
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                identity.namespace,
                PLURAL,
                identity.task,
                fence + operations,
                field_manager="tasklease-runner",
                _preload_content=False,
                _content_type="application/json-patch+json",
            )
        except ApiException as exc:
            # 422: a `test` failed (epoch or holder changed); 403: an admission policy or
            # RBAC refused this pod; 404: the Task is gone. All mean: stop working.
            if exc.status in (403, 404, 409, 422):
                self._mark_lost(f"fenced write refused ({exc.status}): {_reason(exc)}")
                raise LeaseLost(self.cancel_reason) from exc
            raise
        task: dict[str, Any] = json.loads(response.data)
        return task

    def _get_task(self) -> dict[str, Any]:
        identity = self.identity
        response = self._api.get_namespaced_custom_object(
            GROUP, VERSION, identity.namespace, PLURAL, identity.task, _preload_content=False
        )
        task: dict[str, Any] = json.loads(response.data)
        return task

    def _note_cancel(self, task: dict[str, Any]) -> None:
        if (task.get("spec") or {}).get("cancel") and not self._canceled:
            self._canceled = True
            self.cancel_reason = "the task was canceled (spec.cancel)"
            logger.warning("task %s canceled", self.identity.task)

    def _mark_lost(self, reason: str) -> None:
        self._lost = True
        self._canceled = True
        self.cancel_reason = reason
        self._stop.set()
        logger.warning("lease on task %s lost: %s", self.identity.task, reason)

    def _heartbeat_loop(self) -> None:
        interval = self._heartbeat_interval_s or 60.0
        while not self._stop.wait(interval):
            self.report()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _reason(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message"))
    except Exception:
        return str(exc.reason)


def lease(
    *,
    identity: Identity | None = None,
    api_client: Any = None,
    heartbeat_interval_s: float | None = None,
) -> TaskLease:
    """The lease this pod was given, from the environment the operator set."""
    return TaskLease(
        identity or Identity.from_env(),
        api_client=api_client,
        heartbeat_interval_s=heartbeat_interval_s,
    )
