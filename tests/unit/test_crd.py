"""The Task CRD rendered from the models: in sync, structural, documented, defaulted."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasklease.api.crd import (
    HEADER,
    MANIFEST_PATHS,
    SchemaConversionError,
    check_manifests,
    find_repository_root,
    main,
    render_crd,
    structural_schema,
    write_manifests,
)
from tasklease.api.durations import GO_DURATION_PATTERN, WHOLE_MILLISECONDS_RULE
from tasklease.api.models import (
    MAX_PARAMETER_NAME_LENGTH,
    MAX_PARAMETERS,
    MAX_PARAMETERS_BYTES,
    POSITIVE_DURATION_RULE,
    RetryPolicy,
    TaskSpec,
    TaskStatus,
)

ROOT = Path(__file__).resolve().parents[2]

TEMPLATE = {"spec": {"containers": [{"name": "runner", "image": "busybox"}]}}

# What a structural schema node may carry (apiextensions v1 JSONSchemaProps, the subset a
# structural schema allows).
ALLOWED_KEYS = {
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
}


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    [version] = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below `node` (itself included), with its field path."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")


def all_keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield key
            yield from all_keys(child)
    elif isinstance(value, list):
        for child in value:
            yield from all_keys(child)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: absent fields get their schema's
    default, then defaulting continues inside every object that now exists."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    result = dict(value)
    for name, child in schema["properties"].items():
        if name not in result and "default" in child:
            result[name] = copy.deepcopy(child["default"])
        if name in result:
            result[name] = apply_defaults(child, result[name])
    return result


def without_empty(value: Any) -> Any:
    """A pydantic dump minus unset fields (None) and empty collections, which the API
    server would not materialise."""
    if isinstance(value, dict):
        pruned = {key: without_empty(child) for key, child in value.items() if child is not None}
        return {key: child for key, child in pruned.items() if child not in ({}, [])}
    return value


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return render_crd()


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return openapi_schema(crd)


# --- in sync -------------------------------------------------------------------------------


def test_committed_manifests_equal_the_rendered_crd(crd: dict[str, Any]) -> None:
    for relative in MANIFEST_PATHS:
        path = ROOT / relative
        assert path.is_file(), f"{relative} is missing. Run `make manifests` to generate it."
        committed = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert committed == crd, (
            f"{relative} differs from the models in operator/tasklease/api/models.py. "
            "Run `make manifests` to regenerate it."
        )
    assert check_manifests(ROOT) == [], (
        "The committed CRD manifests are not byte-for-byte what the models render. "
        "Run `make manifests` to regenerate them."
    )


def test_manifests_start_with_the_generated_header() -> None:
    for relative in MANIFEST_PATHS:
        text = (ROOT / relative).read_text(encoding="utf-8")
        assert text.startswith(HEADER)
        assert "Do not edit." in text.splitlines()[0]


def test_check_names_the_drifted_files_and_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "crds").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    written = write_manifests(tmp_path)
    assert written == [tmp_path / relative for relative in MANIFEST_PATHS]
    assert check_manifests(tmp_path) == []
    assert main(["--check", "--root", str(tmp_path)]) == 0

    chart_copy = tmp_path / MANIFEST_PATHS[1]
    chart_copy.write_text(chart_copy.read_text() + "# edited by hand\n")
    assert check_manifests(tmp_path) == [MANIFEST_PATHS[1].as_posix()]
    assert main(["--check", "--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.strip() == (
        f"CRD manifests are stale: {MANIFEST_PATHS[1].as_posix()}. "
        "Run `make manifests` to regenerate them."
    )

    (tmp_path / MANIFEST_PATHS[0]).unlink()
    assert check_manifests(tmp_path) == [relative.as_posix() for relative in MANIFEST_PATHS]

    assert main(["--root", str(tmp_path)]) == 0
    assert check_manifests(tmp_path) == []


def test_repository_root_is_found_from_below() -> None:
    assert find_repository_root(ROOT / "operator" / "tasklease" / "api") == ROOT
    assert find_repository_root(Path("/")) is None


# --- structural ----------------------------------------------------------------------------


def test_no_json_schema_indirection_is_left(schema: dict[str, Any]) -> None:
    leftovers = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "const"}
    assert leftovers.isdisjoint(all_keys(schema))


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in schema_nodes(schema):
        where = path or "<root>"
        assert set(node) <= ALLOWED_KEYS, f"{where}: {set(node) - ALLOWED_KEYS}"
        if "properties" in node or "additionalProperties" in node:
            assert node.get("type") == "object", f"{where} has fields but is not an object"
        assert not ("properties" in node and "additionalProperties" in node), where
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields") is True, (
            f"{where} has neither a type nor x-kubernetes-preserve-unknown-fields"
        )
        if node.get("type") == "array":
            assert "items" in node, f"{where} is an array without items"
        for name in node.get("required", []):
            assert name in node.get("properties", {}), f"{where} requires unknown {name}"
        if node.get("x-kubernetes-list-type") == "map":
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in node["items"]["required"], f"{where}: map key {key} not required"


def test_top_level_is_the_standard_object_shape(schema: dict[str, Any]) -> None:
    assert schema["type"] == "object"
    assert list(schema["properties"]) == ["apiVersion", "kind", "metadata", "spec", "status"]
    assert schema["properties"]["apiVersion"]["type"] == "string"
    assert schema["properties"]["kind"]["type"] == "string"
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["required"] == ["spec"]
    assert "heartbeat lease" in schema["description"]


def test_any_json_checkpoint_is_kept_as_written(schema: dict[str, Any]) -> None:
    checkpoint = schema["properties"]["status"]["properties"]["progress"]["properties"][
        "checkpoint"
    ]
    assert "type" not in checkpoint
    assert checkpoint["x-kubernetes-preserve-unknown-fields"] is True


def test_value_shapes(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    status = schema["properties"]["status"]["properties"]
    assert spec["parameters"]["additionalProperties"]["type"] == "string"
    assert status["phase"]["type"] == "string"
    assert "Succeeded" in status["phase"]["enum"]
    assert status["startTime"]["type"] == "string"
    assert status["startTime"]["format"] == "date-time"
    assert spec["workerGroup"]["maxLength"] == 63
    assert status["attempts"]["maxItems"] == 20
    assert spec["retry"]["properties"]["maxAttempts"]["minimum"] == 1
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    template = spec["template"]
    assert template["x-kubernetes-preserve-unknown-fields"] is True
    assert template["properties"]["spec"]["properties"]["containers"]["minItems"] == 1


def test_optional_objects_are_not_defaulted_into_existence(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]["properties"]
    assert "default" not in status["progress"]
    assert "default" not in status["result"]
    assert "default" not in schema["properties"]["spec"]["properties"]["template"]


def test_conversion_refuses_what_a_structural_schema_cannot_say() -> None:
    with pytest.raises(SchemaConversionError, match="unions"):
        structural_schema({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})
    with pytest.raises(SchemaConversionError, match="oneOf"):
        structural_schema({"oneOf": [{"type": "string"}]}, {})
    with pytest.raises(SchemaConversionError, match=r"\$ref"):
        structural_schema({"$ref": "#/$defs/Missing"}, {})


# --- documented ----------------------------------------------------------------------------


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    undocumented = []
    for part in ("spec", "status"):
        for path, node in schema_nodes(schema["properties"][part], part):
            # The pod template's inner fields are core/v1's, documented there.
            inside_template = path.startswith("spec.template.")
            is_field = not path.endswith(("[]", "{}"))
            if is_field and not inside_template and not node.get("description", "").strip():
                undocumented.append(path)
    assert undocumented == []


# --- validation rules ----------------------------------------------------------------------


def test_cel_rules_reference_fields_that_exist(schema: dict[str, Any]) -> None:
    for path, node in schema_nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            expression = rule["rule"]
            properties = node.get("properties", {})
            guarded = set(re.findall(r"has\(self\.(\w+)\)", expression))
            # Fields read, not macros called on self (self.all(...), self.map(...)).
            for name in re.findall(r"self\.(\w+)\b(?!\()", expression):
                assert name in properties, f"{path}: {expression!r} names unknown {name}"
                always_there = name in node.get("required", []) or "default" in properties[name]
                assert name in guarded or always_there, (
                    f"{path}: {expression!r} reads {name}, which may be absent; use has()"
                )
            if "fieldPath" in rule:
                field = rule["fieldPath"].removeprefix(".")
                assert field in properties, f"{path}: fieldPath {rule['fieldPath']} is unknown"
            assert rule.get("message"), f"{path}: {expression!r} has no message"


def test_cross_field_rules_name_the_field_in_their_message(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    backoff = spec["properties"]["retry"]["properties"]["backoff"]
    for node, at in ((spec, "spec"), (backoff, "spec.retry.backoff")):
        for rule in node["x-kubernetes-validations"]:
            if "fieldPath" in rule:
                # The path the API server reports, and the message, name the same field.
                assert f"{at}{rule['fieldPath']}" in rule["message"], rule
    by_field = {rule.get("fieldPath"): rule for rule in spec["x-kubernetes-validations"]}
    assert "spec.ackTimeout" in by_field[".ackTimeout"]["message"]
    assert "spec.heartbeatInterval" in by_field[".heartbeatInterval"]["message"]
    assert "a pool task has no template" in by_field[".workerGroup"]["message"]
    assert by_field[".workerGroup"]["reason"] == "FieldValueForbidden"
    [max_rule] = backoff["x-kubernetes-validations"]
    assert max_rule["fieldPath"] == ".max"


def test_every_duration_is_whole_milliseconds(schema: dict[str, Any]) -> None:
    durations = {
        path: node
        for path, node in schema_nodes(schema["properties"]["spec"], "spec")
        if node.get("pattern") == GO_DURATION_PATTERN
    }
    assert len(durations) == 9  # spec.ttlAfterFinished among them, which may be 0s
    for path, node in durations.items():
        assert WHOLE_MILLISECONDS_RULE in node["x-kubernetes-validations"], path
    # A backoff may be zero (no wait); a lease timing may not.
    positive = {
        p for p, n in durations.items() if POSITIVE_DURATION_RULE in n["x-kubernetes-validations"]
    }
    assert positive == {
        "spec.ackTimeout",
        "spec.reportProgressTimeout",
        "spec.heartbeatInterval",
        "spec.attemptTimeout",
        "spec.activeDeadline",
        "spec.lateAfter",
    }


def test_parameters_are_bounded_to_fit_in_one_environment_variable(
    schema: dict[str, Any],
) -> None:
    parameters = schema["properties"]["spec"]["properties"]["parameters"]
    assert parameters["maxProperties"] == MAX_PARAMETERS
    assert parameters["additionalProperties"] == {
        "type": "string",
        "maxLength": MAX_PARAMETERS_BYTES,
    }
    rules = " ".join(rule["rule"] for rule in parameters["x-kubernetes-validations"])
    assert f"size(name) <= {MAX_PARAMETER_NAME_LENGTH}" in rules
    assert f".sum() <= {MAX_PARAMETERS_BYTES}" in rules
    # The worst case JSON: every byte escaped to six ("\u0001"), and per parameter two pairs
    # of quotes, ": " and ", ". Linux's MAX_ARG_STRLEN counts "NAME=value" and its NUL.
    worst = 2 + 6 * MAX_PARAMETERS_BYTES + 8 * MAX_PARAMETERS
    assert len("TASKLEASE_PARAMETERS=") + worst + 1 < 128 * 1024
    # ... and the limits are stated in `kubectl explain task.spec.parameters`.
    for stated in (f"at most {MAX_PARAMETERS} parameters", f"{MAX_PARAMETERS_BYTES} bytes"):
        assert stated in parameters["description"]


# --- defaults ------------------------------------------------------------------------------


def test_lease_timing_defaults_are_the_aws_ones(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert spec["ackTimeout"]["default"] == "2m"
    assert spec["reportProgressTimeout"]["default"] == "15m"
    assert spec["heartbeatInterval"]["default"] == "1m"
    assert spec["retry"]["default"] == {}
    assert spec["retry"]["properties"]["maxAttempts"]["default"] == 3
    assert spec["retry"]["properties"]["backoff"]["default"] == {}
    assert spec["retry"]["properties"]["backoff"]["properties"]["initial"]["default"] == "10s"


def test_api_server_defaults_equal_the_model_defaults(schema: dict[str, Any]) -> None:
    spec_schema = schema["properties"]["spec"]
    defaulted_spec = apply_defaults(spec_schema, {"template": TEMPLATE})
    model_spec = TaskSpec.model_validate({"template": TEMPLATE})
    assert defaulted_spec == without_empty(model_spec.model_dump(mode="json", by_alias=True))

    defaulted_retry = apply_defaults(spec_schema["properties"]["retry"], {})
    assert defaulted_retry == without_empty(RetryPolicy().model_dump(mode="json", by_alias=True))

    defaulted_task = apply_defaults(schema, {"spec": {"workerGroup": "pool"}})
    assert defaulted_task["status"] == without_empty(
        TaskStatus().model_dump(mode="json", by_alias=True)
    )


def test_every_default_is_valid_for_its_own_schema(schema: dict[str, Any]) -> None:
    # A default the schema itself refuses would make the API server reject the CRD.
    for path, node in schema_nodes(schema):
        if "default" not in node:
            continue
        default = node["default"]
        if "enum" in node:
            assert default in node["enum"], path
        if "pattern" in node:
            assert re.fullmatch(node["pattern"], default), path
        if "minimum" in node:
            assert default >= node["minimum"], path
        if "maximum" in node:
            assert default <= node["maximum"], path


# --- printing and naming -------------------------------------------------------------------


def test_printer_columns(crd: dict[str, Any]) -> None:
    [version] = crd["spec"]["versions"]
    columns = [
        (column["name"], column["type"], column["jsonPath"])
        for column in version["additionalPrinterColumns"]
    ]
    assert columns == [
        ("Phase", "string", ".status.phase"),
        ("Progress", "number", ".status.progress.percent"),
        ("Holder", "string", ".status.holder"),
        ("Attempt", "integer", ".status.attempt"),
        ("Last Report", "date", ".status.progress.reportTime"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    assert version["additionalPrinterColumns"][1]["description"] == "percent done"


def test_printer_columns_point_at_fields_that_exist(crd: dict[str, Any]) -> None:
    [version] = crd["spec"]["versions"]
    schema = openapi_schema(crd)
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].lstrip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for name in path:
            node = node["properties"][name]
        assert node["type"] == column["type"] or (
            column["type"] == "date" and node.get("format") == "date-time"
        ), column["name"]


def test_names_scope_and_version(crd: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "tasks.tasklease.io"
    spec = crd["spec"]
    assert spec["group"] == "tasklease.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "Task",
        "listKind": "TaskList",
        "plural": "tasks",
        "singular": "task",
        "shortNames": ["tl"],
        "categories": ["tasklease"],
    }
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}
