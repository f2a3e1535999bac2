"""Pod processes: started so that they never outlive the executor, found again if they do.

Each pod's process leads a session (and so a process group) of its own, so signals reach
everything it started (`sh -c 'sleep 100 & wait'` included), as a container runtime
signals a whole container. When the main process ends, the rest of its group is killed, as
a container's other processes die with its PID 1.

`PR_SET_PDEATHSIG(SIGKILL)` (`tasklease.controlplane.process.die_with_parent`) kills the
main process when the executor dies without running any code (SIGKILL, OOM kill). It fires
when the *thread* that forked the child ends, so the executor forks from its one
long-lived worker thread. It reaches only the main process, not its children: those are
found by a marker variable in their environment (`/proc/<pid>/environ`, inherited by
everything they start) and killed when an executor next starts on the same state dir, and
again when an executor stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from tasklease.controlplane.process import die_with_parent

logger = logging.getLogger(__name__)

MARKER_ENV: Final = "TASKLEASE_EXECUTOR_STATE_DIR"


def spawn(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session, stdout and stderr appended to `log_path`.

    Raises OSError (FileNotFoundError, PermissionError, ...) when the exec fails: Python
    reports the child's exec error in the parent.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            close_fds=True,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )


def signal_group(pgid: int, signum: signal.Signals) -> bool:
    """Send `signum` to a process group; False when the group is empty (all gone)."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # the group's processes changed identity: not ours to signal
        logger.warning("not allowed to signal process group %d", pgid)
        return False
    return True


def marked_pids(value: str, *, proc: Path = Path("/proc")) -> list[int]:
    """Processes whose initial environment has `MARKER_ENV=value` (not this process)."""
    needle = f"\0{MARKER_ENV}={value}\0".encode()
    found: list[int] = []
    own = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        if needle in b"\0" + environ + b"\0":
            found.append(int(entry.name))
    return found


def kill_marked(value: str) -> list[int]:
    """SIGKILL every process carrying the marker `value`; returns their pids."""
    pids = marked_pids(value)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids
