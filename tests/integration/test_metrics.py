"""The operator's Prometheus endpoint, scraped while it hands out and reassigns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasklease.controlplane.cluster import free_port
from tasklease.controlplane.scrape import sample_key
from tests.integration.support import Cluster, OperatorProcess, scrape, wait_for

pytestmark = pytest.mark.cluster


def test_metrics_exposed(control_plane: Any, cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    operator = OperatorProcess(
        kubeconfig=control_plane.kubeconfig,
        namespace=cluster.namespace,
        log_path=tmp_path / "operator.log",
        metrics_port=port,
    ).start()
    try:
        wait_for("the metrics endpoint", lambda: scrape(port), timeout=30, retrying=(OSError,))
        synced = {
            sample_key("tasklease_informer_synced", namespace=cluster.namespace, resource=resource)
            for resource in ("tasks", "pods", "leases")
        }

        def listed() -> dict[str, float] | None:
            samples = scrape(port)
            return samples if all(samples.get(name) == 1 for name in synced) else None

        before = wait_for("every informer to have listed", listed)
        assert before["tasklease_handouts_total"] == 0

        cluster.create_task("counted", ackTimeout="2s", reportProgressTimeout="30s")
        cluster.wait_epoch("counted", 1)
        assert scrape(port)["tasklease_handouts_total"] == 1
        assert scrape(port)[sample_key("tasklease_tasks", phase="Assigned")] == 1

        cluster.wait_epoch("counted", 2, timeout=20)  # nobody acknowledged: reassigned

        # The attempt's end and the next hand-out are two executed decisions: wait for both.
        def reassigned() -> dict[str, float] | None:
            samples = scrape(port)
            counted = (
                samples.get("tasklease_handouts_total") == 2
                and samples.get("tasklease_reassignment_delay_seconds_count") == 1
            )
            return samples if counted else None

        after = wait_for("the reassignment and the new hand-out to be counted", reassigned)
        assert after[sample_key("tasklease_reassignments_total", reason="AckTimeout")] == 1
        assert after["tasklease_handouts_total"] == 2
        assert after[sample_key("tasklease_attempts_ended_total", outcome="AckTimeout")] == 1
        assert after["tasklease_reassignment_delay_seconds_count"] == 1
        assert after["tasklease_reassignment_delay_seconds_sum"] < 5
        duration = sample_key("tasklease_attempt_duration_seconds_count", outcome="AckTimeout")
        assert after[duration] == 1
        # The operator's part of that delay, and the API server's answers it waited for.
        assert after["tasklease_expiry_decision_delay_seconds_count"] == 1
        assert (
            after["tasklease_expiry_decision_delay_seconds_sum"]
            <= after["tasklease_reassignment_delay_seconds_sum"]
        )

        def requests(verb: str, resource: str, code: str) -> str:
            return sample_key(
                "tasklease_api_request_duration_seconds_count",
                verb=verb,
                resource=resource,
                code=code,
            )

        deleted = requests("DELETE", "pods", "200")
        events = requests("POST", "events", "201")

        def answered() -> dict[str, float] | None:
            # The old pod's deletion and the Events are made in the background.
            samples = scrape(port)
            return samples if samples.get(deleted, 0) >= 1 and samples.get(events, 0) >= 3 else None

        writes = wait_for("the background requests to be answered", answered)
        assert writes[requests("POST", "pods", "201")] == 2
        # Two leases written (epochs 1 and 2), the attempt's first pod deleted once.
        assert writes[requests("PATCH", "tasks", "200")] == 2
        assert writes[deleted] == 1
        assert writes[requests("PATCH", "tasks/status", "200")] >= 2

        with cluster.runner("counted", epoch=2) as runner:
            cluster.wait_phase("counted", "Running")
            running = scrape(port)
            assert running[sample_key("tasklease_tasks", phase="Running")] == 1
            assert running["tasklease_report_age_seconds_count"] == 1
            runner.progress(percent=100)
        cluster.wait_phase("counted", "Succeeded")

        def succeeded() -> dict[str, float] | None:
            samples = scrape(port)
            return (
                samples if samples.get(sample_key("tasklease_tasks", phase="Succeeded")) else None
            )

        done = wait_for("the success to be counted", succeeded)
        assert done[sample_key("tasklease_attempts_ended_total", outcome="Succeeded")] == 1
    finally:
        operator.stop()
