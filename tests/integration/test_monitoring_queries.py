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

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasklease.controlplane.cluster import free_port
from tasklease.controlplane.process import Child
from tests.integration.support import Cluster, OperatorProcess, scrape, wait_for
from tests.monitoring.queries import ALERTS_FILE, alerts, panel_queries, selectors

pytestmark = pytest.mark.cluster

SCRAPE_INTERVAL = "1s"
# What Prometheus has once it scraped the operator after the reassignment and the second
# runner's acknowledgement.
SCRAPED_WHEN_RUNNING = (
    'tasklease_reassignments_total{job="tasklease", reason="AckTimeout"} >= 1',
    'tasklease_report_age_seconds_count{job="tasklease"} == 1',
    'tasklease_api_throttle_seconds_count{job="tasklease", budget="requests"} > 0',
)


class Prometheus:
    """Prometheus' HTTP API on a local port."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as answer:
                body = answer.read()
        except urllib.error.HTTPError as error:  # a bad query: 400 with the reason as JSON
            body = error.read()
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise AssertionError(f"{path} {params}: {reply.get('error', reply)}")
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as answer:
            status: int = answer.status
            return status == 200


@pytest.fixture
def prometheus(tmp_path: Path, operator_metrics_port: int) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus is missing: it comes with Debian's `prometheus` package "
            "(`make node-deps` as root, or `apt-get install prometheus`)"
        )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": SCRAPE_INTERVAL,
                    "evaluation_interval": SCRAPE_INTERVAL,
                },
                "rule_files": [str(ALERTS_FILE)],
                "scrape_configs": [
                    {
                        "job_name": "tasklease",
                        "static_configs": [{"targets": [f"127.0.0.1:{operator_metrics_port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    server = Child.start(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        log_path=tmp_path / "prometheus.log",
    )
    try:
        api = Prometheus(port)

        def ready() -> bool:
            if not server.running:
                raise AssertionError(f"prometheus exited:\n{server.tail()}")
            return api.ready()

        wait_for("Prometheus to be ready", ready, retrying=(OSError,))
        yield api
    finally:
        server.stop()


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

            # Every panel's query has data: each one shows something once a Task was handed
            # out, reassigned and reported on (a quantile of no observations is NaN, and
            # still a sample).
            empty = [
                (query.panel, query.concrete)
                for query in panel_queries()
                if not prometheus.query(query.concrete)
            ]
            assert not empty, f"dashboard queries without data: {empty}"

            # Every alert expression evaluates; most are comparisons that are empty while
            # all is well (and `absent()` of a present series is), so what must have data is
            # each selector they compare.
            for alert in alerts():
                prometheus.query(alert.expr)
                for selector in selectors(alert.expr):
                    assert prometheus.query(selector), f"{alert.name}: no data for {selector}"

            # Prometheus loaded the rule file and evaluates each rule without an error.
            def rules_evaluated() -> list[dict[str, Any]] | None:
                groups = prometheus.get("/api/v1/rules", type="alert")["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                # Not yet evaluated: Go's zero time, 0001-01-01T00:00:00Z.
                evaluated = all(
                    not rule.get("lastEvaluation", "0001").startswith("0001") for rule in rules
                )
                return rules if rules and evaluated else None

            rules = wait_for("every rule to have been evaluated", rules_evaluated)
            assert {rule["name"] for rule in rules} == {alert.name for alert in alerts()}
            unhealthy = [
                (rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"
            ]
            assert not unhealthy, unhealthy
            states = {rule["name"]: rule["state"] for rule in rules}
            assert states["TaskleaseOperatorDown"] == "inactive", states
            assert states["TaskleaseNotLeading"] == "inactive", states
        cluster.wait_phase("watched", "Succeeded")
    finally:
        operator.stop()
