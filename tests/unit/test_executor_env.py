"""The local executor's process environment: Kubernetes' `$(VAR)` expansion, downward-API
fields, ConfigMap/Secret references and what is inherited from the executor."""

from __future__ import annotations

from typing import Any

import pytest

from tasklease.executor.env import (
    EnvError,
    Sources,
    command_line,
    container_env,
    expand,
    field_value,
    inherited_env,
    process_env,
)

POD: dict[str, Any] = {
    "metadata": {
        "name": "runner-1",
        "namespace": "batch",
        "uid": "1234",
        "labels": {"app": "demo", "tasklease.io/task": "t"},
        "annotations": {"note": "hello"},
    },
    "spec": {"nodeName": "tasklease-local", "serviceAccountName": "worker"},
}
NO_SOURCES = Sources(config_map=lambda name: None, secret=lambda name: None)
VARS = {"A": "alpha", "EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "alpha"),
        ("x$(A)y$(A)", "xalphayalpha"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("$$", "$"),
        ("$$$(A)", "$alpha"),
        ("$(EMPTY)-", "-"),
        ("$A", "$A"),
        ("cost: 5$", "cost: 5$"),
        ("$(A", "$(A"),
        ("$()", "$()"),
        ("no refs", "no refs"),
        ("", ""),
    ],
)
def test_expansion_follows_kubernetes(text: str, expected: str) -> None:
    assert expand(text, VARS.get) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "runner-1"),
        ("metadata.namespace", "batch"),
        ("metadata.uid", "1234"),
        ("spec.nodeName", "tasklease-local"),
        ("spec.serviceAccountName", "worker"),
        ("status.podIP", "127.0.0.1"),
        ("status.hostIP", "127.0.0.1"),
        ("metadata.labels['app']", "demo"),
        ("metadata.labels['tasklease.io/task']", "t"),
        ("metadata.annotations['note']", "hello"),
        ("metadata.annotations['absent']", ""),
    ],
)
def test_downward_api_fields_resolve_from_the_pod(path: str, expected: str) -> None:
    assert field_value(POD, path) == expected


def test_unsupported_field_path_is_a_config_error() -> None:
    with pytest.raises(EnvError, match=r"spec\.hostname"):
        field_value(POD, "spec.hostname")


def test_env_entries_resolve_in_order_and_expand_earlier_ones() -> None:
    container = {
        "env": [
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "GREETING", "value": "hi $(NAME) $(LATER)"},
            {"name": "LATER", "value": "late"},
            {"name": "NAME", "value": "replaced"},
        ]
    }
    env = container_env(POD, container, sources=NO_SOURCES)
    assert env == {"NAME": "replaced", "GREETING": "hi runner-1 $(LATER)", "LATER": "late"}


def test_config_map_and_secret_references() -> None:
    sources = Sources(
        config_map=lambda name: {"color": "blue", "bad key": "x"} if name == "cm" else None,
        secret=lambda name: {"password": "s3cret"} if name == "sec" else None,
    )
    container = {
        "envFrom": [
            {"configMapRef": {"name": "cm"}, "prefix": "CM_"},
            {"secretRef": {"name": "sec"}},
        ],
        "env": [
            {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "color"}}},
            {
                "name": "OPTIONAL",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    env = container_env(POD, container, sources=sources)
    assert env == {"CM_color": "blue", "password": "s3cret", "COLOR": "blue"}


@pytest.mark.parametrize(
    ("value_from", "message"),
    [
        ({"configMapKeyRef": {"name": "absent", "key": "k"}}, 'ConfigMap "absent" not found'),
        ({"secretKeyRef": {"name": "sec", "key": "other"}}, "couldn't find key other"),
    ],
)
def test_missing_required_reference_is_a_config_error(
    value_from: dict[str, Any], message: str
) -> None:
    sources = Sources(config_map=lambda name: None, secret=lambda name: {"password": "x"})
    container = {"env": [{"name": "X", "valueFrom": value_from}]}
    with pytest.raises(EnvError, match=message):
        container_env(POD, container, sources=sources)


def test_unsupported_value_from_is_skipped() -> None:
    container = {"env": [{"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "x"}}}]}
    assert container_env(POD, container, sources=NO_SOURCES) == {}


def test_command_and_args_are_expanded_against_the_container_env() -> None:
    container = {"command": ["sh", "-c"], "args": ["echo $(MSG) $$(MSG) $MSG"]}
    assert command_line(container, {"MSG": "hi"}) == ["sh", "-c", "echo hi $(MSG) $MSG"]


def test_a_container_without_command_cannot_run() -> None:
    with pytest.raises(EnvError, match="no command"):
        command_line({"name": "main", "args": ["x"]}, {})


def test_inherited_env_keeps_the_basics_and_puts_the_interpreter_first_on_path() -> None:
    environ = {
        "PATH": "/usr/bin:/venv/bin:/bin",
        "HOME": "/home/me",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "PYTHONPATH": "/src",
        "KUBECONFIG": "/admin",
        "HTTPS_PROXY": "http://proxy",
        "SECRET": "x",
    }
    inherited = inherited_env(environ, interpreter_dir="/venv/bin")
    assert inherited == {
        "PATH": "/venv/bin:/usr/bin:/bin",
        "HOME": "/home/me",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "PYTHONPATH": "/src",
    }


def test_process_env_precedence() -> None:
    env = process_env(
        inherited={"PATH": "/bin", "HOME": "/h", "HOSTNAME": "host"},
        pod_name="runner-1",
        container={"HOME": "/pod-home", "KUBECONFIG": "/pod-set"},
        executor={"KUBECONFIG": "/state/kubeconfig"},
    )
    assert env == {
        "PATH": "/bin",
        "HOME": "/pod-home",
        "HOSTNAME": "runner-1",
        "KUBECONFIG": "/state/kubeconfig",
    }
