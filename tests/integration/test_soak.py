"""A short soak (`make soak` runs longer ones): traffic of every shape under random faults
(runners stopped, killed and resumed as zombies; the node cut off from the API server;
operator replicas killed, also at failpoints inside a hand-out; the API server restarted),
judged by the invariants over the API server's audit log (soak/checker.py)."""

from __future__ import annotations

import pytest

from soak.run import Config, run, table

pytestmark = pytest.mark.cluster


def test_short_soak_has_no_violations(control_plane_binaries: object) -> None:
    config = Config(
        tasks=16,
        seconds=25.0,
        operator_kills=2,
        apiserver_restarts=1,
        node_partitions=1,
        runner_faults=6,
        failpoint_probability=0.05,
        settle_timeout_s=120.0,
        seed=20261206,
    )
    outcome = run(config)
    summary = outcome.summary(config)
    details = "\n".join(f"{v.invariant} {v.task}: {v.detail}" for v in outcome.report.violations)
    assert outcome.report.violations == [], f"{table(summary)}\n{details}"
    assert summary["tasks_not_final"] == 0
    assert summary["accepted_runner_writes"] > 0  # the traffic ran
    assert sum(outcome.faults.values()) >= 6, outcome.faults  # and the faults were injected
