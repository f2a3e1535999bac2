"""`tasklease run -- PROGRAM [ARGS...]`: run any program as a tasklease runner.

The wrapper holds the Task's lease for the program, so a runner image needs no code of its
own to take part in the protocol:

1. it acknowledges the lease and heartbeats in the background (the runner SDK, at the
   Task's `spec.heartbeatInterval`);
2. it starts the program in its own process group, with the pod's environment plus
   `TASKLEASE_PROGRESS_FILE`, the file the program may write its progress into
   (format: `tasklease.runner.progress_file`); each change is reported at once;
3. it forwards SIGTERM and SIGINT to the program's process group (SIGKILL after the grace
   period if the program is still there); a program stopped that way never counts as
   FINISHED: the result is FAILED with errorId `Interrupted` (exit code 128+N if it exited 0);
4. when the task is cancelled or the lease is lost (a fenced write was refused), it stops
   the program (SIGTERM, the grace period, SIGKILL), reports nothing and exits 143;
5. when the program ends, its exit status becomes the result: 0 is FINISHED; anything else
   is FAILED with errorId `ExitCode<N>` or `KilledBy<SIGNAL>` and the end of the program's
   stderr as the message, and carries the last checkpoint the program wrote into the
   progress file in the same write as the failure, so the next attempt resumes from it
   even when the progress report before it was refused or lost. The wrapper then exits
   with the program's exit code (128+N for a program killed by signal N, as shells do).

The program's stdout is the wrapper's own (inherited); its stderr passes through the
wrapper, which keeps only a bounded tail (the last 8 KiB) for the error message.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, Protocol

from tasklease.api.runner_env import runner_env
from tasklease.runner.progress_file import MAX_FILE_BYTES, ProgressUpdate, parse_progress_bytes
from tasklease.runner.sdk import Identity, LeaseLost, TaskLease

logger = logging.getLogger(__name__)

ENV_PROGRESS_FILE: Final = "TASKLEASE_PROGRESS_FILE"

# Exit codes of the wrapper itself (otherwise it exits with the program's code).
EXIT_LEASE_ERROR: Final = 1  # the lease could not be taken up (API unreachable, RBAC, ...)
EXIT_USAGE: Final = 2  # bad command line, or not started by the operator (no TASKLEASE_*)
EXIT_CANNOT_EXECUTE: Final = 126  # the program exists but cannot be executed
EXIT_NOT_FOUND: Final = 127  # the program does not exist
EXIT_CANCELED: Final = 143  # the task was cancelled or the lease lost: nothing reported

# Error ids of the FAILED results the wrapper writes (besides ExitCode<N> / KilledBy<SIG>).
ERROR_INTERRUPTED: Final = "Interrupted"  # the wrapper itself got SIGTERM/SIGINT
ERROR_NOT_FOUND: Final = "CommandNotFound"
ERROR_CANNOT_EXECUTE: Final = "CommandNotExecutable"

STDERR_TAIL_BYTES: Final = 8 * 1024
MESSAGE_LIMIT: Final = 4096  # status.result.errorMessage's maxLength
FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
_TICK_S: Final = 0.2


class RunnerLease(Protocol):
    """What the wrapper needs of a held lease: `TaskLease`, or a fake in unit tests."""

    @property
    def canceled(self) -> bool: ...

    @property
    def cancel_reason(self) -> str | None: ...

    def progress(
        self,
        *,
        percent: float | None = None,
        message: str | None = None,
        fields: Mapping[str, str] | None = None,
        checkpoint: Any = ...,
    ) -> bool: ...

    def succeed(self) -> None: ...

    def fail(
        self,
        error_id: str,
        message: str,
        *,
        stack_trace: str | None = None,
        checkpoint: Any = ...,
    ) -> None: ...


# --- pure parts ---------------------------------------------------------------------------


class StderrTail:
    """The last `limit` bytes of a stream, held as a deque of chunks: memory stays below
    twice the limit however much the program writes."""

    def __init__(self, limit: int = STDERR_TAIL_BYTES) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._lock = threading.Lock()

    def append(self, chunk: bytes) -> None:
        if not chunk:
            return
        with self._lock:
            if len(chunk) >= self.limit:
                self._chunks.clear()
                chunk = chunk[-self.limit :]
                self._size = 0
            self._chunks.append(chunk)
            self._size += len(chunk)
            # Drop whole chunks from the front while the rest still covers the limit.
            while self._size - len(self._chunks[0]) >= self.limit:
                self._size -= len(self._chunks.popleft())

    @property
    def held_bytes(self) -> int:
        return self._size

    def text(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)[-self.limit :]
        return data.decode("utf-8", errors="replace")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


@dataclass(frozen=True, slots=True)
class ProgramOutcome:
    """What a program's end means: the wrapper's exit code and the result to report."""

    exit_code: int
    error_id: str | None  # None: FINISHED
    summary: str

    @property
    def succeeded(self) -> bool:
        return self.error_id is None


def outcome_of(returncode: int, *, interrupted_by: int | None = None) -> ProgramOutcome:
    """Map a `Popen.returncode` (negative: killed by that signal) to the outcome.

    `interrupted_by` is the signal the wrapper itself received and forwarded: the program
    was asked to stop, so even a clean exit is not a FINISHED task.
    """
    error_id: str | None
    if returncode < 0:
        name = signal_name(-returncode)
        exit_code, error_id = 128 - returncode, f"KilledBy{name}"
        ended = f"was killed by {name}"
    else:
        exit_code, error_id = returncode, (f"ExitCode{returncode}" if returncode else None)
        ended = f"exited with code {returncode}"
    if interrupted_by is not None:
        received = signal_name(interrupted_by)
        return ProgramOutcome(
            exit_code=exit_code or 128 + interrupted_by,
            error_id=ERROR_INTERRUPTED,
            summary=f"the runner received {received} and forwarded it; the program {ended}",
        )
    return ProgramOutcome(exit_code=exit_code, error_id=error_id, summary=f"the program {ended}")


def failure_message(summary: str, stderr_tail: str, *, limit: int = MESSAGE_LIMIT) -> str:
    """The summary plus as much of the end of stderr as fits in `limit` characters."""
    tail = stderr_tail.strip()
    if not tail:
        return summary[:limit]
    head = f"{summary}; stderr:\n"
    room = limit - len(head)
    if room <= 0:
        return summary[:limit]
    return head + tail[-room:]


# --- the progress file --------------------------------------------------------------------


class ProgressFileWatcher:
    """Notices when the program rewrote the progress file; parses the new content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Content present before the program started (a reused --progress-file) is stale.
        self._signature = self._stat()
        self._last_reported: ProgressUpdate | None = None
        # The newest checkpoint the file set (a checkpoint stays until the file sets
        # another): {"checkpoint": value}, or empty while it set none.
        self.checkpoint: dict[str, Any] = {}

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def poll(self) -> ProgressUpdate | None:
        """A new usable update to report, or None (unchanged, empty, malformed)."""
        signature = self._stat()
        if signature is None or signature == self._signature:
            return None
        self._signature = signature
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            logger.warning("cannot read the progress file %s: %s", self.path, error)
            return None
        update = parse_progress_bytes(data)
        for warning in update.warnings:
            logger.warning("%s (%s)", warning, self.path)
        if not update.usable or update.same_report(self._last_reported):
            return None
        self._last_reported = update
        if update.has_checkpoint:
            self.checkpoint = {"checkpoint": update.checkpoint}
        return update


def report_update(task: RunnerLease, update: ProgressUpdate) -> bool:
    """Report one progress-file reading through the SDK."""
    extra: dict[str, Any] = {"checkpoint": update.checkpoint} if update.has_checkpoint else {}
    return task.progress(
        percent=update.percent,
        message=update.message or "",
        fields=update.fields,
        **extra,
    )


# --- the wrapper --------------------------------------------------------------------------


def _binary_stream(stream: IO[str]) -> Callable[[bytes], None]:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:

        def write_bytes(data: bytes) -> None:
            buffer.write(data)
            buffer.flush()

        return write_bytes

    def write_text(data: bytes) -> None:
        stream.write(data.decode("utf-8", errors="replace"))
        stream.flush()

    return write_text


def _pump(source: IO[bytes], tail: StderrTail, sink: Callable[[bytes], None]) -> None:
    """Copy the program's stderr to ours, keeping the tail. Never lets an error escape."""
    fd = source.fileno()
    try:
        while chunk := os.read(fd, 65536):
            tail.append(chunk)
            # Our own stderr gone is no reason to stop draining: the program would block.
            with contextlib.suppress(OSError, ValueError):
                sink(chunk)
    except OSError:
        pass
    finally:
        source.close()


def _killpg(pgid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, number)


class _Child:
    """The running program: its process group, the stderr pump, and how it is stopped."""

    def __init__(self, process: subprocess.Popen[bytes], pump: threading.Thread) -> None:
        self.process = process
        self.pump = pump
        self.pgid = process.pid  # process_group=0: the program leads its own group
        self.exited = threading.Event()
        self.kill_at: float | None = None
        self.killed = False
        threading.Thread(target=self._wait, name="tasklease-run-wait", daemon=True).start()

    def _wait(self) -> None:
        self.process.wait()
        self.exited.set()

    def signal(self, number: int) -> None:
        _killpg(self.pgid, number)

    def stop(self, number: int, grace_period_s: float) -> None:
        """Send `number` now and SIGKILL once the grace period is over (see `enforce`)."""
        self.signal(number)
        deadline = time.monotonic() + grace_period_s
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)

    def enforce(self) -> None:
        if self.kill_at is not None and not self.killed and time.monotonic() >= self.kill_at:
            logger.warning("the program did not stop within the grace period: SIGKILL")
            self.signal(signal.SIGKILL)
            self.killed = True


