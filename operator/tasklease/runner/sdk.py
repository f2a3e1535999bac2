"""The runner SDK: what a runner pod's Python code uses to hold a Task's lease.

    from tasklease.runner import lease

    with lease() as task:                      # acknowledges, then heartbeats in background
        start = (task.checkpoint or {}).get("row", 0)
        for row in range(start, 1000):
            if task.canceled:                   # cancelled, or the lease went to another pod
                break
            work(row)
            task.progress(percent=row / 10, checkpoint={"row": row})
    # leaving the block: FINISHED; an exception escaping it: FAILED with its stack trace,
    # and the next attempt gets the last checkpoint (task.fail(..., checkpoint=...) sets one
    # in the same write as the failure)

Every write is fenced: a JSON Patch that first `test`s the Task's epoch and holder
annotations, so the API server itself refuses the write of a runner whose lease was handed
to someone else (design invariant 2). Only a proven loss ends the lease (invariant 4): a
write whose `test` failed, or a refusal after which the Task reads back with another epoch
or holder, or deleted. Anything else (a 403 while the API server's RBAC is still loading, a
5xx, a timeout, a connection refused) is retried at the next heartbeat. A lost lease sets
`canceled`: the AWS ReportTaskProgress answer `{"canceled": true}`.

Every request times out well within the heartbeat interval, so a runner cut off from the API
server finds out; and one that has not delivered a report for `spec.reportProgressTimeout`
(before its first one, `spec.ackTimeout`) gives the lease up by itself (`canceled`, `lost`),
since by then the operator may have handed the task to another runner. That is about when
the operator would, so an old and a new attempt hardly overlap. Time in which the API server
itself said it was down (a refused connection, a 5xx or 429 answer) does not count, nor
does the time it then takes to come back whole (up to a bound): the operator cannot see
either then, and does not count it against the lease. A request that times out does count:
that is what a partition of this runner alone looks like (`runner/silence.py`).

Thread-safe: the heartbeat thread and the caller's threads share one lock around the
state and the sends, so reports reach the API server in the order they were made.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
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
from tasklease.api.runner_env import (
    ENV_ATTEMPT,
    ENV_CHECKPOINT,
    ENV_EPOCH,
    ENV_NAMESPACE,
    ENV_PARAMETERS,
    ENV_POD_NAME,
    ENV_TASK,
)
from tasklease.api.times import ServerClock, rfc3339_micro
from tasklease.runner.silence import Silence

logger = logging.getLogger(__name__)

_UNSET: Any = object()
# Requests time out within the heartbeat interval (at most this long; the first read, before
# the interval is known, takes the maximum).
REQUEST_TIMEOUT_MAX_S = 10.0
REQUEST_TIMEOUT_MIN_S = 1.0
# How long after an outage the API server's recovery (403 while its authorizer loads, 404
# while it does not serve the Task API yet, timeouts while it is slow) is excused, at most:
# the report window, but no more than this.
RECOVERY_MAX_S = 60.0
# What the API server answers when a JSON Patch cannot be applied, a failed `test` included.
_PATCH_NOT_APPLIED = "the server rejected our request due to an error in our request"


def json_pointer(key: str) -> str:
    """A key as one JSON Pointer step (RFC 6901: `~` and `/` escaped)."""
    return key.replace("~", "~0").replace("/", "~1")


def _utc_now() -> datetime:
    return datetime.now(UTC)


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
        wall: Callable[[], datetime] = _utc_now,
    ) -> None:
        from kubernetes import client

        self.identity = identity
        # reportTime is written on the API server's clock, as this runner reads it from the
        # Date of the answers it gets: `kubectl get tasks` shows its age (LAST REPORT) against
        # the API server's timestamps, and a node's clock that is off does not show.
        self._server_clock = ServerClock(wall)
        self._api = client.CustomObjectsApi(api_client or default_api_client())
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: dict[str, Any] = {"epoch": identity.epoch}
        if identity.checkpoint is not None:
            # Until this attempt sets a checkpoint of its own, it stands where the previous
            # one left off: its reports (the acknowledgement first) keep that checkpoint in
            # status.progress, so an attempt that fails before setting one hands it on.
            self._progress["checkpoint"] = identity.checkpoint
        self._canceled = False
        self._lost = False
        self._result_sent = False
        self._request_timeout_s = REQUEST_TIMEOUT_MAX_S
        self._ack_timeout_s = 120.0
        self._progress_timeout_s = 900.0
        self._delivered = False  # a write reached the API server
        self._silence = Silence(time.monotonic())
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
        """Read the Task, acknowledge it with a first report, start heartbeating.

        The read is retried while it fails for reasons that may pass, until the ack
        window is over (then the lease is given up: `canceled`)."""
        self._silence = Silence(time.monotonic())
        task = self._read_at_start()
        if task is None:
            return self
        spec = task.get("spec") or {}
        if self._heartbeat_interval_s is None:
            self._heartbeat_interval_s = parse_go_duration(
                spec.get("heartbeatInterval", "60s")
            ).total_seconds()
        self._ack_timeout_s = parse_go_duration(spec.get("ackTimeout", "2m")).total_seconds()
        self._progress_timeout_s = parse_go_duration(
            spec.get("reportProgressTimeout", "15m")
        ).total_seconds()
        self._request_timeout_s = min(
            REQUEST_TIMEOUT_MAX_S,
            max(REQUEST_TIMEOUT_MIN_S, 0.8 * self._heartbeat_interval_s),
        )
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
        """Record progress and report it at once. Returns False when it was refused or not
        delivered; what was recorded goes out with the next heartbeat, and with fail().

        `checkpoint` (any JSON value) is what the next attempt resumes from
        (`TASKLEASE_CHECKPOINT`, the `checkpoint` property) if this one does not finish."""
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
            body = dict(self._progress, reportTime=self._report_time())
            try:
                task = self._fenced_patch(
                    [{"op": "add", "path": "/status/progress", "value": body}]
                )
            except LeaseLost:
                return False
            except Exception as error:  # not a proven loss: the next heartbeat tries again
                self.last_report_error = str(error)
                logger.warning("progress report not delivered: %s", error)
                self._failed(error)
                self._give_up_if_silent_too_long()
                return False
            self.last_report_error = None
            self._note_cancel(task)
            return True

    def succeed(self) -> None:
        self._set_result(ResultStatus.FINISHED)

    def skip(self, message: str | None = None) -> None:
        """Report FALSE (AWS: a precondition was not met); the task becomes Skipped."""
        self._set_result(ResultStatus.FALSE, error_message=message)

    def fail(
        self,
        error_id: str,
        message: str,
        *,
        stack_trace: str | None = None,
        checkpoint: Any = _UNSET,
    ) -> None:
        """Report FAILED; the operator retries unless error_id is non-retryable.

        The next attempt resumes from `checkpoint` (any JSON value; None: from scratch) or,
        without it, from the newest checkpoint set through `progress()`, delivered or not
        (a report refused by a passing error is only re-sent at the next heartbeat), else
        from the one this attempt was handed. The progress with that checkpoint and the
        result go in one fenced write: the Task never shows the failure without the
        checkpoint, so the operator cannot hand the task on without it.
        """
        self._set_result(
            ResultStatus.FAILED,
            progress={} if checkpoint is _UNSET else {"checkpoint": checkpoint},
            error_id=error_id[:256],
            error_message=message[-4096:],
            error_stack_trace=stack_trace[-32768:] if stack_trace else None,
        )

    def _set_result(
        self,
        status: ResultStatus,
        *,
        progress: Mapping[str, Any] | None = None,
        **details: str | None,
    ) -> None:
        """Write the result; with `progress` (changes to the current progress), the
        progress too, in the same fenced write."""
        report_time = self._report_time()
        result: dict[str, Any] = {
            "epoch": self.identity.epoch,
            "status": status.value,
            "reportTime": report_time,
        }
        result.update({_camel(k): v for k, v in details.items() if v is not None})
        with self._lock:
            if self._result_sent:
                raise RuntimeError("the result was already reported")
            if self._lost:
                raise LeaseLost(self.cancel_reason)
            operations: list[dict[str, Any]] = []
            if progress is not None:
                self._progress.update(progress)
                operations.append(
                    {
                        "op": "add",
                        "path": "/status/progress",
                        "value": dict(self._progress, reportTime=report_time),
                    }
                )
            operations.append({"op": "add", "path": "/status/result", "value": result})
            # Retried while the failure is not a proven loss: a result lost to a network
            # blip would cost a whole progress timeout and an attempt. Retrying ends when
            # the runner has been silent for as long as the operator waits for a report.
            delay = 0.5
            while True:
                try:
                    self._fenced_patch(operations)
                except LeaseLost:
                    raise
                except Exception as error:
                    if getattr(error, "status", None) == 400:
                        raise  # our request is malformed: retrying cannot help
                    logger.warning("result not delivered yet: %s", error)
                    self._failed(error)
                    if self._give_up_if_silent_too_long():
                        raise LeaseLost(self.cancel_reason) from error
                    time.sleep(delay)
                    delay = min(delay * 2, self._heartbeat_interval_s or 60.0)
                    continue
                self._result_sent = True
                break
        self._stop.set()

    # --- plumbing -------------------------------------------------------------------------

    def _fenced_patch(self, operations: list[dict[str, Any]]) -> dict[str, Any]:
        identity = self.identity
        fence = [
            {
                "op": "test",
                "path": f"/metadata/annotations/{json_pointer(EPOCH_ANNOTATION)}",
                "value": str(identity.epoch),
            },
            {
                "op": "test",
                "path": f"/metadata/annotations/{json_pointer(HOLDER_ANNOTATION)}",
                "value": identity.pod_name,
            },
        ]
        from kubernetes.client.exceptions import ApiException

        sent_at = time.monotonic()
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
                _request_timeout=self._request_timeout_s,
            )
        except ApiException as exc:
            if exc.status == 422 and _patch_not_applied(exc):
                reason = "a fenced write's test failed: the task's epoch or holder changed"
            else:
                # Refused for another reason (an admission policy, RBAC, a Task that is
                # gone, or the API server still starting): lost only if the Task says so.
                moved = self._lease_moved()
                if moved is None:
                    raise
                reason = f"fenced write refused ({exc.status}: {_reason(exc)}); {moved}"
            self._mark_lost(reason)
            raise LeaseLost(self.cancel_reason) from exc
        task: dict[str, Any] = json.loads(response.data)
        self._delivered = True
        self._silence.delivered(sent_at)
        self._read_server_clock(response)
        return task

    def _get_task(self) -> dict[str, Any]:
        identity = self.identity
        response = self._api.get_namespaced_custom_object(
            GROUP,
            VERSION,
            identity.namespace,
            PLURAL,
            identity.task,
            _preload_content=False,
            _request_timeout=self._request_timeout_s,
        )
        task: dict[str, Any] = json.loads(response.data)
        self._read_server_clock(response)
        return task

    def _read_server_clock(self, response: Any) -> None:
        self._server_clock.observe(getattr(response, "headers", None))

    def _report_time(self) -> str:
        return rfc3339_micro(self._server_clock.now())

    def _read_at_start(self) -> dict[str, Any] | None:
        """The Task, read with retries until the ack window ends; None when given up."""
        delay = 0.5
        while True:
            try:
                return self._get_task()
            except Exception as error:
                if _task_deleted(error, self.identity.task):
                    self._mark_lost("the task was deleted")
                    return None
                logger.warning("cannot read task %s yet: %s", self.identity.task, error)
                self._failed(error)
                if self._give_up_if_silent_too_long():
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _lease_moved(self) -> str | None:
        """Why the lease is no longer ours, read from the Task; None when that cannot be
        told (the read failed too) or the lease is still ours."""
        try:
            task = self._get_task()
        except Exception as error:
            return "the task was deleted" if _task_deleted(error, self.identity.task) else None
        annotations = (task.get("metadata") or {}).get("annotations") or {}
        epoch, holder = annotations.get(EPOCH_ANNOTATION), annotations.get(HOLDER_ANNOTATION)
        if epoch == str(self.identity.epoch) and holder == self.identity.pod_name:
            return None
        return f"the task's lease is now epoch {epoch} held by {holder or 'nobody'}"

    def _window(self) -> tuple[str, float]:
        """The report window that silence is measured against, and its field."""
        if self._delivered:
            return "spec.reportProgressTimeout", self._progress_timeout_s
        return "spec.ackTimeout", self._ack_timeout_s

    def _give_up_if_silent_too_long(self) -> bool:
        """Self-fencing: after a whole report window with no report delivered, the operator
        may have handed the task on; stop, as a leader that cannot renew steps down."""
        if self._lost:
            return True
        name, window = self._window()
        if self._silence.silent_s(time.monotonic()) < window:
            return False
        self._mark_lost(
            f"no report reached the API server for {name} ({window:g}s): the task may have "
            f"been handed to another runner"
        )
        return True

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

    def _failed(self, error: BaseException) -> None:
        """Account for a request that failed without proving anything about the lease."""
        self._silence.failed(
            time.monotonic(),
            server_down=_server_down(error),
            recovery_s=min(self._window()[1], RECOVERY_MAX_S),
        )

    def _heartbeat_loop(self) -> None:
        interval = self._heartbeat_interval_s or 60.0
        while not self._stop.wait(interval):
            self.report()
            self._give_up_if_silent_too_long()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _status_body(exc: Any) -> dict[str, Any]:
    try:
        body = json.loads(exc.body)
    except Exception:
        return {}
    return body if isinstance(body, dict) else {}


def _patch_not_applied(exc: Any) -> bool:
    """The API server could not apply the JSON Patch: with ours, only a failed `test` (a
    refusal of the body's content names the field; this answer names nothing)."""
    body = _status_body(exc)
    return body.get("message") == _PATCH_NOT_APPLIED and not (body.get("details") or {})


_DOWN_ERRORS = (
    ConnectionRefusedError,
    ConnectionResetError,
    ConnectionAbortedError,
    http.client.RemoteDisconnected,
)


def _server_down(error: BaseException) -> bool:
    """The API server said it is down or failing: it answered 5xx or 429, or nothing listens
    where it should (a refused or dropped connection; urllib3 wraps those, so follow the
    chain). A timeout is not such a word: it is what a partition looks like."""
    status = getattr(error, "status", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, _DOWN_ERRORS):
            return True
        reason = getattr(cause, "reason", None)
        cause = (
            reason if isinstance(reason, BaseException) else cause.__cause__ or cause.__context__
        )
    return False


def _task_deleted(error: BaseException, task: str) -> bool:
    """A 404 that names this Task (not one for an API the server has not loaded yet)."""
    if getattr(error, "status", None) != 404:
        return False
    details = _status_body(error).get("details") or {}
    return bool(details.get("name") == task and details.get("kind") == PLURAL)


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
