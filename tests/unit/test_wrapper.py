"""`tasklease run` without an API server: its pure parts, and the supervision of a real
program under a fake lease (the lease itself is the SDK's, tested on a real API server)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tasklease.runner import LeaseLost
from tasklease.runner.progress_file import parse_progress
from tasklease.runner.wrapper import (
    ENV_PROGRESS_FILE,
    EXIT_CANCELED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    MESSAGE_LIMIT,
    STDERR_TAIL_BYTES,
    ProgressFileWatcher,
    StderrTail,
    failure_message,
    main,
    outcome_of,
    report_update,
    run_program,
)

# --- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "exit_code", "error_id"),
    [
        (0, 0, None),
        (1, 1, "ExitCode1"),
        (3, 3, "ExitCode3"),
        (127, 127, "ExitCode127"),
        (255, 255, "ExitCode255"),
        (-9, 137, "KilledBySIGKILL"),
        (-15, 143, "KilledBySIGTERM"),
        (-11, 139, "KilledBySIGSEGV"),
    ],
)
def test_exit_status_to_result(returncode: int, exit_code: int, error_id: str | None) -> None:
    outcome = outcome_of(returncode)
    assert (outcome.exit_code, outcome.error_id) == (exit_code, error_id)
    assert outcome.succeeded is (error_id is None)


def test_unknown_signal_still_named() -> None:
    assert outcome_of(-200).error_id == "KilledBySIG200"


@pytest.mark.parametrize(("returncode", "exit_code"), [(0, 143), (1, 1), (-15, 143), (-9, 137)])
def test_interrupted_runner_never_finishes(returncode: int, exit_code: int) -> None:
    outcome = outcome_of(returncode, interrupted_by=signal.SIGTERM)
    assert outcome.error_id == "Interrupted" and not outcome.succeeded
    assert outcome.exit_code == exit_code
    assert "SIGTERM" in outcome.summary


def test_failure_message_fits_the_crd_limit() -> None:
    assert failure_message("the program exited with code 2", "") == (
        "the program exited with code 2"
    )
    short = failure_message("summary", "  boom\n")
    assert short == "summary; stderr:\nboom"
    long = failure_message("summary", "x" * 10_000 + "END")
    assert len(long) == MESSAGE_LIMIT
    assert long.startswith("summary; stderr:\n") and long.endswith("END")


def test_stderr_tail_is_bounded() -> None:
    tail = StderrTail(limit=100)
    for index in range(10_000):
        tail.append(f"line {index}\n".encode())
        assert tail.held_bytes < 2 * 100
    text = tail.text()
    assert len(text) == 100
    assert text.endswith("line 9999\n")


def test_stderr_tail_huge_chunk_and_short_output() -> None:
    tail = StderrTail(limit=10)
    tail.append(b"abc")
    assert tail.text() == "abc"
    tail.append(b"0123456789" * 1000 + b"XY")
    assert tail.text() == "23456789XY"
    assert tail.held_bytes == 10
    tail.append(b"")
    assert tail.text() == "23456789XY"


def test_stderr_tail_cut_inside_a_character_is_decoded() -> None:
    tail = StderrTail(limit=5)
    tail.append("ééé".encode())  # 6 bytes: the cut falls inside the first é
    assert tail.text().endswith("éé")


def test_default_tail_is_8_kib() -> None:
    assert StderrTail().limit == STDERR_TAIL_BYTES == 8192


# --- the progress file watcher ------------------------------------------------------------


class FakeLease:
    """Records what the wrapper reports; `cancel()` plays a refused heartbeat."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.result: tuple[Any, ...] | None = None
        self.cancel_reason: str | None = None
        self.lost_at_result = False
        self.refuse_progress = False  # play reports refused by a passing error
        self.checkpoint_with_result: dict[str, Any] = {}  # {"checkpoint": ...} when fail got one
        self._canceled = False

    @property
    def canceled(self) -> bool:
        return self._canceled

    def cancel(self, reason: str = "the task was canceled (spec.cancel)") -> None:
        self.cancel_reason = reason
        self._canceled = True

    def progress(self, **report: Any) -> bool:
        if self.refuse_progress:
            return False
        self.reports.append(report)
        return True

    def succeed(self) -> None:
        if self.lost_at_result:
            raise LeaseLost("refused")
        self.result = ("FINISHED",)

    def fail(
        self, error_id: str, message: str, *, stack_trace: str | None = None, **checkpoint: Any
    ) -> None:
        if self.lost_at_result:
            raise LeaseLost("refused")
        self.result = ("FAILED", error_id, message, stack_trace)
        self.checkpoint_with_result = checkpoint


