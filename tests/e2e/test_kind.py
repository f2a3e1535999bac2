"""End to end on kind, for machines with Docker: build the image, load it into a kind cluster,
`helm install` the chart, run a Task whose runner is the image's wrapper command, wait for
Succeeded, uninstall.

Skips, saying exactly what is missing, unless a Docker engine answers (`docker info`) and
`kind`, `helm` and `kubectl` are at hand. helm may also come from the tasklease cache (see
`tasklease.controlplane.binaries.obtain_helm`), kubectl from the control-plane binaries.

Set TASKLEASE_KIND_CLUSTER to an existing kind cluster's name to use it (it is left as it
was found, apart from the image); otherwise a throwaway cluster is created and deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.kind

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "tasklease"
RELEASE_NAMESPACE = "tasklease-system"


def _missing_docker() -> str | None:
    if shutil.which("docker") is None:
        return "the `docker` client is not on PATH"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` timed out: the Docker engine is not reachable"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the Docker engine is not reachable (`docker info` failed: {reason})"
    return None


def _helm() -> str | None:
    if found := shutil.which("helm"):
        return found
    from tasklease.controlplane.binaries import find_helm

    cached = find_helm()
    return str(cached) if cached else None


def _kubectl() -> str | None:
    if found := shutil.which("kubectl"):
        return found
    try:
        from tasklease.controlplane.binaries import find_binaries

        binaries = find_binaries()
    except ImportError:
        return None
    return str(binaries.kubectl) if binaries else None


@dataclass
class Tools:
    docker: str
    kind: str
    helm: str
    kubectl: str


@pytest.fixture(scope="module")
def tools() -> Tools:
    missing = []
    if reason := _missing_docker():
        missing.append(reason)
    kind = shutil.which("kind")
    if kind is None:
        missing.append("`kind` is not on PATH (https://kind.sigs.k8s.io)")
    helm = _helm()
    if helm is None:
        missing.append(
            "`helm` is not on PATH nor in the tasklease cache (python -c 'from "
            "tasklease.controlplane.binaries import obtain_helm; obtain_helm()')"
        )
    kubectl = _kubectl()
    if kubectl is None:
        missing.append("`kubectl` is not on PATH nor in the tasklease binaries cache")
    if missing:
        pytest.skip("kind end-to-end test needs Docker: " + "; ".join(missing))
    assert kind and helm and kubectl
    return Tools(docker=shutil.which("docker") or "docker", kind=kind, helm=helm, kubectl=kubectl)


def _run(*argv: str, timeout: float = 600, stdin: str | None = None) -> str:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(argv)}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


@dataclass
class KindCluster:
    name: str
    kubeconfig: Path


@pytest.fixture(scope="module")
def kind_cluster(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KindCluster]:
    """A kind cluster's kubeconfig: TASKLEASE_KIND_CLUSTER's, or a throwaway cluster's."""
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    existing = os.environ.get("TASKLEASE_KIND_CLUSTER")
    name = existing or f"tasklease-e2e-{secrets.token_hex(3)}"
    if not existing:
        _run(tools.kind, "create", "cluster", "--name", name, "--wait", "180s", timeout=900)
    try:
        kubeconfig.write_text(_run(tools.kind, "get", "kubeconfig", "--name", name))
        kubeconfig.chmod(0o600)
        yield KindCluster(name, kubeconfig)
    finally:
        if not existing:
            _run(tools.kind, "delete", "cluster", "--name", name, timeout=300)


@pytest.fixture(scope="module")
def image(tools: Tools, kind_cluster: KindCluster) -> str:
    tag = f"tasklease:e2e-{secrets.token_hex(3)}"
    _run(tools.docker, "build", "--tag", tag, str(REPO_ROOT), timeout=1800)
    _run(tools.kind, "load", "docker-image", tag, "--name", kind_cluster.name, timeout=600)
    return tag


TASK = """
apiVersion: tasklease.io/v1alpha1
kind: Task
metadata:
  name: e2e-hello
spec:
  ackTimeout: 2m
  reportProgressTimeout: 1m
  heartbeatInterval: 5s
  retry:
    maxAttempts: 2
  template:
    spec:
      serviceAccountName: tasklease-runner
      containers:
        - name: runner
          image: {image}
          imagePullPolicy: Never
          command:
            - tasklease
            - run
            - --
            - sh
            - -c
            - |
              for i in 1 2 3; do
                printf '%s/3\\nstep %s\\n' "$i" "$i" > "$TASKLEASE_PROGRESS_FILE"
                sleep 2
              done
"""


def test_chart_on_kind_runs_a_task_to_succeeded(
    tools: Tools, kind_cluster: KindCluster, image: str
) -> None:
    repository, _, tag = image.partition(":")
    env_kubeconfig = f"--kubeconfig={kind_cluster.kubeconfig}"
    release = f"tl-{secrets.token_hex(3)}"
    _run(
        tools.helm,
        "install",
        release,
        str(CHART),
        env_kubeconfig,
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "image.pullPolicy=Never",
        "--wait",
        "--timeout",
        "300s",
        timeout=400,
    )
    try:
        kubectl = [tools.kubectl, env_kubeconfig, "--namespace", RELEASE_NAMESPACE]
        _run(*kubectl, "apply", "-f", "-", stdin=TASK.format(image=image))
        deadline = time.monotonic() + 300
        phase = ""
        while time.monotonic() < deadline:
            task = json.loads(_run(*kubectl, "get", "task", "e2e-hello", "-o", "json"))
            phase = (task.get("status") or {}).get("phase", "")
            if phase in ("Succeeded", "Failed", "Canceled", "Skipped"):
                break
            time.sleep(2)
        diagnostics = _run(*kubectl, "describe", "task", "e2e-hello")
        assert phase == "Succeeded", diagnostics
        assert task["status"]["result"]["status"] == "FINISHED"
        assert task["status"]["progress"]["percent"] == 100.0, task["status"]["progress"]
        logs = _run(*kubectl, "logs", f"deployment/{release}-tasklease-operator", "--tail=2000")
        # (The `,403` of a log timestamp's milliseconds is not a status code.)
        assert not re.search(r"(?<![,\d])403(?!\d)|[Ff]orbidden", logs), logs[-4000:]
        _run(*kubectl, "delete", "task", "e2e-hello", "--wait=true", "--timeout=120s")
    finally:
        _run(tools.helm, "uninstall", release, env_kubeconfig, "--namespace", RELEASE_NAMESPACE)
