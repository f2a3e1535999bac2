"""Child processes that cannot outlive their parent.

Three layers, because each covers a way of dying the others miss:

- `PR_SET_PDEATHSIG(SIGKILL)` (Linux, set between fork and exec) makes the kernel kill the
  child when its parent dies, even by SIGKILL or an OOM kill, where no Python code runs. The
  signal fires when the *thread* that started the child exits, so start control planes from
  the main thread or a thread that lives as long as they do (pytest fixtures and the CLI do).
- `atexit` stops live control planes in order on a normal exit or an uncaught exception.
- The CLI turns SIGTERM into the same clean shutdown as Ctrl-C.

Each child gets a session of its own, so a Ctrl-C in the terminal reaches only Python, which
then stops the components in order (controller-manager, apiserver, etcd) instead of all three
dying at once and logging each other's disappearance.

`preexec_fn` is documented as unsafe with threads because the child might take a lock held by
another thread; ours touches none: it only calls a `prctl` function pointer resolved before
the fork, then `getppid` and `kill`.

The builds (`binaries.py`, `image.py`) share the rest: `run_with_progress` runs a command
that takes minutes, saying now and then that it is alive, `file_lock` serialises builds that
would otherwise race for the same cache entry or storage, and `printer` makes the
`tasklease: ...` lines they say on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, TextIO

PR_SET_PDEATHSIG: Final = 1
TAIL_LINES: Final = 40
# How long a command interrupted by us gets to clean up after SIGTERM before SIGKILL (buildah
# removes its working container and unmounts).
STOP_GRACE_S: Final = 15.0


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    # Declared so ctypes passes full-width unsigned longs, as the kernel reads them.
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    typed: Callable[..., int] = prctl
    return typed


_PRCTL: Final = _load_prctl()


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn` making the child get SIGKILL when the forking thread of `parent_pid`
    ends (a no-op off Linux)."""

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody would signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file, or a note why there are none."""
    try:
        with path.open("r", errors="replace") as log:
            return "".join(deque(log, maxlen=lines)).rstrip("\n") or "(log is empty)"
    except OSError as error:
        return f"(no log: {error})"


@dataclass
class Child:
    """One running component, logging to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        log = log_path.open("ab")
        try:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )
        except BaseException:
            log.close()
            raise
        return cls(name, process, log_path, log)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        self._log.flush()
        return log_tail(self.log_path, lines)

    def await_ready(
        self,
        ready: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        error: Callable[[str], Exception],
    ) -> None:
        """Poll `ready` until it holds; `error(message)` with the end of the log when the
        process exits first, or does not `what` ("answer") within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running:
                raise error(
                    f"{self.name} exited with code {self.process.returncode} during start-up. "
                    f"Last {TAIL_LINES} lines of its log:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise error(
                    f"{self.name} did not {what} within {timeout:.0f}s. Last {TAIL_LINES} "
                    f"lines of its log:\n{self.tail()}"
                )
            time.sleep(0.1)

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Idempotent."""
        try:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    self.process.wait()
        finally:
            self._log.close()


def printer(stream: TextIO | None = None) -> Callable[[str], None]:
    """A `say` for progress: `tasklease: ...` lines on `stream`, or on whatever `sys.stderr`
    is at the time of each call (so that pytest's capture sees them)."""

    def say(message: str) -> None:
        out = stream if stream is not None else sys.stderr
        print(f"tasklease: {message}", file=out, flush=True)

    return say


@contextlib.contextmanager
def file_lock(path: Path, *, say: Callable[[str], None], waiting: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created, with its folder, if absent); when another
    process holds it, say `waiting` once, then wait for it as long as it takes. The kernel
    drops the lock when its holder dies, so a killed build never leaves it stuck."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(waiting)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Finished:
    """How a command run by `run_with_progress` ended."""

    returncode: int | None  # None: stopped at its timeout
    tail: tuple[str, ...]  # the last TAIL_LINES lines of its output (stdout and stderr)
    elapsed_s: float


def _stop_group(process: subprocess.Popen[str], grace_s: float) -> None:
    """SIGTERM the process group, so that the command can clean up; SIGKILL after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_with_progress(
    argv: Sequence[str],
    *,
    label: str,
    say: Callable[[str], None],
    progress_line: Callable[[float], str],
    interval_s: float,
    on_line: Callable[[str], str | None] = lambda line: None,
    timeout_s: float | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Finished:
    """Run a long command, feeding each line of its output to `on_line` and saying what that
    returns; whenever nothing was said for `interval_s`, say `progress_line(elapsed seconds)`.

    The command runs in a session of its own, so that stopping it ends the tools it started
    too, and dies with us if we are killed outright. When it outlives `timeout_s`, or we are
    interrupted (Ctrl-C, or the CLI's stop signal), its process group gets SIGTERM, then
    SIGKILL after `STOP_GRACE_S`. Failing to start raises OSError; a failure of the command
    is the caller's to report, with the tail of its output.
    """
    started = time.monotonic()
    deadline = started + timeout_s if timeout_s is not None else float("inf")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    last_said = [started]
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        preexec_fn=die_with_parent(os.getpid()),
    )

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            shown = on_line(line)
            if shown is not None:
                say(shown)
                last_said[0] = time.monotonic()

    reader = threading.Thread(target=read, name=f"{label}-output", daemon=True)
    reader.start()
    returncode: int | None = None
    try:
        while returncode is None:
            now = time.monotonic()
            if now >= deadline:
                break
            if now - last_said[0] >= interval_s:
                say(progress_line(now - started))
                last_said[0] = now
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = process.wait(timeout=min(last_said[0] + interval_s, deadline) - now)
    finally:
        if process.poll() is None:
            _stop_group(process, STOP_GRACE_S)
        reader.join(timeout=5)
    return Finished(returncode, tuple(tail), time.monotonic() - started)


class OperatorProcess:
    """The operator as a real process (`python -m tasklease operator`) against a local
    cluster, watching one namespace, logging to a file: for the tests and the soak, which
    kill it with SIGKILL and start it again exactly as a crash would."""

    def __init__(
        self,
        *,
        kubeconfig: Path,
        namespace: str,
        log_path: Path,
        metrics_port: int = 0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.metrics_port = metrics_port
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # monotonic: the last start

    def start(self) -> OperatorProcess:
        self.started_at = time.monotonic()
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            TASKLEASE_NAMESPACES=self.namespace,
            TASKLEASE_METRICS_PORT=str(self.metrics_port),
            TASKLEASE_HEALTH_PORT="0",
            TASKLEASE_WORKERS="4",
        )
        env.update(self.extra_env)
        log = self.log_path.open("ab")
        # A session of its own, as each control-plane process has: with the kernel's
        # autogroup scheduling a session is a CPU group, so the operator gets its share
        # beside the API server the way a container of its own would, rather than sharing
        # one with whoever started it (the bench's load generator).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tasklease", "operator"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers run, exactly like a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the operator is not running"
        return self.process.pid

    def check(self) -> None:
        """Raise when the operator exited, so that a wait on it fails at once, with why."""
        if not self.alive:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(
                f"the operator exited (code {code}); log tail:\n{log_tail(self.log_path)}"
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
