"""The chart's Artifact Hub metadata (`Chart.yaml` annotations) says what the chart holds: the
CRDs it installs, examples the models accept, the image it runs by default, the project's
license. Artifact Hub reads each of these annotations as a YAML string."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
import yaml

from tasklease.api.models import Task
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "charts" / "tasklease"
# https://artifacthub.io/docs/topics/annotations/helm/
CAPABILITIES = (
    "Basic Install",
    "Seamless Upgrades",
    "Full Lifecycle",
    "Deep Insights",
    "Auto Pilot",
)


@pytest.fixture(scope="module")
def chart() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return loaded


def annotation(chart: dict[str, Any], key: str) -> Any:
    value = chart["annotations"][f"artifacthub.io/{key}"]
    assert isinstance(value, str), f"Artifact Hub reads artifacthub.io/{key} as a string"
    return yaml.safe_load(value)


def chart_crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted((CHART / "crds").glob("*.yaml"))]


def test_an_operator_with_a_license_and_a_capability_level(chart: dict[str, Any]) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert chart["annotations"]["artifacthub.io/license"] == project["license"]
    assert chart["annotations"]["artifacthub.io/operator"] == "true"
    assert chart["annotations"]["artifacthub.io/operatorCapabilities"] in CAPABILITIES


def test_crds_annotation_lists_the_crds_the_chart_installs(chart: dict[str, Any]) -> None:
    listed = {(crd["kind"], crd["version"], crd["name"]) for crd in annotation(chart, "crds")}
    installed = {
        (crd["spec"]["names"]["kind"], version["name"], crd["metadata"]["name"])
        for crd in chart_crds()
        for version in crd["spec"]["versions"]
        if version["served"]
    }
    assert listed == installed
    for crd in annotation(chart, "crds"):
        assert crd["displayName"] and crd["description"], crd


def test_crd_examples_are_tasks_the_models_accept(chart: dict[str, Any]) -> None:
    examples = annotation(chart, "crdsExamples")
    kinds = {(crd["kind"], crd["version"]) for crd in annotation(chart, "crds")}
    assert {(e["kind"], e["apiVersion"].rsplit("/", 1)[1]) for e in examples} == kinds
    for example in examples:
        task = Task.model_validate(example)
        assert task.spec.template is not None, "an example a user can apply as it is"
        (container,) = task.spec.template["spec"]["containers"]
        assert container["image"] == default_image(chart)


def default_image(chart: dict[str, Any]) -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"


def test_images_annotation_names_the_default_image(chart: dict[str, Any]) -> None:
    images = annotation(chart, "images")
    assert [image["image"] for image in images] == [default_image(chart)]


def test_links_are_named_https_urls(chart: dict[str, Any]) -> None:
    links = annotation(chart, "links")
    assert links
    for link in links:
        assert link["name"] and link["url"].startswith("https://"), link
