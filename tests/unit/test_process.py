"""The build helpers of tasklease.controlplane.process: a long command run with progress lines
(`run_with_progress`, behind `go build` and buildah) and the build lock (`file_lock`), on
real child processes and real `flock`s."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from tasklease.controlplane.process import TAIL_LINES, file_lock, run_with_progress


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_the_lines_the_caller_picks_are_said_and_the_tail_is_kept() -> None:
    said: list[str] = []
    finished = run_with_progress(
        _sh("for i in $(seq 1 50); do echo line $i; done; exit 3"),
        label="count",
        say=said.append,
        on_line=lambda line: line.upper() if line.endswith("7") else None,
        progress_line=lambda elapsed_s: "still at work",
        interval_s=60.0,
    )
    assert finished.returncode == 3
    assert said == ["LINE 7", "LINE 17", "LINE 27", "LINE 37", "LINE 47"]
    assert len(finished.tail) == TAIL_LINES
    assert finished.tail[-1] == "line 50"


def test_a_quiet_command_gets_a_progress_line_every_interval() -> None:
    said: list[str] = []
    finished = run_with_progress(
        _sh("sleep 0.6"),
        label="quiet",
        say=said.append,
        progress_line=lambda elapsed_s: f"at work for {elapsed_s:.1f} s",
        interval_s=0.1,
    )
    assert finished.returncode == 0
    assert len(said) >= 2
    assert all(line.startswith("at work for ") for line in said)


def test_a_command_past_its_timeout_gets_sigterm_to_clean_up_first() -> None:
    finished = run_with_progress(
        _sh('trap "echo cleaned up; exit 0" TERM; echo started; while :; do sleep 0.05; done'),
        label="stuck",
        say=lambda message: None,
        progress_line=lambda elapsed_s: "still at work",
        interval_s=60.0,
        timeout_s=0.5,
    )
    assert finished.returncode is None
    assert finished.tail[0] == "started"
    assert finished.tail[-1] == "cleaned up"


def test_an_interrupted_run_leaves_no_process_behind() -> None:
    pids: list[int] = []

    def interrupt(elapsed_s: float) -> str:
        raise KeyboardInterrupt

    def remember(line: str) -> None:
        pids.append(int(line))

    with pytest.raises(KeyboardInterrupt):
        run_with_progress(
            _sh("echo $$; exec sleep 60"),
            label="interrupted",
            say=lambda message: None,
            on_line=remember,
            progress_line=interrupt,
            interval_s=0.3,
        )
    assert len(pids) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_a_held_lock_is_waited_for_and_said_so(tmp_path: Path) -> None:
    lock_path = tmp_path / "locks" / "entry.lock"
    said: list[str] = []
    entered = threading.Event()

    def build() -> None:
        with file_lock(lock_path, say=said.append, waiting="another build holds it"):
            entered.set()

    lock_path.parent.mkdir()
    with lock_path.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=build)
        waiter.start()
        assert not entered.wait(0.3)
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(timeout=5)
    assert entered.is_set()
    assert said == ["another build holds it"]


def test_a_free_lock_is_taken_silently_and_creates_its_folder(tmp_path: Path) -> None:
    said: list[str] = []
    with file_lock(tmp_path / "new" / "entry.lock", say=said.append, waiting="waiting"):
        assert (tmp_path / "new" / "entry.lock").exists()
    assert said == []
