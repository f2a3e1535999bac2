"""The dashboard's queries and the alert rules against a real Prometheus scraping a real
operator: every query evaluates, and every metric it names has data.

Prometheus is Debian's (`/usr/bin/prometheus`, package `prometheus`, which `make node-deps`
installs as root); it scrapes the operator every second and evaluates the chart's rule file
(charts/tasklease/files/alerts.yaml) every second. The operator hands a Task out, takes it
back when nobody acknowledges (AckTimeout), hands it out again and sees the new runner's
reports; a tight client-side rate limit makes its requests wait, so the throttling series
have data too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasklease.controlplane.cluster import free_port
from tests.integration.support import Cluster, OperatorProcess, scrape, wait_for
from tests.monitoring.prometheus import Prometheus, assert_every_query_has_data, running_prometheus

pytestmark = pytest.mark.cluster

# What Prometheus has once it scraped the operator after the reassignment and the second
# runner's acknowledgement.
SCRAPED_WHEN_RUNNING = (
    'tasklease_reassignments_total{job="tasklease", reason="AckTimeout"} >= 1',
    'tasklease_report_age_seconds_count{job="tasklease"} == 1',
    'tasklease_api_throttle_seconds_count{job="tasklease", budget="requests"} > 0',
)


@pytest.fixture
def prometheus(tmp_path: Path, operator_metrics_port: int) -> Iterator[Prometheus]:
    with running_prometheus(tmp_path, f"127.0.0.1:{operator_metrics_port}") as running:
        yield running


@pytest.fixture
def operator_metrics_port() -> int:
    return free_port()


def _value(result: list[dict[str, Any]]) -> float:
    (sample,) = result
    return float(sample["value"][1])


def test_dashboard_and_alert_queries_return_data(
    control_plane: Any,
    cluster: Cluster,
    tmp_path: Path,
    operator_metrics_port: int,
    prometheus: Prometheus,
) -> None:
    operator = OperatorProcess(
        kubeconfig=control_plane.kubeconfig,
        namespace=cluster.namespace,
        log_path=tmp_path / "operator.log",
        metrics_port=operator_metrics_port,
        # Five requests a second, one at a time: a hand-out's requests wait for the budget.
        extra_env={"TASKLEASE_API_QPS": "5", "TASKLEASE_API_BURST": "1"},
    ).start()
    try:
        wait_for(
            "the operator's metrics endpoint",
            lambda: scrape(operator_metrics_port),
            timeout=30,
            retrying=(OSError,),
        )
        wait_for(
            "Prometheus to see every informer synced",
            lambda: prometheus.query('min(tasklease_informer_synced{job="tasklease"}) == 1'),
            timeout=30,
        )

        cluster.create_task("watched", ackTimeout="2s", reportProgressTimeout="30s")
        cluster.wait_epoch("watched", 1)
        cluster.wait_epoch("watched", 2, timeout=30)  # nobody acknowledged: reassigned
        with cluster.runner("watched", epoch=2):  # acknowledges, then reports every second
            cluster.wait_phase("watched", "Running")
            wait_for(
                "Prometheus to have scraped the reassignment, the Running lease and a wait for "
                "the rate limit",
                lambda: all(prometheus.query(expr) for expr in SCRAPED_WHEN_RUNNING),
                timeout=30,
            )
            assert _value(prometheus.query('tasklease_handouts_total{job="tasklease"}')) == 2

            assert_every_query_has_data(prometheus)
        cluster.wait_phase("watched", "Succeeded")
    finally:
        operator.stop()
