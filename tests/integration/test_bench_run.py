"""`python -m bench.run` end to end at a tiny N, so that `make bench` cannot rot between the
runs that measure (its figures are never asserted on: on 40 Tasks they mean nothing). What
must hold at any N is asserted: it exits 0, its last line is the JSON object with every key,
every stopped runner was replaced and no live one was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.context import REPO_ROOT
from bench.report import RESULT_KEYS

pytestmark = pytest.mark.cluster

TASKS = 40
VICTIMS_PERCENT = 10


def test_the_bench_runs_every_phase_and_ends_with_its_json_line(tmp_path: Path) -> None:
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            f"--tasks={TASKS}",
            "--heartbeat-interval=2",
            "--timeout=10",
            "--window=6",
            "--push-seconds=2",
            "--push-rounds=2",
            f"--victims-percent={VICTIMS_PERCENT}",
            f"--output-dir={tmp_path}",
            "--heartbeat-cost-writes=100",
            "--heartbeat-cost-rounds=1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    figures = json.loads(finished.stdout.strip().splitlines()[-1])
    assert list(figures) == list(RESULT_KEYS)
    assert figures["tasks"] == TASKS
    assert figures["false_reassignments"] == 0
    assert figures["restart_false_reassignments"] == 0
    for measured in (
        "operator_cpu_ms_per_1k_heartbeats",
        "apiserver_cpu_ms_per_1k_heartbeats",
        "handout_per_s",
        "job_controller_pods_per_s",
        "detection_p99_s",
        "restart_resume_s",
        "apiserver_cpu_ms_per_heartbeat",
        "apiserver_cpu_ms_per_lease_renewal",
        "heartbeat_cost_vs_lease",
        "heartbeat_cost_vs_lease_small",
    ):
        assert isinstance(figures[measured], float | int), measured
    notes = json.loads((tmp_path / "details.json").read_text())["notes"]
    assert notes["detection_samples"] == TASKS * VICTIMS_PERCENT // 100
    assert "detection_not_replaced" not in notes
    # The hand-out's requests as the operator counted them: a lease write and a pod per Task.
    requests = notes["operator_requests_in_handout"]
    assert requests["POST pods"]["count"] >= TASKS
    assert (tmp_path / "operator.log").exists()
