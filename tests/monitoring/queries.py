"""The PromQL the chart ships, as the tests read it: the alert rules of
charts/tasklease/files/alerts.yaml and the queries of its Grafana dashboard
(files/dashboard.json), with the selectors inside each expression.

The selectors are found by a pattern, not a PromQL parser (Debian's Prometheus 2.42 has no
parse endpoint): a metric named `tasklease_*`, `process_*` or `up`, with its `{...}` matchers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "tasklease"
ALERTS_FILE = CHART / "files" / "alerts.yaml"
DASHBOARD_FILE = CHART / "files" / "dashboard.json"
ALERTS_TEST_FILE = Path(__file__).with_name("alerts_test.yaml")
MONITORING_DOC = REPO_ROOT / "docs" / "monitoring.md"

# What Grafana puts in for the dashboard's variables when the query runs elsewhere.
DASHBOARD_VARIABLES = {"$namespace": ".*", "$__rate_interval": "1m"}

_SELECTOR = re.compile(
    r"\b(?P<name>(?:tasklease|process)_[A-Za-z0-9_]+|up)\b\s*(?P<matchers>\{[^}]*\})?"
)


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    expr: str  # as the dashboard has it, with its variables

    @property
    def concrete(self) -> str:
        """The expression with the dashboard's variables filled in."""
        expr = self.expr
        for variable, value in DASHBOARD_VARIABLES.items():
            expr = expr.replace(variable, value)
        if "$" in expr:
            raise ValueError(f"panel {self.panel!r}: a variable the tests do not know: {expr}")
        return expr


def alerts() -> list[Alert]:
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    return [
        Alert(
            rule["alert"],
            rule["expr"],
            rule.get("labels") or {},
            rule.get("annotations") or {},
        )
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return loaded


def panel_queries() -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def selectors(expr: str) -> list[str]:
    """Each distinct selector in `expr` (`name{matchers}` as written), in order."""
    found = [m.group("name") + (m.group("matchers") or "") for m in _SELECTOR.finditer(expr)]
    return list(dict.fromkeys(found))


def metric_names(expr: str) -> set[str]:
    return {m.group("name") for m in _SELECTOR.finditer(expr)}
