"""A real Prometheus for the tests: Debian's (`/usr/bin/prometheus`, package `prometheus`,
which `make node-deps` installs as root), scraping one operator every second and evaluating
the chart's rule file every second; and the check that every query the chart ships has data
on it (tests/integration/test_monitoring_queries.py on an operator process,
tests/e2e/test_real_node.py on the chart-installed operator pod)."""

from __future__ import annotations

import contextlib
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
from tests.monitoring.queries import ALERTS_FILE, alerts, panel_queries, selectors
from tests.waiting import wait_for

SCRAPE_INTERVAL = "1s"


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


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    """Prometheus scraping `target` (HOST:PORT) as job `tasklease`, its data in `tmp_path`."""
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
                        "static_configs": [{"targets": [target]}],
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


def assert_every_query_has_data(prometheus: Prometheus) -> None:
    """Every dashboard query has data (a quantile of no observations is NaN, and still a
    sample); every alert expression evaluates, and each selector it compares has data (the
    comparisons are empty while all is well); Prometheus evaluates every rule without an
    error, and neither TaskleaseOperatorDown nor TaskleaseNotLeading is active."""
    empty = [
        (query.panel, query.concrete)
        for query in panel_queries()
        if not prometheus.query(query.concrete)
    ]
    assert not empty, f"dashboard queries without data: {empty}"
    for alert in alerts():
        prometheus.query(alert.expr)
        for selector in selectors(alert.expr):
            assert prometheus.query(selector), f"{alert.name}: no data for {selector}"

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.get("/api/v1/rules", type="alert")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        # Not yet evaluated: Go's zero time, 0001-01-01T00:00:00Z.
        evaluated = all(not rule.get("lastEvaluation", "0001").startswith("0001") for rule in rules)
        return rules if rules and evaluated else None

    rules = wait_for("every rule to have been evaluated", rules_evaluated)
    assert {rule["name"] for rule in rules} == {alert.name for alert in alerts()}
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not unhealthy, unhealthy
    states = {rule["name"]: rule["state"] for rule in rules}
    assert states["TaskleaseOperatorDown"] == "inactive", states
    assert states["TaskleaseNotLeading"] == "inactive", states
