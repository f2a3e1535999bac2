"""`LocalExecutor`: a kubelet for one node whose pods are local processes.

Threads, each with an API client of its own:

- the *worker* owns every pod's process and all per-pod state. It alone starts processes (so
  `PR_SET_PDEATHSIG` ties them to a thread that lives as long as the executor), and it
  handles, one at a time from a queue, what the others report: pods on the node seen or
  gone, processes exited, stop. Timers (SIGKILL after a grace period, token refresh) fire
  between messages;
- a watch of pods bound to the node (`spec.nodeName=<node>`), feeding the worker;
- a watch of unbound pods (`spec.nodeName=`), which binds the ones it should take (those
  labelled `tasklease.io/task`, or all with `all_pods`) through `pods/binding`: the
  project runs no scheduler;
- the node agent, renewing the Node's Lease (see `node.py`);
- one waiter per running process, blocked in `wait()`, reporting the exit.

A pod's life here: bound -> (token, kubeconfig, environment) -> process started, status
Running -> process exits -> status Succeeded/Failed. A pod that gets a deletionTimestamp has
its process group sent SIGTERM, then SIGKILL after the grace period; once the process is
gone and the final status written, the executor deletes the pod with grace period 0, which
is how a kubelet completes a graceful deletion. Restart policies are not honoured: every pod
runs once, as with `restartPolicy: Never` (what runner pods use).

If the executor stops, it stops every process (SIGTERM, a short grace, SIGKILL) and marks
their pods Failed (reason Terminated, as a kubelet's node shutdown does). If it dies without
stopping, its processes die with it (see `processes.py`); a pod still Running in the API
when an executor next starts on this node is marked Failed (ContainerStatusUnknown).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

from kubernetes import config
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import TASK_LABEL
from tasklease.executor.credentials import (
    Endpoint,
    Token,
    parse_token,
    refresh_delay_s,
    token_request,
    write_credentials,
)
from tasklease.executor.env import (
    EnvError,
    Sources,
    command_line,
    container_env,
    inherited_env,
    process_env,
)
from tasklease.executor.node import NodeAgent
from tasklease.executor.processes import MARKER_ENV, kill_marked, signal_group, spawn
from tasklease.executor.status import (
    CONFIG_ERROR,
    START_ERROR,
    TERMINAL_PHASES,
    Exit,
    now,
    running_status,
    should_bind,
    start_failure_status,
    terminated_status,
)
from tasklease.executor.watch import PodWatch

logger = logging.getLogger(__name__)

DEFAULT_NODE_NAME: Final = "tasklease-local"
FIELD_MANAGER: Final = "tasklease-local-executor"
DEFAULT_GRACE_S: Final = 30  # a pod's terminationGracePeriodSeconds when it has none
FORCE_DELETED_GRACE_S: Final = 2.0  # the kubelet's minimum, for pods removed from the API
TOKEN_EXPIRATION_S: Final = 3600
_REQUEST_TIMEOUT: Final = (10.0, 30.0)
_STATUS_ATTEMPTS: Final = 3
_STATUS_RETRY_S: Final = 2.0
_START_RETRY_S: Final = 1.0
_LOCK_FILE: Final = ".executor.lock"


class ExecutorError(RuntimeError):
    """The executor could not start (state dir in use, API server unreachable, ...)."""


class _NotYet(Exception):
    """A pod cannot start now for a reason that passes (the API server is away)."""


class _StartFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --- messages to the worker --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Seen:
    pod: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Gone:
    pod: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Synced:
    uids: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Exited:
    uid: str
    returncode: int
    at: datetime


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Message = _Seen | _Gone | _Synced | _Exited | _Stop


@dataclass
class _Run:
    """What the worker knows of one pod (by uid) on its node."""

    namespace: str
    name: str
    uid: str
    pod: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    started_at: datetime | None = None
    finished: bool = False  # the process ended, or never started; final status written
    deleting: bool = False  # the pod has a deletionTimestamp
    removed: bool = False  # we asked the API server to remove it
    terminating: bool = False  # SIGTERM sent
    kill_at: float | None = None  # monotonic time for SIGKILL
    refresh_at: float | None = None  # monotonic time to replace the token
    credentials: Path | None = None
    stop_message: str | None = None  # set when the executor's stop ended the process
    wrote_status: bool = False
    # A status the API server did not take (it was down): written again at `status_at`.
    unwritten_status: dict[str, Any] | None = None
    status_at: float | None = None
    # The API server was away when the process was to start (no token): start it then.
    start_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.finished

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def container_id(self) -> str | None:
        return f"local://{self.process.pid}" if self.process is not None else None


def _api_message(error: ApiException) -> str:
    body = error.body
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    try:
        return str(json.loads(body).get("message") or error.reason)
    except (TypeError, ValueError, AttributeError):
        return f"{error.status} {error.reason}"


def _grace_s(pod: Mapping[str, Any]) -> float:
    metadata = pod.get("metadata") or {}
    grace = metadata.get("deletionGracePeriodSeconds")
    if grace is None:
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
    return float(DEFAULT_GRACE_S if grace is None else grace)


_live: set[LocalExecutor] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        executors = list(_live)
    for executor in executors:
        executor.stop()


class LocalExecutor:
    """A stand-in kubelet running pods of one Node as local processes.

        with LocalExecutor(Path("kubeconfig"), Path("state")) as executor:
            ...  # pods labelled tasklease.io/task get bound to the node and run

    `start()` returns once the Node is registered and both watches have listed; `stop()`
    (idempotent, also at interpreter exit) ends every process and marks its pod Failed.
    Logs go to `<state_dir>/logs/<namespace>_<pod>.log`.
    """

    def __init__(
        self,
        kubeconfig: Path,
        state_dir: Path,
        node_name: str = DEFAULT_NODE_NAME,
        all_pods: bool = False,
        *,
        lease_renew_interval_s: float = 10.0,
        node_status_interval_s: float = 60.0,
        stop_grace_s: float = 3.0,
        token_expiration_s: int = TOKEN_EXPIRATION_S,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.node_name = node_name
        self.all_pods = all_pods
        self._lease_renew_s = lease_renew_interval_s
        self._node_status_s = node_status_interval_s
        self._stop_grace_s = stop_grace_s
        self._token_expiration_s = token_expiration_s
        self._cwd = Path.cwd()
        self._inherited = inherited_env(
            os.environ, interpreter_dir=str(Path(sys.executable).parent)
        )
        self._queue: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        # The newest body the node watch has seen of each pod (None: deleted), by uid.
        self._newest: dict[str, dict[str, Any] | None] = {}
        self._newest_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}  # by uid; the worker thread's alone
        self._pids: dict[tuple[str, str], int] = {}
        self._pids_lock = threading.Lock()
        self._clients: list[Any] = []
        self._watches: list[PodWatch] = []
        self._node: NodeAgent | None = None
        self._worker: threading.Thread | None = None
        self._lock_file: IO[str] | None = None
        self._endpoint: Endpoint | None = None
        self._core: Any = None  # the worker's CoreV1Api
        self._stopping = False  # the worker's: no new pods, leave when none runs
        self._stop_deadline = math.inf
        self._started = False
        self._stopped = False
        self._state_lock = threading.Lock()

    # --- public API -------------------------------------------------------------------

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_path(self, namespace: str, pod: str) -> Path:
        return self.logs_dir / f"{namespace}_{pod}.log"

    def logs(self, namespace: str, pod: str) -> str:
        """Everything the pod's process wrote to stdout and stderr so far ("" if none)."""
        try:
            return self.log_path(namespace, pod).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pid_of(self, namespace: str, pod: str) -> int | None:
        """The pid of the pod's running process (also its process group id), else None."""
        with self._pids_lock:
            return self._pids.get((namespace, pod))

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._stopped

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, *, timeout: float = 30.0) -> Self:
        """Register the Node and start watching; returns once both watches have listed."""
        with self._state_lock:
            if self._started:
                raise ExecutorError("an executor can be started once")
            self._started = True
        with _live_lock:
            _live.add(self)
        try:
            self._take_state_dir()
            self._start_threads(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "local executor running node %s (%s pods), state in %s",
            self.node_name,
            "all" if self.all_pods else f"{TASK_LABEL}-labelled",
            self.state_dir,
        )
        return self

    def stop(self) -> None:
        """Stop every pod's process (SIGTERM, `stop_grace_s`, SIGKILL), mark those pods
        Failed, mark the Node not Ready, stop the threads. Idempotent."""
        with self._state_lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        try:
            for watch in self._watches:
                watch.stop()
            if self._worker is not None and self._worker.is_alive():
                self._queue.put(_Stop())
                self._worker.join(self._stop_grace_s + 30)
                if self._worker.is_alive():
                    logger.error("the executor's worker did not stop in time")
            if self._node is not None:
                self._node.stop()
        finally:
            for api_client in self._clients:
                with contextlib.suppress(Exception):
                    api_client.close()
            if self._lock_file is not None:  # the state dir is ours (not another executor's)
                # Whatever a pod's process started and left outside its process group.
                leftovers = kill_marked(str(self.state_dir))
                if leftovers:
                    logger.warning(
                        "killed %d leftover pod processes: %s", len(leftovers), leftovers
                    )
                shutil.rmtree(self.state_dir / "pods", ignore_errors=True)
            self._release_state_dir()
            with _live_lock:
                _live.discard(self)

    # --- start-up ---------------------------------------------------------------------

    def _take_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        lock = (self.state_dir / _LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise ExecutorError(
                f"state dir {self.state_dir} is in use by another executor (pid {owner})"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock_file = lock
        # An executor that died here without stopping may have left its pods' children.
        leftovers = kill_marked(str(self.state_dir))
        if leftovers:
            logger.warning("killed %d processes left by a previous executor", len(leftovers))
        shutil.rmtree(self.state_dir / "pods", ignore_errors=True)

    def _release_state_dir(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _client(self) -> Any:
        try:
            api_client = config.new_client_from_config(config_file=str(self.kubeconfig))
        except Exception as error:
            raise ExecutorError(f"cannot load kubeconfig {self.kubeconfig}: {error}") from error
        self._clients.append(api_client)
        return api_client

    def _start_threads(self, *, timeout: float) -> None:
        worker_client = self._client()
        self._core = CoreV1Api(worker_client)
        self._endpoint = Endpoint.from_configuration(worker_client.configuration)
        self._node = NodeAgent(
            self._client(),
            name=self.node_name,
            state_dir=self.state_dir,
            lease_renew_interval_s=self._lease_renew_s,
            status_interval_s=self._node_status_s,
        )
        try:
            self._node.register()
        except Exception as error:
            self._node = None  # nothing to mark not Ready on stop
            raise ExecutorError(f"cannot register node {self.node_name}: {error}") from error

        self._worker = threading.Thread(
            target=self._work, name="tasklease-executor-worker", daemon=True
        )
        self._worker.start()

        binder = CoreV1Api(self._client())
        self._watches = [
            PodWatch(
                CoreV1Api(self._client()),
                name="node-pods",
                field_selector=f"spec.nodeName={self.node_name}",
                label_selector=None,
                on_sync=self._on_node_sync,
                on_event=self._on_node_event,
            ),
            PodWatch(
                CoreV1Api(self._client()),
                name="unbound-pods",
                field_selector="spec.nodeName=",
                label_selector=None if self.all_pods else TASK_LABEL,
                on_sync=lambda pods: self._bind_all(binder, pods),
                on_event=lambda kind, pod: self._on_unbound_event(binder, kind, pod),
            ),
        ]
        for watch in self._watches:
            watch.start()
        deadline = time.monotonic() + timeout
        for watch in self._watches:
            if not watch.synced.wait(max(0.0, deadline - time.monotonic())):
                raise ExecutorError(f"could not list pods within {timeout:.0f}s")
        self._node.start()

    # --- the watches' side ------------------------------------------------------------

    def _on_node_sync(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            self._note_newest(pod, gone=False)
            self._queue.put(_Seen(pod))
        self._queue.put(_Synced(frozenset(pod["metadata"]["uid"] for pod in pods)))

    def _on_node_event(self, kind: str, pod: dict[str, Any]) -> None:
        self._note_newest(pod, gone=kind == "DELETED")
        self._queue.put(_Gone(pod) if kind == "DELETED" else _Seen(pod))

    def _note_newest(self, pod: dict[str, Any], *, gone: bool) -> None:
        """What the watch saw last of a pod, for the worker to act on instead of an older
        message still in its queue (under load the queue holds a pod's `_Seen` for a while,
        and the pod may have been deleted since: a kubelet acts on its newest view too)."""
        with self._newest_lock:
            self._newest[pod["metadata"]["uid"]] = None if gone else pod

    def _newest_view(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The newest body of `pod` the watch has seen; None once it was deleted."""
        with self._newest_lock:
            return self._newest.get(pod["metadata"]["uid"], pod)

    def _bind_all(self, binder: Any, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            self._bind(binder, pod)

    def _on_unbound_event(self, binder: Any, kind: str, pod: dict[str, Any]) -> None:
        if kind != "DELETED":
            self._bind(binder, pod)

    def _bind(self, binder: Any, pod: dict[str, Any]) -> bool:
        assert self._node is not None
        selector = None if self.all_pods else TASK_LABEL
        if not should_bind(pod, node_labels=self._node.labels, selector_label=selector):
            return False
        metadata = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            # The uid makes the binding conditional: a recreated pod of the same name is
            # judged on its own event.
            "metadata": {"name": metadata["name"], "uid": metadata["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            # Raw response: the generated client fails to deserialise the Binding it gets.
            binder.create_namespaced_pod_binding(
                metadata["name"],
                metadata["namespace"],
                body,
                _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status in (404, 409):  # gone, or bound meanwhile
                logger.debug("not binding %s: %s", metadata["name"], _api_message(error))
            else:
                logger.warning("binding %s failed: %s", metadata["name"], _api_message(error))
            return False
        logger.info(
            "bound pod %s/%s to %s", metadata["namespace"], metadata["name"], self.node_name
        )
        return True

    # --- the worker -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                message: _Message | None = self._queue.get(timeout=self._next_timer_in())
            except queue.Empty:
                message = None
            try:
                if message is not None:
                    self._handle(message)
                self._fire_timers()
            except Exception:
                logger.exception(
                    "the executor's worker failed to handle %s", type(message).__name__
                )
            if self._stopping:
                if not any(run.alive for run in self._runs.values()):
                    return
                if time.monotonic() > self._stop_deadline:
                    logger.error(
                        "pod processes did not end after SIGKILL: %s",
                        [run.key for run in self._runs.values() if run.alive],
                    )
                    return

    def _next_timer_in(self) -> float:
        deadlines: list[float] = [
            moment
            for run in self._runs.values()
            for moment in (
                *((run.kill_at, run.refresh_at) if run.alive else ()),
                run.status_at,
                run.start_at,
            )
            if moment is not None
        ]
        if not deadlines:
            return 1.0
        return min(1.0, max(0.0, min(deadlines) - time.monotonic()))

    def _handle(self, message: _Message) -> None:
        match message:
            case _Seen(pod=pod):
                self._on_seen(pod)
            case _Gone(pod=pod):
                with self._newest_lock:
                    self._newest.pop(pod["metadata"]["uid"], None)
                run = self._runs.get(pod["metadata"]["uid"])
                if run is not None:
                    self._on_gone(run)
            case _Synced(uids=uids):
                for run in [run for uid, run in self._runs.items() if uid not in uids]:
                    self._on_gone(run)
            case _Exited():
                self._on_exited(message)
            case _Stop():
                self._on_stop()

    def _fire_timers(self) -> None:
        current = time.monotonic()
        for run in list(self._runs.values()):
            if run.status_at is not None and run.status_at <= current:
                assert run.unwritten_status is not None
                self._write_status(run, run.unwritten_status)
            if run.start_at is not None and run.start_at <= current:
                run.start_at = None
                newest = self._newest_view(run.pod)
                if newest is None or newest["metadata"].get("deletionTimestamp"):
                    self._runs.pop(run.uid, None)  # deleted meanwhile: never started
                else:
                    run.pod = newest
                    self._start(run)
            if not run.alive:
                continue
            if run.kill_at is not None and run.kill_at <= current:
                assert run.process is not None
                logger.info("pod %s: grace period over, SIGKILL", run.key)
                signal_group(run.process.pid, signal.SIGKILL)
                run.kill_at = None
            if run.refresh_at is not None and run.refresh_at <= current:
                self._refresh_token(run)

    def _on_seen(self, seen: dict[str, Any]) -> None:
        pod = self._newest_view(seen)
        if pod is None:
            return  # deleted since: its `_Gone` is queued behind this message
        metadata = pod["metadata"]
        run = self._runs.get(metadata["uid"])
        if run is None:
            self._first_sight(pod)
            return
        # Metadata from the event; the status from our own last write, which is newer than
        # any event's unless someone else writes pod status too.
        run.pod = {**pod, "status": run.pod.get("status")} if run.wrote_status else pod
        if metadata.get("deletionTimestamp") and not run.removed:
            run.deleting = True
            if run.alive:
                self._terminate(run, grace_s=_grace_s(pod))
            elif run.finished:
                self._remove(run)

    def _first_sight(self, pod: dict[str, Any]) -> None:
        metadata = pod["metadata"]
        run = _Run(
            namespace=metadata["namespace"], name=metadata["name"], uid=metadata["uid"], pod=pod
        )
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        deleting = bool(metadata.get("deletionTimestamp"))
        if phase in TERMINAL_PHASES or deleting:
            # Finished long ago, or deleted before it ran here: at most, finish the deletion.
            run.finished = True
            self._runs[run.uid] = run
            if deleting:
                run.deleting = True
                self._remove(run)
            return
        if self._stopping:
            return  # left Pending, for the next executor on this node
        self._runs[run.uid] = run
        if phase != "Pending":
            # Running (or Unknown) with no process here: an executor before us started it
            # and died, and its processes with it.
            run.finished = True
            message = "the process was lost: the local executor running it stopped"
            self._write_status(
                run,
                terminated_status(
                    pod,
                    container_id=None,
                    started_at=None,
                    finished_at=now(),
                    exit=Exit(137),
                    reason="ContainerStatusUnknown",
                    message="The container could not be located when the pod was terminated",
                    pod_reason="ContainerStatusUnknown",
                    pod_message=message,
                    force_failed=True,
                ),
            )
            logger.warning("pod %s: %s; marked Failed", run.key, message)
            return
        self._start(run)

    def _on_gone(self, run: _Run) -> None:
        """The pod no longer exists in the API (removed by us, or force-deleted)."""
        if run.alive:
            # Force-deleted: nobody is left to report to, but the process still gets a
            # short chance to end cleanly; the run is forgotten when it has.
            run.removed = True
            self._terminate(run, grace_s=FORCE_DELETED_GRACE_S)
        else:
            self._runs.pop(run.uid, None)
            self._drop_credentials(run)

    def _on_stop(self) -> None:
        self._stopping = True
        self._stop_deadline = time.monotonic() + self._stop_grace_s + 10.0
        for run in self._runs.values():
            if run.alive:
                run.stop_message = f"the local executor of node {self.node_name} stopped"
                self._terminate(run, grace_s=self._stop_grace_s)

    def _terminate(self, run: _Run, *, grace_s: float) -> None:
        assert run.process is not None
        deadline = time.monotonic() + grace_s
        if not run.terminating:
            run.terminating = True
            logger.info("pod %s: SIGTERM, SIGKILL in %.0fs", run.key, grace_s)
            signal_group(run.process.pid, signal.SIGTERM)
            run.kill_at = deadline
        elif run.kill_at is not None:
            run.kill_at = min(run.kill_at, deadline)  # a second, shorter deletion

    # --- starting a pod ---------------------------------------------------------------

    def _start(self, run: _Run) -> None:
        pod = run.pod
        spec = pod.get("spec") or {}
        containers = spec.get("containers") or []
        if len(containers) > 1 or spec.get("initContainers"):
            logger.warning(
                "pod %s: only the first container runs here; others and init containers "
                "are ignored",
                run.key,
            )
        self._runs[run.uid] = run
        if not containers:
            self._fail_start(run, CONFIG_ERROR, "the pod has no containers")
            return
        container = containers[0]
        try:
            env = container_env(pod, container, sources=self._sources(run.namespace))
            argv = command_line(container, env)
            own = {MARKER_ENV: str(self.state_dir)}
            if spec.get("automountServiceAccountToken") is not False:
                own["KUBECONFIG"] = str(self._issue_credentials(run))
            full_env = process_env(
                inherited=self._inherited, pod_name=run.name, container=env, executor=own
            )
        except _NotYet as error:
            logger.warning("pod %s: not started yet (%s); trying again", run.key, error)
            run.start_at = time.monotonic() + _START_RETRY_S
            return
        except (EnvError, _StartFailure) as error:
            reason = error.reason if isinstance(error, _StartFailure) else CONFIG_ERROR
            self._fail_start(run, reason, str(error))
            return
        cwd = self._cwd
        working_dir = container.get("workingDir")
        if working_dir and Path(working_dir).is_dir():
            cwd = Path(working_dir)
        elif working_dir:
            logger.warning(
                "pod %s: workingDir %s does not exist here; using %s", run.key, working_dir, cwd
            )
        try:
            process = spawn(
                argv, env=full_env, cwd=cwd, log_path=self.log_path(run.namespace, run.name)
            )
        except (OSError, subprocess.SubprocessError) as error:
            self._fail_start(run, START_ERROR, f"cannot run {argv[0]!r}: {error}")
            return
        run.process = process
        run.started_at = now()
        with self._pids_lock:
            self._pids[(run.namespace, run.name)] = process.pid
        threading.Thread(
            target=self._wait_for,
            args=(run.uid, process),
            name=f"tasklease-executor-wait-{process.pid}",
            daemon=True,
        ).start()
        logger.info("pod %s: started pid %d: %s", run.key, process.pid, argv)
        assert run.container_id is not None
        self._write_status(
            run, running_status(pod, container_id=run.container_id, started_at=run.started_at)
        )

    def _wait_for(self, uid: str, process: subprocess.Popen[bytes]) -> None:
        returncode = process.wait()
        at = now()
        # The rest of its process group dies with it, as a container's processes do with
        # the container's main process.
        signal_group(process.pid, signal.SIGKILL)
        self._queue.put(_Exited(uid, returncode, at))

    def _fail_start(self, run: _Run, reason: str, message: str) -> None:
        logger.warning("pod %s: cannot start: %s: %s", run.key, reason, message)
        run.finished = True
        self._drop_credentials(run)
        self._write_status(
            run, start_failure_status(run.pod, reason=reason, message=message, at=now())
        )
        if run.deleting:
            self._remove(run)

    def _sources(self, namespace: str) -> Sources:
        def read(kind: str, name: str) -> dict[str, Any] | None:
            method = (
                self._core.read_namespaced_config_map
                if kind == "ConfigMap"
                else self._core.read_namespaced_secret
            )
            try:
                response = method(
                    name, namespace, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
                )
            except ApiException as error:
                if error.status == 404:
                    return None
                raise EnvError(
                    f"cannot read {kind} {namespace}/{name}: {_api_message(error)}"
                ) from error
            found: dict[str, Any] = json.loads(response.data)
            return found

        def config_map(name: str) -> dict[str, str] | None:
            found = read("ConfigMap", name)
            return None if found is None else dict(found.get("data") or {})

        def secret(name: str) -> dict[str, str] | None:
            found = read("Secret", name)
            if found is None:
                return None
            return {
                key: base64.b64decode(value).decode(errors="replace")
                for key, value in (found.get("data") or {}).items()
            }

        return Sources(config_map=config_map, secret=secret)

    # --- credentials --------------------------------------------------------------------

    def _request_token(self, run: _Run) -> Token:
        account = (run.pod.get("spec") or {}).get("serviceAccountName") or "default"
        try:
            response = self._core.create_namespaced_service_account_token(
                account,
                run.namespace,
                token_request(
                    pod_name=run.name, pod_uid=run.uid, expiration_s=self._token_expiration_s
                ),
                _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status in (429,) or error.status >= 500:
                raise _NotYet(_api_message(error)) from error
            raise _StartFailure(
                CONFIG_ERROR,
                f"cannot get a token for ServiceAccount {run.namespace}/{account}: "
                f"{_api_message(error)}",
            ) from error
        except Exception as error:  # no answer: the API server is away
            raise _NotYet(str(error)) from error
        return parse_token(json.loads(response.data))

    def _credentials_dir(self, run: _Run) -> Path:
        return self.state_dir / "pods" / f"{run.namespace}_{run.name}_{run.uid}"

    def _issue_credentials(self, run: _Run) -> Path:
        assert self._endpoint is not None
        token = self._request_token(run)
        run.credentials = self._credentials_dir(run)
        path = write_credentials(
            run.credentials, endpoint=self._endpoint, token=token, namespace=run.namespace
        )
        run.refresh_at = time.monotonic() + refresh_delay_s(token)
        return path

    def _refresh_token(self, run: _Run) -> None:
        assert self._endpoint is not None and run.credentials is not None
        try:
            token = self._request_token(run)
        except _StartFailure as failure:
            logger.warning("pod %s: token refresh failed: %s", run.key, failure.message)
            run.refresh_at = time.monotonic() + 30.0
            return
        write_credentials(
            run.credentials, endpoint=self._endpoint, token=token, namespace=run.namespace
        )
        run.refresh_at = time.monotonic() + refresh_delay_s(token)
        logger.info("pod %s: token refreshed", run.key)

    def _drop_credentials(self, run: _Run) -> None:
        if run.credentials is not None:
            shutil.rmtree(run.credentials, ignore_errors=True)
            run.credentials = None
        run.refresh_at = None

    # --- a pod's end ------------------------------------------------------------------

    def _on_exited(self, message: _Exited) -> None:
        run = self._runs.get(message.uid)
        if run is None or run.finished:
            return
        run.finished = True
        with self._pids_lock:
            if run.process is not None and self._pids.get((run.namespace, run.name)) == (
                run.process.pid
            ):
                del self._pids[(run.namespace, run.name)]
        self._drop_credentials(run)
        exit = Exit.from_returncode(message.returncode)
        logger.info("pod %s: process %s", run.key, exit.description)
        if run.removed:  # gone from the API: nothing to report to
            self._runs.pop(run.uid, None)
            return
        self._write_status(
            run,
            terminated_status(
                run.pod,
                container_id=run.container_id,
                started_at=run.started_at,
                finished_at=message.at,
                exit=exit,
                message=exit.description if exit.signal is not None else None,
                pod_reason="Terminated" if run.stop_message else None,
                pod_message=run.stop_message,
                force_failed=run.stop_message is not None,
            ),
        )
        if run.deleting:
            self._remove(run)

    def _remove(self, run: _Run) -> None:
        """Finish a graceful deletion: the process is gone, the pod may go too."""
        if run.removed:
            return
        run.removed = True
        try:
            self._core.delete_namespaced_pod(
                run.name,
                run.namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": run.uid}},
                _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status not in (404, 409):
                logger.warning("pod %s: removing failed: %s", run.key, _api_message(error))
                run.removed = False
            return
        except Exception as error:  # connection trouble (the API server restarting)
            # Tried again when the pod is seen next (the watch lists it again once it is
            # back), as a kubelet finishes a graceful deletion once it can.
            logger.warning("pod %s: removing failed (trying again when seen): %s", run.key, error)
            run.removed = False
            return
        logger.info("pod %s: removed", run.key)

    def _write_status(self, run: _Run, body: dict[str, Any]) -> None:
        for attempt in range(1, _STATUS_ATTEMPTS + 1):
            try:
                response = self._core.patch_namespaced_pod_status(
                    run.name,
                    run.namespace,
                    body,
                    field_manager=FIELD_MANAGER,
                    _preload_content=False,
                    _request_timeout=_REQUEST_TIMEOUT,
                )
                # The next patch is computed against what the API server now holds, not a
                # watch event that may still be on its way.
                run.pod = json.loads(response.data)
                run.wrote_status = True
                run.unwritten_status = run.status_at = None
                return
            except ApiException as error:
                if error.status == 404:
                    return  # deleted meanwhile: its DELETED event follows
                retry = error.status in (0, 429) or error.status >= 500
                if not retry:
                    logger.warning("pod %s: status update failed: %s", run.key, _api_message(error))
                    return
                failure = _api_message(error)
            except Exception as error:  # connection trouble
                failure = str(error)
            if attempt == _STATUS_ATTEMPTS:
                # The API server is away: a kubelet would report the pod's state when it is
                # back, not leave it Running for ever. Try again later, between messages.
                logger.warning("pod %s: status update failed (trying again): %s", run.key, failure)
                run.unwritten_status, run.status_at = body, time.monotonic() + _STATUS_RETRY_S
                return
            time.sleep(0.2 * attempt)
