"""Least privilege, as the chart grants it: asked of the authorizer (`kubectl auth can-i` as the
ServiceAccount) and proven with real requests made with the ServiceAccounts' own tokens.

Runner: get and watch Tasks, get and patch tasks/status, in the runner namespaces; nothing
else.
Operator (watching a list of namespaces): its verbs in those namespaces, and only list/watch
of CRDs and namespaces cluster-wide; with leader election, get and update of its one Lease
and create of Leases, in the release namespace only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import GROUP, PLURAL, VERSION
from tests.integration.chart_support import (
    RUNNER_SA,
    ChartInstaller,
    ChartSetup,
    Helm,
    installed,
    leased_task,
    patch_status,
    progress,
    runner_pod,
    scoped_values,
    service_account_token,
    token_client,
)

pytestmark = pytest.mark.cluster

LEASES = "leases.coordination.k8s.io"


@pytest.fixture(scope="module")
def setup(chart_installer: ChartInstaller) -> Iterator[ChartSetup]:
    with chart_installer.install(ChartSetup, prefix="rbac") as ready:
        yield ready


def test_runner_rbac_is_least_privilege(setup: ChartSetup) -> None:
    runner = setup.release.runner_user()
    ns, other = setup.namespace, setup.other_namespace

    # What a runner needs, in its namespace.
    assert setup.can_i(runner, "get", "tasks.tasklease.io", ns)
    assert setup.can_i(runner, "watch", "tasks.tasklease.io", ns)
    assert setup.can_i(runner, "patch", "tasks.tasklease.io/status", ns)
    # `kubectl patch --subresource=status` (the README's kubectl-only runner) reads first.
    assert setup.can_i(runner, "get", "tasks.tasklease.io/status", ns)
    # Nothing more on Tasks: no list, no spec or metadata writes, no create or delete.
    for verb in ("list", "patch", "update", "create", "delete", "deletecollection"):
        assert not setup.can_i(runner, verb, "tasks.tasklease.io", ns), verb
    assert not setup.can_i(runner, "update", "tasks.tasklease.io/status", ns)
    # No other resource.
    for verb, resource in (
        ("get", "pods"),
        ("create", "pods"),
        ("delete", "pods"),
        ("get", "configmaps"),
        ("get", "secrets"),
        ("create", "events"),
        ("get", "leases.coordination.k8s.io"),
        ("create", "serviceaccounts/token"),
    ):
        assert not setup.can_i(runner, verb, resource, ns), f"{verb} {resource}"
    # No other namespace, and nothing cluster-wide.
    assert not setup.can_i(runner, "get", "tasks.tasklease.io", other)
    assert not setup.can_i(runner, "patch", "tasks.tasklease.io/status", other)
    assert not setup.can_i(runner, "get", "tasks.tasklease.io")
    assert not setup.can_i(runner, "list", "namespaces")


def test_runner_rbac_holds_for_real_requests(setup: ChartSetup) -> None:
    """The same, with the token a runner pod really has (bound to the pod)."""
    ns, other = setup.namespace, setup.other_namespace
    core = client.CoreV1Api(setup.admin)
    pod = runner_pod(core, ns, "runner-real")
    runner = token_client(setup.control_plane, service_account_token(core, ns, RUNNER_SA, pod=pod))
    leased_task(setup.admin, ns, "mine", holder="runner-real", epoch=1)
    leased_task(setup.admin, other, "elsewhere", holder="runner-real", epoch=1)
    custom = client.CustomObjectsApi(runner)
    runner_core = client.CoreV1Api(runner)

    # Allowed: read the Task, write its status.progress (as the holder, current epoch).
    assert custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "mine")
    assert patch_status(runner, ns, "mine", {"progress": progress(1)}) is None

    refused: dict[str, Any] = {
        "patch spec": lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "mine", {"spec": {"cancel": True}}
        ),
        "patch annotations": lambda: custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            "mine",
            {"metadata": {"annotations": {"tasklease.io/epoch": "9"}}},
        ),
        "list tasks": lambda: custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL),
        "create a task": lambda: custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Task", "metadata": {"name": "x"}},
        ),
        "delete a task": lambda: custom.delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "mine"
        ),
        "get pods": lambda: runner_core.read_namespaced_pod("runner-real", ns),
        "create pods": lambda: runner_core.create_namespaced_pod(
            ns,
            {"metadata": {"name": "sneaky"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
        ),
        "list configmaps": lambda: runner_core.list_namespaced_config_map(ns),
        "get another namespace's task": lambda: custom.get_namespaced_custom_object(
            GROUP, VERSION, other, PLURAL, "elsewhere"
        ),
        "patch another namespace's task status": lambda: (
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, other, PLURAL, "elsewhere", {"status": {"progress": progress(1)}}
            )
        ),
    }
    for what, request in refused.items():
        with pytest.raises(ApiException) as caught:
            request()
        assert caught.value.status == 403, f"{what}: {caught.value.status} {caught.value.reason}"


def test_operator_rbac_is_scoped_and_exact(setup: ChartSetup) -> None:
    operator = setup.release.operator_user
    ns, other = setup.namespace, setup.other_namespace
    allowed = [
        ("get", "tasks.tasklease.io"),
        ("list", "tasks.tasklease.io"),
        ("watch", "tasks.tasklease.io"),
        ("patch", "tasks.tasklease.io"),
        ("delete", "tasks.tasklease.io"),  # spec.ttlAfterFinished
        ("patch", "tasks.tasklease.io/status"),
        ("list", "pods"),
        ("watch", "pods"),
        ("create", "pods"),
        ("delete", "pods"),
        ("create", "events"),
        ("list", "leases.coordination.k8s.io"),
        ("watch", "leases.coordination.k8s.io"),
    ]
    for verb, resource in allowed:
        assert setup.can_i(operator, verb, resource, ns), f"{verb} {resource}"
        assert not setup.can_i(operator, verb, resource, other), f"{verb} {resource} elsewhere"
    refused = [
        ("update", "tasks.tasklease.io"),
        ("create", "tasks.tasklease.io"),
        ("update", "tasks.tasklease.io/status"),
        ("get", "pods"),
        ("patch", "pods"),
        ("update", "pods"),
        ("create", "pods/exec"),
        ("get", "secrets"),
        ("list", "secrets"),
        ("get", "configmaps"),
        ("create", "leases.coordination.k8s.io"),  # leader election is off in this release
        ("get", "leases.coordination.k8s.io"),
        ("update", "leases.coordination.k8s.io"),
        ("create", "serviceaccounts/token"),
    ]
    for verb, resource in refused:
        assert not setup.can_i(operator, verb, resource, ns), f"{verb} {resource}"
    # Nothing cluster-wide: kopf follows neither CRDs nor namespaces (scanning is off).
    assert not setup.can_i(operator, "list", "customresourcedefinitions.apiextensions.k8s.io")
    assert not setup.can_i(operator, "watch", "namespaces")
    assert not setup.can_i(operator, "create", "customresourcedefinitions.apiextensions.k8s.io")
    assert not setup.can_i(operator, "list", "tasks.tasklease.io")
    assert not setup.can_i(operator, "list", "pods")


def test_operator_leader_election_rbac_is_its_one_lease(
    setup: ChartSetup, helm: Helm, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A release electing its leader in its own namespace while it watches another: get and
    update of the election's Lease (by name), create of Leases (RBAC cannot name what does
    not exist yet), there only; nothing in the watched namespace beyond what it had."""
    tmp = tmp_path_factory.mktemp("rbac-election")
    core = client.CoreV1Api(setup.admin)
    home, watched = f"{setup.namespace}-election", f"{setup.namespace}-watched"
    for name in (home, watched):
        core.create_namespace({"metadata": {"name": name}})
    values = scoped_values(watched, leaderElection={"enabled": True})
    try:
        with installed(helm, home, tmp, values, release="elect") as release:
            lease = f"{release.fullname}-operator"

            def can_i(verb: str, namespace: str, name: str | None = None) -> bool:
                """Whether the operator may `verb` Leases (the one named `name`)."""
                return setup.can_i(release.operator_user, verb, LEASES, namespace, name=name)

            assert can_i("get", home, lease)
            assert can_i("update", home, lease)
            assert can_i("create", home)
            for verb in ("patch", "delete", "watch"):
                assert not can_i(verb, home, lease), verb
            for verb in ("get", "update", "patch", "delete"):
                assert not can_i(verb, home, "someone-else"), verb
            for verb in ("list", "watch", "deletecollection"):
                assert not can_i(verb, home), verb
            # Nothing of the election in the watched namespace (where it lists and watches
            # the pool runners' Leases), nor anywhere else.
            assert can_i("watch", watched)
            assert not can_i("create", watched)
            assert not can_i("update", watched, lease)
            assert not can_i("get", setup.other_namespace, lease)
    finally:
        for name in (home, watched):
            core.delete_namespace(name, propagation_policy="Background")
