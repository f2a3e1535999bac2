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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

PR_SET_PDEATHSIG: Final = 1
TAIL_LINES: Final = 40


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
