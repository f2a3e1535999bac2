"""The monitoring the chart ships (charts/tasklease/files/alerts.yaml and dashboard.json),
checked without a cluster: the alert rules under promtool's unit tests, each alert with its
runbook in docs/monitoring.md, each dashboard panel described there, and every metric they
name one that the operator exports.

promtool comes from Debian's `prometheus` package (`make node-deps` installs it as root).
Without it the promtool test skips and says so; in CI a skip is a failure (tests/conftest.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable

import pytest
import yaml

from tasklease.api.models import Phase
from tasklease.operator.metrics import OperatorMetrics
from tests.monitoring.queries import (
    ALERTS_FILE,
    ALERTS_TEST_FILE,
    MONITORING_DOC,
    alerts,
    dashboard,
    metric_names,
    panel_queries,
)
from tests.unit.test_metrics import FakeInformer, FakeWorkload

RUNBOOK_PREFIX = "docs/monitoring.md#"
# Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is missing: it comes with Debian's `prometheus` package "
            "(`make node-deps` as root, or `apt-get install prometheus`)"
        )
    return path


def _promtool_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_alert_rules_fire_and_stay_quiet() -> None:
    checked = _promtool_run("check", "rules", str(ALERTS_FILE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout, checked.stdout

    tested = _promtool_run("test", "rules", str(ALERTS_TEST_FILE))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout

    # promtool tests only the alerts a case names, and an alert that does not exist simply
    # never fires: so every alert must have a case where it fires and one where it does not,
    # and every case must name an alert that exists.
    suite = yaml.safe_load(ALERTS_TEST_FILE.read_text())
    assert [(ALERTS_TEST_FILE.parent / path).resolve() for path in suite["rule_files"]] == [
        ALERTS_FILE.resolve()
    ]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert.name for alert in alerts()}
    assert not names - fires, f"no test makes these alerts fire: {sorted(names - fires)}"
    assert not names - quiet, f"no test keeps these alerts quiet: {sorted(names - quiet)}"
    assert not (fires | quiet) - names, f"tests of no alert: {sorted((fires | quiet) - names)}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces as '-'."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    }


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    anchors = _anchors(MONITORING_DOC.read_text())
    for alert in alerts():
        assert alert.labels.get("severity") in {"critical", "warning"}, alert.name
        assert alert.annotations.get("summary") and alert.annotations.get("description")
        runbook = alert.annotations.get("runbook", "")
        assert runbook == RUNBOOK_PREFIX + alert.name.lower(), f"{alert.name}: {runbook!r}"
        assert runbook.removeprefix(RUNBOOK_PREFIX) in anchors, f"no section for {alert.name}"


def test_every_dashboard_panel_is_described_in_the_docs() -> None:
    doc = MONITORING_DOC.read_text()
    panels = dashboard()["panels"]
    assert panels
    for panel in panels:
        assert f"- **{panel['title']}**:" in doc, f"docs/monitoring.md: no line for {panel}"
        assert panel["targets"], panel["title"]
        sources = [panel["datasource"], *(target["datasource"] for target in panel["targets"])]
        assert all(source["uid"] == "${datasource}" for source in sources), panel["title"]


class _FakeCache:
    def phase_counts(self) -> dict[Phase, int]:
        return {}

    def overdue_counts(self) -> dict[Phase, int]:
        return {}

    def report_ages(self) -> Iterable[float]:
        return []


def _exported_families() -> dict[str, str]:
    """Every metric family the operator's /metrics can carry: its name and type."""
    metrics = OperatorMetrics()
    metrics.attach(_FakeCache())
    metrics.attach_workload(FakeWorkload([FakeInformer("tasks", None)]))
    return {family.name: family.type for family in metrics.registry.collect()}


def _series_names(families: dict[str, str]) -> set[str]:
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gaugehistogram": ("_bucket", "_count", "_sum"),
    }
    return {
        name + suffix for name, kind in families.items() for suffix in suffixes.get(kind, ("",))
    }


def test_rules_and_dashboard_name_only_metrics_the_operator_exports() -> None:
    families = _exported_families()
    exported = _series_names(families) | PROMETHEUS_SERIES
    assert {"process_start_time_seconds", "process_resident_memory_bytes"} <= exported
    named = {(alert.name, name) for alert in alerts() for name in metric_names(alert.expr)}
    named |= {(q.panel, name) for q in panel_queries() for name in metric_names(q.concrete)}
    unknown = sorted((where, name) for where, name in named if name not in exported)
    assert not unknown, f"metrics the operator does not export: {unknown}"

    on_dashboard = {name for q in panel_queries() for name in metric_names(q.concrete)}
    missing = {
        family
        for family in families
        if family.startswith("tasklease_")
        and not any(name in _series_names({family: families[family]}) for name in on_dashboard)
    }
    assert not missing, f"tasklease metrics on no dashboard panel: {sorted(missing)}"