def write(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_watcher_reports_changes_once(tmp_path: Path) -> None:
    path = tmp_path / "progress"
    watcher = ProgressFileWatcher(path)
    assert watcher.poll() is None  # no file yet
    write(path, "1/4\n")
    first = watcher.poll()
    assert first is not None and first.percent == 25.0
    assert watcher.poll() is None  # unchanged
    write(path, "1/4\n")  # rewritten, same content: nothing new to say
    assert watcher.poll() is None
    write(path, "2/4\nhalf\n")
    second = watcher.poll()
    assert second is not None and (second.percent, second.message) == (50.0, "half")


def test_watcher_ignores_stale_content_and_warns_on_garbage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "progress"
    path.write_text("90%\nfrom an earlier run\n")
    watcher = ProgressFileWatcher(path)
    assert watcher.poll() is None
    write(path, "garbage\n")
    with caplog.at_level(logging.WARNING):
        assert watcher.poll() is None
    assert "progress file ignored" in caplog.text
    write(path, "10%\n")
    update = watcher.poll()
    assert update is not None and update.percent == 10.0


def test_report_update_passes_checkpoint_only_when_set() -> None:
    lease = FakeLease()
    report_update(lease, parse_progress("1/2\n\nrows=1\n"))
    report_update(lease, parse_progress("1/2\nmsg\ncheckpoint=null\n"))
    assert lease.reports == [
        {"percent": 50.0, "message": "", "fields": {"rows": "1"}},
        {"percent": 50.0, "message": "msg", "fields": {}, "checkpoint": None},
    ]


# --- a real program under a fake lease ----------------------------------------------------


def run(lease: FakeLease, script: str, **options: Any) -> int:
    options.setdefault("poll_interval_s", 0.1)
    options.setdefault("grace_period_s", 5.0)
    return run_program(lease, ["sh", "-c", script], **options)


def test_success_reports_progress_and_finishes(tmp_path: Path) -> None:
    lease = FakeLease()
    script = (
        'printf "1/4\\nstarting\\n" > "$TASKLEASE_PROGRESS_FILE"; sleep 0.5; '
        'printf "4/4\\ndone\\nrows=40\\ncheckpoint={\\"row\\": 40}\\n" > "$TASKLEASE_PROGRESS_FILE"'
    )
    assert run(lease, script) == 0
    assert lease.result == ("FINISHED",)
    assert lease.reports[0] == {"percent": 25.0, "message": "starting", "fields": {}}
    # The last write came right before the exit: still reported, before the result.
    assert lease.reports[-1] == {
        "percent": 100.0,
        "message": "done",
        "fields": {"rows": "40"},
        "checkpoint": {"row": 40},
    }


def test_failing_exit_carries_the_checkpoint_in_the_failure() -> None:
    lease = FakeLease()
    lease.refuse_progress = True  # the report of the last write is refused: not lost
    script = (
        'printf "3/10\\nfailing\\ncheckpoint={\\"row\\": 30}\\n" > "$TASKLEASE_PROGRESS_FILE"; '
        "exit 1"
    )
    assert run(lease, script) == 1
    assert lease.result is not None and lease.result[:2] == ("FAILED", "ExitCode1")
    assert lease.checkpoint_with_result == {"checkpoint": {"row": 30}}


def test_failing_exit_carries_the_last_checkpoint_the_file_set() -> None:
    lease = FakeLease()
    script = (
        'printf "1/4\\nstarting\\ncheckpoint={\\"row\\": 1}\\n" > "$TASKLEASE_PROGRESS_FILE"; '
        'sleep 0.5; printf "2/4\\nno checkpoint here\\n" > "$TASKLEASE_PROGRESS_FILE"; exit 2'
    )
    assert run(lease, script) == 2
    assert lease.reports[-1] == {
        "percent": 50.0,
        "message": "no checkpoint here",
        "fields": {},
    }
    assert lease.checkpoint_with_result == {"checkpoint": {"row": 1}}


def test_failing_exit_without_a_checkpoint_leaves_the_lease_its_own() -> None:
    lease = FakeLease()
    assert run(lease, 'echo 10% > "$TASKLEASE_PROGRESS_FILE"; exit 1') == 1
    assert lease.result is not None and lease.result[0] == "FAILED"
    assert lease.checkpoint_with_result == {}  # fail() then carries the SDK's newest


def test_progress_file_env_and_temp_dir_cleanup(tmp_path: Path) -> None:
    record = tmp_path / "seen"
    lease = FakeLease()
    assert run(lease, f'echo "${ENV_PROGRESS_FILE}" > {record}') == 0
    progress_path = Path(record.read_text().strip())
    assert progress_path.name == "progress"
    assert not progress_path.parent.exists()  # the wrapper's temp dir is gone


def test_explicit_progress_file_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "mine"
    lease = FakeLease()
    assert run(lease, 'echo 7% > "$TASKLEASE_PROGRESS_FILE"', progress_file=path) == 0
    assert path.read_text() == "7%\n"
    assert lease.reports == [{"percent": 7.0, "message": "", "fields": {}}]


def test_pod_environment_is_passed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEASE_ATTEMPT", "2")
    record = tmp_path / "seen"
    assert run(FakeLease(), f'echo "$TASKLEASE_ATTEMPT" > {record}') == 0
    assert record.read_text() == "2\n"


def test_failure_carries_exit_code_and_stderr_tail(capfd: pytest.CaptureFixture[str]) -> None:
    lease = FakeLease()
    code = run(lease, "echo to-stdout; echo 'disk full' >&2; exit 3")
    assert code == 3
    assert lease.result is not None
    status, error_id, message, stack_trace = lease.result
    assert (status, error_id) == ("FAILED", "ExitCode3")
    assert message == "the program exited with code 3; stderr:\ndisk full"
    assert stack_trace == "disk full\n"
    out, err = capfd.readouterr()
    assert "to-stdout" in out and "disk full" in err  # passed through, as kubectl logs shows


def test_big_stderr_keeps_only_a_tail(capfd: pytest.CaptureFixture[str]) -> None:
    lease = FakeLease()
    script = (
        "i=0; while [ $i -lt 2000 ]; do "
        "echo 'some noisy line of diagnostics, repeated many times over' >&2; i=$((i+1)); done; "
        "echo LAST >&2; exit 1"
    )
    assert run(lease, script) == 1
    assert lease.result is not None
    _, error_id, message, stack_trace = lease.result
    assert error_id == "ExitCode1"
    assert len(message) <= MESSAGE_LIMIT and message.rstrip().endswith("LAST")
    assert len(stack_trace) <= STDERR_TAIL_BYTES and stack_trace.endswith("LAST\n")
    assert capfd.readouterr().err.count("noisy") == 2000  # all of it passed through


def test_killed_by_signal() -> None:
    lease = FakeLease()
    assert run(lease, "kill -KILL $$") == 137
    assert lease.result is not None and lease.result[:2] == ("FAILED", "KilledBySIGKILL")


def test_missing_program() -> None:
    lease = FakeLease()
    code = run_program(lease, [str(Path("/nonexistent/program"))], poll_interval_s=0.1)
    assert code == EXIT_NOT_FOUND
    assert lease.result is not None and lease.result[:2] == ("FAILED", "CommandNotFound")


def test_cancel_stops_the_program_and_reports_nothing() -> None:
    lease = FakeLease()
    threading.Timer(0.5, lease.cancel).start()
    started = time.monotonic()
    assert run(lease, "sleep 30") == EXIT_CANCELED
    assert time.monotonic() - started < 5
    assert lease.result is None


def test_cancel_kills_a_program_that_ignores_sigterm() -> None:
    lease = FakeLease()
    threading.Timer(0.3, lease.cancel).start()
    started = time.monotonic()
    # `sleep` inherits the ignored SIGTERM; only SIGKILL after the grace period ends it.
    assert run(lease, "trap '' TERM; sleep 30; sleep 30", grace_period_s=1.0) == EXIT_CANCELED
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 6, elapsed
    assert lease.result is None


def test_lost_lease_at_the_end_reports_nothing() -> None:
    lease = FakeLease()
    lease.lost_at_result = True
    assert run(lease, "exit 0") == EXIT_CANCELED


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="needs the main thread"
)
def test_sigterm_is_forwarded_and_never_finishes(capfd: pytest.CaptureFixture[str]) -> None:
    lease = FakeLease()
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    script = "trap 'echo got-TERM >&2; exit 0' TERM; while :; do sleep 0.1; done"
    assert run(lease, script) == 143  # it exited 0, but it was told to stop
    assert lease.result is not None
    _, error_id, message, _ = lease.result
    assert error_id == "Interrupted"
    assert "SIGTERM" in message and "got-TERM" in message
    # The handler was restored: pytest's own SIGTERM handling is back.
    assert signal.getsignal(signal.SIGTERM) is not None