def run_wrapped(
    argv: Sequence[str],
    *,
    identity: Identity | None = None,
    api_client: Any = None,
    progress_file: str | os.PathLike[str] | None = None,
    grace_period_s: float = 10.0,
    poll_interval_s: float = 1.0,
    heartbeat_interval_s: float | None = None,
) -> int:
    """Run `argv` as this pod's runner; returns the exit code for the wrapper to exit with."""
    if not argv:
        raise ValueError("no program to run")
    try:
        identity = identity or Identity.from_env()
    except (RuntimeError, ValueError) as error:  # not set, or not parseable
        logger.error("%s", error)
        return EXIT_USAGE
    try:
        task = TaskLease(identity, api_client=api_client, heartbeat_interval_s=heartbeat_interval_s)
    except Exception as error:  # no in-cluster config and no usable KUBECONFIG
        logger.error("no API client for task %s: %s", identity.task, error)
        return EXIT_LEASE_ERROR
    try:
        task.start()
    except Exception as error:
        logger.error("could not take up the lease on task %s: %s", task.identity.task, error)
        task.close()
        return EXIT_LEASE_ERROR
    try:
        if task.canceled:
            logger.warning("not starting the program: %s", task.cancel_reason)
            return EXIT_CANCELED
        return run_program(
            task,
            list(argv),
            progress_file=progress_file,
            grace_period_s=grace_period_s,
            poll_interval_s=poll_interval_s,
        )
    finally:
        task.close()


