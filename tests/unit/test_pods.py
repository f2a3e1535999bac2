"""Runner pods: derived names, label-safe task names and the manifest built from a template."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from tasklease.api.models import (
    API_VERSION,
    EPOCH_LABEL,
    KIND,
    ROLE_LABEL,
    RUNNER_ROLE,
    TASK_LABEL,
)
from tasklease.api.runner_env import (
    ENV_ATTEMPT,
    ENV_CHECKPOINT,
    ENV_EPOCH,
    ENV_NAMESPACE,
    ENV_PARAMETERS,
    ENV_POD_NAME,
    ENV_TASK,
    RESERVED_ENV,
)
from tasklease.lease.pods import label_safe_task_name, runner_pod, runner_pod_name
from tests.unit.builders import NAMESPACE, TEMPLATE, UID, make_task

# A DNS-1123 subdomain made of labels (task names may contain dots), each label <= 63.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A Kubernetes label value.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

EPOCHS = [1, 2, 9, 10, 99, 100, 12345, 10**9]
LONG_NAMES = [
    "a" * 62,
    "b" * 63,
    "c" * 64,
    "report-" + "x" * 120,
    "d" * 253,
    # truncation lands right after a dash: the dash must not be doubled
    "e" * 51 + "-" + "f" * 100,
    "etl-" * 30 + "end",
]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def manifest(**kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"epoch": 3, "attempt": 2, "checkpoint": None}
    options.update(kwargs)
    return runner_pod(make_task(), **options)


# --- names --------------------------------------------------------------------------------


def test_short_task_names_keep_their_name_plus_epoch() -> None:
    assert runner_pod_name("demo", 1) == "demo-1"
    assert runner_pod_name("demo", 42) == "demo-42"


@pytest.mark.parametrize("epoch", EPOCHS)
@pytest.mark.parametrize("task_name", LONG_NAMES)
def test_pod_name_fits_a_dns_label_and_ends_with_the_epoch(task_name: str, epoch: int) -> None:
    name = runner_pod_name(task_name, epoch)
    assert len(name) <= 63
    assert name.endswith(f"-{epoch}")
    assert DNS_LABEL.match(name), name
    assert "--" not in name


@pytest.mark.parametrize("task_name", LONG_NAMES)
def test_pod_names_are_unique_per_epoch_and_stable(task_name: str) -> None:
    names = [runner_pod_name(task_name, epoch) for epoch in range(1, 500)]
    assert len(set(names)) == len(names)
    assert names == [runner_pod_name(task_name, epoch) for epoch in range(1, 500)]


def test_long_names_sharing_a_prefix_get_different_pod_names() -> None:
    prefix = "nightly-export-of-the-customer-table-into-the-warehouse-"
    first, second = prefix + "eu-west-1", prefix + "us-east-1"
    assert runner_pod_name(first, 1) != runner_pod_name(second, 1)


def test_name_is_hashed_only_when_it_would_not_fit() -> None:
    fits = "a" * 61  # + "-1" is exactly 63
    assert runner_pod_name(fits, 1) == fits + "-1"
    too_long = "a" * 62
    hashed = runner_pod_name(too_long, 1)
    assert hashed != too_long + "-1"
    assert len(hashed) <= 63


def test_pod_names_of_distinct_short_tasks_never_collide() -> None:
    # "-<digits>" is only ever the epoch suffix, so the task name is recoverable.
    names = {runner_pod_name(task, epoch) for task in ("a", "a-1", "a-12") for epoch in (1, 2, 12)}
    assert len(names) == 9


def test_label_safe_task_name_is_the_name_when_it_fits() -> None:
    assert label_safe_task_name("demo") == "demo"
    assert label_safe_task_name("x" * 63) == "x" * 63


@pytest.mark.parametrize("task_name", [n for n in LONG_NAMES if len(n) > 63] + ["a." * 40])
def test_label_safe_task_name_of_long_names_is_a_valid_distinct_label(task_name: str) -> None:
    value = label_safe_task_name(task_name)
    assert len(value) <= 63
    assert LABEL_VALUE.match(value), value
    assert value != label_safe_task_name(task_name + "x")
    assert value == label_safe_task_name(task_name)


# --- the manifest -------------------------------------------------------------------------


def test_pod_is_owned_by_the_task_so_it_is_garbage_collected_with_it() -> None:
    metadata = manifest()["metadata"]
    assert metadata["ownerReferences"] == [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": "demo",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_pod_metadata_names_the_epoch_and_keeps_template_labels_and_annotations() -> None:
    pod = manifest(epoch=3)
    metadata = pod["metadata"]
    assert pod["apiVersion"] == "v1"
    assert pod["kind"] == "Pod"
    assert metadata["name"] == "demo-3"
    assert metadata["namespace"] == NAMESPACE
    assert metadata["labels"] == {
        "app": "demo",
        TASK_LABEL: "demo",
        EPOCH_LABEL: "3",
        ROLE_LABEL: RUNNER_ROLE,
    }
    assert metadata["annotations"] == {"team": "data"}


def test_template_cannot_override_the_operators_labels() -> None:
    template = copy.deepcopy(TEMPLATE)
    template["metadata"]["labels"] = {TASK_LABEL: "someone-else", EPOCH_LABEL: "999"}
    pod = runner_pod(make_task(spec={"template": template}), epoch=2, attempt=1, checkpoint=None)
    labels = pod["metadata"]["labels"]
    assert (labels[TASK_LABEL], labels[EPOCH_LABEL]) == ("demo", "2")


def test_task_label_of_a_long_task_name_is_label_safe() -> None:
    long_name = "t" * 100
    pod = runner_pod(make_task(name=long_name), epoch=1, attempt=1, checkpoint=None)
    assert pod["metadata"]["labels"][TASK_LABEL] == label_safe_task_name(long_name)
    assert pod["metadata"]["name"] == runner_pod_name(long_name, 1)


def test_runner_pods_are_never_restarted_by_the_kubelet() -> None:
    assert manifest()["spec"]["restartPolicy"] == "Never"


def test_container_env_carries_the_lease_identity_after_the_users_own_env() -> None:
    container = manifest(epoch=3, attempt=2)["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert names[0] == "USER_SETTING"
    env = env_of(container)
    assert env[ENV_TASK] == {"name": ENV_TASK, "value": "demo"}
    assert env[ENV_NAMESPACE]["value"] == NAMESPACE
    assert env[ENV_EPOCH]["value"] == "3"
    assert env[ENV_ATTEMPT]["value"] == "2"
    assert env[ENV_POD_NAME] == {
        "name": ENV_POD_NAME,
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    assert json.loads(env[ENV_PARAMETERS]["value"]) == {"date": "2024-01-01"}
    assert ENV_CHECKPOINT not in env


@pytest.mark.parametrize("checkpoint", [{"row": 42}, [1, 2], "resume-here", 0, False, {}])
def test_checkpoint_is_handed_over_as_json_even_when_falsy(checkpoint: Any) -> None:
    env = env_of(manifest(checkpoint=checkpoint)["spec"]["containers"][0])
    assert json.loads(env[ENV_CHECKPOINT]["value"]) == checkpoint


@pytest.mark.parametrize("name", RESERVED_ENV)
def test_template_env_named_like_ours_is_refused(name: str) -> None:
    # A template must not spoof the lease identity; the Task is reported Invalid instead.
    template = copy.deepcopy(TEMPLATE)
    template["spec"]["containers"][0]["env"] = [
        {"name": "KEEP", "value": "1"},
        {"name": name, "value": "spoofed"},
    ]
    with pytest.raises(ValidationError, match=r"containers\[0\]\.env\[1\]\.name"):
        make_task(spec={"template": template})


def test_every_container_gets_the_identity() -> None:
    template = copy.deepcopy(TEMPLATE)
    template["spec"]["containers"].append({"name": "sidecar", "image": "busybox"})
    pod = runner_pod(make_task(spec={"template": template}), epoch=1, attempt=1, checkpoint=None)
    for container in pod["spec"]["containers"]:
        assert env_of(container)[ENV_EPOCH]["value"] == "1"


def test_building_a_pod_does_not_modify_the_tasks_template() -> None:
    task = make_task()
    before = copy.deepcopy(task.spec.template)
    runner_pod(task, epoch=1, attempt=1, checkpoint={"x": 1})
    runner_pod(task, epoch=2, attempt=2, checkpoint=None)
    assert task.spec.template == before


def test_pods_of_two_epochs_differ_only_in_identity() -> None:
    first = runner_pod(make_task(), epoch=1, attempt=1, checkpoint=None)
    second = runner_pod(make_task(), epoch=2, attempt=2, checkpoint=None)
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["spec"]["containers"][0]["image"] == second["spec"]["containers"][0]["image"]


def test_pool_task_without_template_has_no_runner_pod() -> None:
    task = make_task(spec={"template": None, "workerGroup": "etl"})
    with pytest.raises(ValueError, match="pool task"):
        runner_pod(task, epoch=1, attempt=1, checkpoint=None)