# --- command line -------------------------------------------------------------------------


def test_usage_errors() -> None:
    with pytest.raises(SystemExit) as no_program:
        main(["--"])
    assert no_program.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as negative:
        main(["--grace-period", "-1", "--", "true"])
    assert negative.value.code == EXIT_USAGE


def test_outside_a_runner_pod_refuses_to_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLEASE_")}
    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-m", "tasklease", "run", "--", "touch", str(marker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "TASKLEASE_TASK" in done.stderr
    assert not marker.exists()


def test_command_line_options_reach_run_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def fake_run_wrapped(argv: list[str], **options: Any) -> int:
        calls.append((list(argv), options))
        return 7

    monkeypatch.setattr("tasklease.runner.wrapper.run_wrapped", fake_run_wrapped)
    monkeypatch.delenv(ENV_PROGRESS_FILE, raising=False)
    argv = ["--grace-period", "3", "--progress-file", "/p", "--", "sh", "-c", "exit 1", "--x"]
    assert main(argv) == 7
    assert main(["--", "prog", "--progress-file", "not-ours"]) == 7
    monkeypatch.setenv(ENV_PROGRESS_FILE, "/an/outer/wrapper's")  # not inherited as ours
    assert main(["prog", "arg"]) == 7
    assert calls == [
        (["sh", "-c", "exit 1", "--x"], {"progress_file": "/p", "grace_period_s": 3.0}),
        (["prog", "--progress-file", "not-ours"], {"progress_file": None, "grace_period_s": 10.0}),
        (["prog", "arg"], {"progress_file": None, "grace_period_s": 10.0}),
    ]
