"""Shared fixtures: one real control plane per test session, started on first use.

Tests that use any of `CLUSTER_FIXTURES` (`control_plane`, `namespace`, `kubectl`, ...) must
be marked `cluster` (a `pytestmark` in the module), so `-m "not cluster"` runs the fast suite
without ever building or starting anything; collection fails loudly if one forgets.

The control plane is session-scoped because starting one costs seconds while a fresh
namespace per test costs milliseconds; tests isolate themselves by namespace. Namespaces are
deleted without waiting: kube-controller-manager's namespace controller waits a fixed 5 s
before it empties a namespace, and nothing after a test depends on that.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from tests.waiting import wait_for

if TYPE_CHECKING:  # imported lazily: `-m "not cluster"` runs need no `local` extra
    from tasklease.controlplane import Binaries, ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[1]
CRDS_DIR = REPO_ROOT / "crds"
CLUSTER_FIXTURES = frozenset(
    {
        "control_plane",
        "control_plane_binaries",
        "helm_binary",
        "namespace",
        "kubectl",
        "kube_config",
    }
)


class Kubectl(Protocol):
    def __call__(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> CompletedProcess[str]: ...


def in_ci() -> bool:
    """True in CI (`CI=true`, which `.ci/run` sets): every prerequisite must be there."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI a skip is a failure: a test that skips says what the machine lacks, and CI's
    machine must lack nothing (a suite that skipped its end-to-end tests proves nothing)."""
    report: pytest.TestReport = yield
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be missing: {reason}"
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("cluster") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests using the control plane must be marked `cluster` "
            "(pytestmark = pytest.mark.cluster): " + ", ".join(unmarked)
        )


@contextlib.contextmanager
def _uncaptured(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let build progress through pytest's capture: a cold build takes minutes, and silence
    that long reads as a hang."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        yield
        return
    with capture.global_and_fixture_disabled():
        yield


@pytest.fixture(scope="session")
def control_plane_binaries(request: pytest.FixtureRequest) -> Binaries:
    """The control-plane binaries, built into the per-user cache on first use."""
    from tasklease.controlplane import obtain_binaries

    with _uncaptured(request):
        return obtain_binaries()


@pytest.fixture(scope="session")
def helm_binary(request: pytest.FixtureRequest) -> Path:
    """helm, built into the per-user cache on first use (`go install`, like the binaries)."""
    from tasklease.controlplane.binaries import obtain_helm

    with _uncaptured(request):
        return obtain_helm()


@pytest.fixture(scope="session")
def control_plane(
    control_plane_binaries: Binaries, request: pytest.FixtureRequest
) -> Iterator[ControlPlane]:
    """The session's control plane, with every CRD in `crds/` installed and established."""
    from tasklease.controlplane import ControlPlane

    with _uncaptured(request):
        plane = ControlPlane.start(binaries=control_plane_binaries)
    with plane:
        manifests = sorted(
            path for path in CRDS_DIR.glob("*") if path.suffix in {".yaml", ".yml", ".json"}
        )
        if manifests:
            plane.apply_crds(*manifests)
        yield plane


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    """`kubectl(*args, check=True, input=None) -> CompletedProcess[str]` as the admin."""
    run: Kubectl = control_plane.kubectl
    return run


@pytest.fixture(scope="session")
def kube_config(control_plane: ControlPlane) -> Iterator[Any]:
    """A `kubernetes.client.ApiClient` authenticated as the admin (`system:masters`)."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield client
    client.close()


@pytest.fixture
def namespace(kube_config: Any) -> Iterator[str]:
    """A fresh namespace `t-<random>` whose `default` ServiceAccount exists (Pods can be
    created at once); deleted after the test without waiting for it to go."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(kube_config)
    name = f"t-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name}})

    def has_default_service_account() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    wait_for(
        "the namespace's default ServiceAccount",
        has_default_service_account,
        timeout=30.0,
        interval=0.05,
    )
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name, propagation_policy="Background")
