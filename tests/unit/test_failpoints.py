"""Failpoints are inert unless the environment arms them, and an armed one kills the process
at once, with no cleanup (as `kill -9` does)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasklease.operator.failpoints import AFTER_LEASE_WRITE, _armed

PROGRAM = (
    "import atexit; from tasklease.operator import failpoints;"
    "atexit.register(lambda: print('cleanup ran'));"
    "failpoints.reached(failpoints.AFTER_LEASE_WRITE); print('went on')"
)


def run(setting: str | None) -> subprocess.CompletedProcess[str]:
    env = {} if setting is None else {"TASKLEASE_FAILPOINTS": setting}
    return subprocess.run(
        [sys.executable, "-c", PROGRAM],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_an_unarmed_failpoint_does_nothing() -> None:
    result = run(None)
    assert result.returncode == 0 and "went on" in result.stdout


def test_an_armed_failpoint_dies_like_a_kill() -> None:
    result = run(f"{AFTER_LEASE_WRITE}=1")
    assert result.returncode == 137
    assert "went on" not in result.stdout and "cleanup ran" not in result.stdout


def test_a_probability_of_zero_never_fires() -> None:
    assert run(f"{AFTER_LEASE_WRITE}=0").returncode == 0


def test_an_unknown_failpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown failpoint"):
        _armed("before-everything=0.5")
    assert _armed("after-pod-create=0.25, after-status-write") == {
        "after-pod-create": 0.25,
        "after-status-write": 1.0,
    }