def run_program(
    task: RunnerLease,
    argv: Sequence[str],
    *,
    progress_file: str | os.PathLike[str] | None = None,
    grace_period_s: float = 10.0,
    poll_interval_s: float = 1.0,
    extra_env: dict[str, str] | None = None,
    forward_signals: bool = True,
) -> int:
    """Run `argv` under a lease already taken up; the part of `run_wrapped` after start().

    `extra_env` is added to the program's environment (pool mode: the claimed task's
    identity); with `forward_signals` False the caller keeps its own signal handlers.
    """
    temp_dir: str | None = None
    if progress_file is None:
        temp_dir = tempfile.mkdtemp(prefix="tasklease-run-")
        path = Path(temp_dir) / "progress"
    else:
        path = Path(progress_file).absolute()
    try:
        return _supervise(
            task,
            list(argv),
            path,
            grace_period_s,
            poll_interval_s,
            extra_env=extra_env or {},
            forward_signals=forward_signals,
        )
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _supervise(
    task: RunnerLease,
    argv: list[str],
    path: Path,
    grace_period_s: float,
    poll_interval_s: float,
    *,
    extra_env: dict[str, str],
    forward_signals: bool,
) -> int:
    watcher = ProgressFileWatcher(path)
    env = dict(os.environ, **extra_env, **{ENV_PROGRESS_FILE: str(path)})
    received: list[int] = []
    child: _Child | None = None

    def forward(number: int, _frame: FrameType | None) -> None:
        received.append(number)
        logger.warning("received %s: forwarding it to the program", signal_name(number))
        if child is not None:
            child.stop(number, grace_period_s)

    previous: dict[int, Any] = {}
    if forward_signals and threading.current_thread() is threading.main_thread():
        for number in FORWARDED_SIGNALS:
            previous[number] = signal.signal(number, forward)
    try:
        try:
            process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                process_group=0,
            )
        except OSError as error:
            return _cannot_start(task, argv, error)
        tail = StderrTail()
        assert process.stderr is not None
        pump = threading.Thread(
            target=_pump,
            args=(process.stderr, tail, _binary_stream(sys.stderr)),
            name="tasklease-run-stderr",
            daemon=True,
        )
        pump.start()
        child = _Child(process, pump)
        logger.info("started %s (pid %d), progress file %s", argv[0], process.pid, path)
        for early in received:  # a signal that came while the program was starting
            child.stop(early, grace_period_s)

        stopping_for: str | None = None
        next_poll = time.monotonic() + poll_interval_s
        while not child.exited.wait(_TICK_S):
            child.enforce()
            if stopping_for is None and task.canceled:
                stopping_for = task.cancel_reason or "canceled"
                logger.warning("stopping the program: %s", stopping_for)
                child.stop(signal.SIGTERM, grace_period_s)
            if stopping_for is None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + poll_interval_s
                update = watcher.poll()
                if update is not None:
                    report_update(task, update)
        returncode = process.returncode
        child.signal(signal.SIGKILL)  # leftovers of its group, as a container's end would
        pump.join(timeout=2.0)

        if stopping_for is not None or task.canceled:
            logger.warning(
                "program ended (code %s); nothing reported: %s",
                returncode,
                stopping_for or task.cancel_reason,
            )
            return EXIT_CANCELED
        update = watcher.poll()  # what it wrote just before it exited
        if update is not None:
            report_update(task, update)
        outcome = outcome_of(returncode, interrupted_by=received[0] if received else None)
        return _report_outcome(task, outcome, tail.text(), checkpoint=watcher.checkpoint)
    finally:
        if child is not None and child.process.poll() is None:  # only on an error of ours
            child.signal(signal.SIGKILL)
        for forwarded, handler in previous.items():
            signal.signal(forwarded, handler)


def _report_outcome(
    task: RunnerLease,
    outcome: ProgramOutcome,
    stderr_tail: str,
    *,
    checkpoint: Mapping[str, Any],
) -> int:
    """Report the program's outcome. A failure carries `checkpoint` ({"checkpoint": value},
    or empty) in the result's own write: the progress report just before it may have been
    refused by a passing error, and would go out again only with a heartbeat, which the
    result ends."""
    try:
        if outcome.succeeded:
            task.succeed()
            logger.info("%s: reported FINISHED", outcome.summary)
        else:
            assert outcome.error_id is not None
            task.fail(
                outcome.error_id,
                failure_message(outcome.summary, stderr_tail),
                stack_trace=stderr_tail or None,
                **checkpoint,
            )
            logger.info("%s: reported FAILED (%s)", outcome.summary, outcome.error_id)
    except LeaseLost:
        logger.warning("%s, but the lease was lost: nothing reported", outcome.summary)
        return EXIT_CANCELED
    except Exception as error:
        logger.error("%s, but the result could not be reported: %s", outcome.summary, error)
    return outcome.exit_code


def _cannot_start(task: RunnerLease, argv: list[str], error: OSError) -> int:
    if isinstance(error, FileNotFoundError):
        error_id, exit_code = ERROR_NOT_FOUND, EXIT_NOT_FOUND
    else:
        error_id, exit_code = ERROR_CANNOT_EXECUTE, EXIT_CANNOT_EXECUTE
    message = f"cannot start {argv[0]!r}: {error.strerror or error}"
    logger.error("%s", message)
    try:
        task.fail(error_id, message)
    except LeaseLost:
        return EXIT_CANCELED
    except Exception as report_error:
        logger.error("the result could not be reported: %s", report_error)
    return exit_code


# --- command line -------------------------------------------------------------------------


