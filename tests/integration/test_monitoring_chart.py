"""The chart's monitoring templates: nothing unless asked for; when asked, the ServiceMonitor
finds the metrics Service, and the PrometheusRule and the dashboard ConfigMap carry
files/alerts.yaml and files/dashboard.json exactly (helm must not template their `{{ }}`).

The Prometheus operator's CRDs are not installed on the test control plane, so only the
ConfigMap goes through a server-side dry run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.chart_support import CHART, Helm
from tests.monitoring.queries import ALERTS_FILE, DASHBOARD_FILE
from tests.readme import readme_block

pytestmark = pytest.mark.cluster

MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule", "ConfigMap"}

ALL_MONITORING: dict[str, Any] = {
    "monitoring": {
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "10s",
            "labels": {"release": "kube-prometheus-stack"},
        },
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "dashboard": {
            "enabled": True,
            "namespace": "",
            "labels": {"grafana_dashboard": "1"},
            "annotations": {"grafana_folder": "Operators"},
        },
    }
}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def test_monitoring_renders_nothing_by_default(helm: Helm, tmp_path: Path) -> None:
    docs = helm.template("tl", "ops", {}, tmp_path)
    assert not MONITORING_KINDS & {doc["kind"] for doc in docs}


def test_the_readmes_monitoring_values_render_all_three(helm: Helm, tmp_path: Path) -> None:
    values = yaml.safe_load(
        readme_block(
            "<!-- tests/integration/test_monitoring_chart.py renders these values -->", "yaml"
        )
    )
    docs = helm.template("tl", "ops", values, tmp_path)
    kinds = {doc["kind"] for doc in docs if doc["kind"] in MONITORING_KINDS}
    assert kinds == MONITORING_KINDS
    (dashboard,) = [
        d for d in docs if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]
    ]
    assert dashboard["metadata"]["namespace"] == "monitoring"


def test_monitoring_renders_the_chart_files_as_they_are(
    helm: Helm, kubectl: Any, namespace: str, tmp_path: Path
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(ALL_MONITORING))
    linted = helm("lint", "--strict", str(CHART), "-f", str(values_file), check=False)
    assert linted.returncode == 0, linted.stdout + linted.stderr

    docs = helm.template("tl", namespace, ALL_MONITORING, tmp_path)

    monitor = _one(docs, "ServiceMonitor")
    service = _one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert (endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == (
        "/metrics",
        "15s",
        "10s",
    )
    # The rules and the dashboard select job="tasklease", whatever the release is called.
    assert {"action": "replace", "targetLabel": "job", "replacement": "tasklease"} in endpoint[
        "relabelings"
    ]

    rule = _one(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(ALERTS_FILE.read_text())
    assert "{{ $labels.outcome }}" in json.dumps(rule["spec"])  # Prometheus' template, kept

    configmap = _one(docs, "ConfigMap")
    assert configmap["metadata"]["namespace"] == namespace
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Operators"}
    (key,) = configmap["data"]
    assert key.endswith(".json")
    assert json.loads(configmap["data"][key]) == json.loads(DASHBOARD_FILE.read_text())

    applied = kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(configmap), check=False
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr


def test_dashboard_configmap_goes_to_grafanas_namespace(helm: Helm, tmp_path: Path) -> None:
    values = {"monitoring": {"dashboard": {"enabled": True, "namespace": "grafana"}}}
    docs = helm.template("tl", "ops", values, tmp_path)
    assert _one(docs, "ConfigMap")["metadata"]["namespace"] == "grafana"
    assert not {"ServiceMonitor", "PrometheusRule"} & {doc["kind"] for doc in docs}


def test_monitoring_values_are_checked(helm: Helm) -> None:
    cases = {
        ("monitoring.serviceMonitor.enabled=true", "metrics.service.enabled=false"): (
            "monitoring.serviceMonitor.enabled needs metrics.service.enabled"
        ),
        ("monitoring.serviceMonitor.interval=soon",): "interval",
        ("monitoring.dashboard.labels.grafana_dashboard=1",): "grafana_dashboard",
        ("monitoring.grafana=true",): "additional properties 'grafana' not allowed",
    }
    for settings, expected in cases.items():
        args = [arg for setting in settings for arg in ("--set", setting)]
        result = helm("template", "x", str(CHART), *args, check=False)
        assert result.returncode != 0, f"{settings} was accepted"
        assert expected in result.stderr, f"{settings}: {result.stderr}"
