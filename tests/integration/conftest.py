"""Fixtures for driving the operator: a real operator process per test, namespace-scoped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.integration.chart_support import ChartInstaller, Helm
from tests.integration.support import RUNNER, Cluster, OperatorProcess, bind_runner, runner_role


@pytest.fixture(scope="module")
def helm(helm_binary: Path, control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm as the admin, with its cache and config in a folder of the module's."""
    return Helm(
        helm_binary, kubeconfig=control_plane.kubeconfig, home=tmp_path_factory.mktemp("helm")
    )


@pytest.fixture(scope="module")
def chart_installer(
    helm: Helm,
    tmp_path_factory: pytest.TempPathFactory,
    control_plane: Any,
    kube_config: Any,
    kubectl: Any,
) -> ChartInstaller:
    """Installs the chart once for a module: `with chart_installer.install(Setup, ...)`."""
    return ChartInstaller(helm, tmp_path_factory, control_plane, kube_config, kubectl)


@pytest.fixture
def second_namespace(kube_config: Any, namespace: str) -> Iterator[str]:
    """Another fresh namespace beside `namespace`, deleted after the test without waiting."""
    core = client.CoreV1Api(kube_config)
    name = f"{namespace}-b"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def cluster(kube_config: Any, namespace: str) -> Cluster:
    return Cluster(kube_config, namespace)


@pytest.fixture
def operator_process(
    control_plane: Any, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """An operator watching only this test's namespace, started before the test body."""
    process = OperatorProcess(
        kubeconfig=control_plane.kubeconfig,
        namespace=namespace,
        log_path=tmp_path / "operator.log",
    ).start()
    yield process
    alive = process.alive
    process.stop()
    report = getattr(request.node, "rep_call", None)
    if (report is not None and report.failed) or not alive:
        print(f"--- operator log ({'alive' if alive else 'DEAD'}) ---\n{process.log()[-6000:]}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the test item so fixtures can tell whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def runner_account(cluster: Cluster) -> str:
    """A ServiceAccount with the runner's RBAC."""
    runner_role(cluster)
    bind_runner(cluster)
    return RUNNER


# --- runner pods run by the local executor ----------------------------------------------


@pytest.fixture
def runner_rbac(cluster: Cluster) -> None:
    """What a runner pod's ServiceAccount (`default`) needs: read its Task, patch its status."""
    rbac = client.RbacAuthorizationV1Api(cluster.api_client)
    rbac.create_namespaced_role(
        cluster.namespace,
        {
            "metadata": {"name": "tasklease-runner"},
            "rules": [
                {"apiGroups": ["tasklease.io"], "resources": ["tasks"], "verbs": ["get"]},
                {
                    "apiGroups": ["tasklease.io"],
                    "resources": ["tasks/status"],
                    "verbs": ["get", "patch"],
                },
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        cluster.namespace,
        {
            "metadata": {"name": "tasklease-runner"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "tasklease-runner",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "default", "namespace": cluster.namespace}
            ],
        },
    )


@pytest.fixture
def executor(control_plane: Any, tmp_path: Path, runner_rbac: None) -> Iterator[Any]:
    """The local pod executor, in-process: it runs every runner pod's command."""
    from tasklease.executor import LocalExecutor

    with LocalExecutor(control_plane.kubeconfig, tmp_path / "executor") as running:
        yield running