def identity_env(identity: Identity) -> dict[str, str]:
    """The TASKLEASE_* variables a runner pod of this identity would have."""
    return runner_env(
        task=identity.task,
        namespace=identity.namespace,
        epoch=identity.epoch,
        attempt=identity.attempt,
        pod_name=identity.pod_name,
        parameters=identity.parameters,
        checkpoint=identity.checkpoint,
    )


def run_pool(
    argv: Sequence[str],
    *,
    worker_group: str,
    api_client: Any = None,
    namespace: str | None = None,
    pod_name: str | None = None,
    poll_timeout_s: float = 90.0,
    grace_period_s: float = 10.0,
    poll_interval_s: float = 1.0,
    max_tasks: int | None = None,
) -> int:
    """Pool mode: claim Tasks of `worker_group` one after another and run `argv` for each.

    SIGTERM or SIGINT (the pod is being deleted) stops claiming; a program still running is
    stopped and its task released back to the pool, so another runner takes it at once.
    """
    from tasklease.runner.pool import PoolRunner

    runner = PoolRunner(worker_group, namespace=namespace, pod_name=pod_name, api_client=api_client)
    current: list[TaskLease] = []

    def stop(number: int, _frame: FrameType | None) -> None:
        logger.warning("received %s: releasing held tasks and stopping", signal_name(number))
        runner.stopping = True
        for task in current:
            task.request_release("the pool runner is stopping")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, stop) for number in FORWARDED_SIGNALS}
    done = 0
    try:
        with runner:
            while not runner.stopping and (max_tasks is None or done < max_tasks):
                task = runner.poll_for_task(timeout_s=poll_timeout_s)
                if task is None:
                    continue
                current.append(task)
                try:
                    task.start()
                    run_program(
                        task,
                        list(argv),
                        grace_period_s=grace_period_s,
                        poll_interval_s=poll_interval_s,
                        extra_env=identity_env(task.identity),
                        forward_signals=False,
                    )
                    if task.release_requested and not task.lost:
                        runner.release(task)
                finally:
                    task.close()
                    current.remove(task)
                done += 1
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasklease run",
        description=(
            "Run PROGRAM as the runner of the Task this pod was given: acknowledge and "
            "heartbeat the lease, report progress the program writes to "
            "$TASKLEASE_PROGRESS_FILE, turn its exit code into the result."
        ),
        epilog=(
            "Exit code: the program's (128+N when killed by signal N); 143 when the task "
            "was cancelled or the lease lost (the program is stopped, nothing is reported); "
            "1 when the lease could not be taken up; 2 on usage errors."
        ),
    )
    parser.add_argument(
        "--progress-file",
        metavar="PATH",
        help="file the program writes its progress to (default: a new file in a temp dir); "
        "the program finds its path in TASKLEASE_PROGRESS_FILE",
    )
    parser.add_argument(
        "--grace-period",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="how long the program may take to stop after SIGTERM before SIGKILL (default 10)",
    )
    parser.add_argument(
        "--worker-group",
        metavar="GROUP",
        help="pool mode: claim Tasks of this worker group one after another (PollForTask) "
        "instead of running the one Task this pod was given",
    )
    parser.add_argument(
        "--poll-timeout",
        metavar="SECONDS",
        type=float,
        default=90.0,
        help="pool mode: how long one long poll waits for a task (default 90, like AWS)",
    )
    parser.add_argument(
        "--max-tasks",
        metavar="N",
        type=int,
        default=None,
        help="pool mode: exit after N tasks (default: run until SIGTERM)",
    )
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    return parser


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    parser = build_parser()
    if "--" in args:
        split = args.index("--")
        options, program = parser.parse_args(args[:split]), args[split + 1 :]
    else:
        options = parser.parse_args(args)
        program = list(options.program)
    if not program:
        parser.error("no program given: tasklease run [OPTIONS] -- PROGRAM [ARGS...]")
    if options.grace_period < 0:
        parser.error("--grace-period must not be negative")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="tasklease run: %(levelname)s: %(message)s",
        )
    if options.worker_group:
        return run_pool(
            program,
            worker_group=options.worker_group,
            poll_timeout_s=options.poll_timeout,
            grace_period_s=options.grace_period,
            max_tasks=options.max_tasks,
        )
    return run_wrapped(
        program, progress_file=options.progress_file, grace_period_s=options.grace_period
    )
