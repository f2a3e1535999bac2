"""Fixtures for the end-to-end suite on the local real node: the host's prerequisites, the
pause image a node needs, and a running cluster started the way the README starts it
(`python -m tasklease.controlplane up --node`, which `make cluster NODE=1` runs).

Every prerequisite missing here makes a test skip with what is missing, and in CI
(`CI=true`) fail (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import REPO_ROOT

if TYPE_CHECKING:  # imported lazily: `-m "not cluster"` runs need no `local` extra
    from tasklease.controlplane import Binaries
    from tasklease.controlplane.node import NodeImages

STATE_DIR_ENV = "TASKLEASE_STATE_DIR"
START_TIMEOUT_S = 600.0  # a cold pause-image build and package install included


@pytest.fixture(scope="session")
def node_prerequisites(request: pytest.FixtureRequest) -> None:
    """Root, Linux, and the Debian packages a node and the image build need (installed
    when missing, as `make cluster NODE=1` does)."""
    if sys.platform != "linux":
        pytest.skip("a local node needs Linux (containerd, runc, network namespaces)")
    if os.geteuid() != 0:
        pytest.skip("a local node runs containerd and a kubelet, which need root")
    from tasklease.controlplane.hostdeps import IMAGE, NODE, HostDependencyError, ensure

    try:
        ensure(NODE + IMAGE, purpose="the end-to-end suite", say=print)
    except HostDependencyError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def node_images(node_prerequisites: None) -> NodeImages:
    from tasklease.controlplane.image import PAUSE_IMAGE, build_pause_image
    from tasklease.controlplane.node import NodeImages

    return NodeImages(sandbox=build_pause_image(), sandbox_name=PAUSE_IMAGE)


@pytest.fixture(scope="session")
def helm_binary(control_plane_binaries: Binaries) -> Path:
    from tasklease.controlplane.binaries import obtain_helm

    return obtain_helm()


@dataclass
class LocalCluster:
    """A cluster with a real node, run by the CLI in a process of its own."""

    state_dir: Path
    kubeconfig: Path
    tools: Path  # a folder with `kubectl` and `helm`, first on PATH for documented commands
    process: subprocess.Popen[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def containerd_socket(self) -> Path:
        return self.state_dir / "node" / "containerd" / "containerd.sock"

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["kubectl", *args], check=check, input=input, timeout=timeout)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["helm", *args], check=check, timeout=300)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr` against the node's containerd, in CRI's namespace."""
        argv = ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args]
        return self.run(argv, check=check, timeout=60)

    def sh(self, command: str, *, check: bool = True, timeout: float = 600,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """A documented command line as a user's shell runs it, from the repository root."""
        return self.run(["sh", "-c", command], check=check, timeout=timeout, env=env)

    def run(
        self,
        argv: list[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env={**self.env, **(env or {})},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"`{' '.join(argv)}` failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def node_log(self, component: str, lines: int = 40) -> str:
        path = self.state_dir / "node" / "logs" / f"{component}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return f"(no {path})"


def _read_kubeconfig_line(process: subprocess.Popen[str], log: Path) -> Path:
    """The path in the `export KUBECONFIG=...` line `up` prints once everything is ready."""
    return Path(_read_export_line(process, log, "KUBECONFIG", "up --node"))


def _read_export_line(process: subprocess.Popen[str], log: Path, name: str, command: str) -> str:
    """The value in the `export NAME=...` line a foreground command prints once ready."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not selector.select(timeout=1.0):
            if process.poll() is not None:
                break
            continue
        line = process.stdout.readline()
        if not line:
            break
        if match := re.match(rf"export {name}=(\S+)", line):
            return match.group(1)
    process.kill()
    raise AssertionError(
        f"`python -m tasklease.controlplane {command}` did not get ready (exit code "
        f"{process.poll()}); its log:\n{log.read_text(errors='replace')[-6000:]}"
    )


@pytest.fixture(scope="session")
def local_cluster(
    node_images: NodeImages,
    control_plane_binaries: Binaries,
    helm_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalCluster]:
    """`make cluster NODE=1` (the same command line), with a state dir of its own."""
    root = tmp_path_factory.mktemp("local-cluster")
    state_dir = root / "state"
    tools = root / "bin"
    tools.mkdir()
    (tools / "kubectl").symlink_to(control_plane_binaries.kubectl)
    (tools / "helm").symlink_to(helm_binary)
    env = {
        **os.environ,
        STATE_DIR_ENV: str(state_dir),
        "PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}",
        "HELM_CACHE_HOME": str(root / "helm" / "cache"),
        "HELM_CONFIG_HOME": str(root / "helm" / "config"),
        "HELM_DATA_HOME": str(root / "helm" / "data"),
    }
    log = root / "up.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tasklease.controlplane", "up", "--node"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    kubeconfig = _read_kubeconfig_line(process, log)
    env["KUBECONFIG"] = str(kubeconfig)
    cluster = LocalCluster(state_dir, kubeconfig, tools, process, log, env)
    try:
        yield cluster
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        assert code == 0, f"`up --node` stopped with {code}:\n{log.read_text()[-4000:]}"


# --- the local registry (tests/e2e/test_real_node.py) -------------------------------------


REGISTRY_COMMAND = (sys.executable, "-m", "tasklease.controlplane", "registry")  # make registry


@dataclass
class LocalRegistry:
    """A registry run by the CLI beside the cluster, pulled from by its node."""

    address: str  # 127.0.0.1:PORT
    folder: Path
    process: subprocess.Popen[str]
    log: Path


def _processes_naming(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in argv:
                    found.append(f"{proc.name}: {argv}")
    return found


@pytest.fixture(scope="module")
def local_registry(
    local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalRegistry]:
    """`make registry` (the same command line, with a folder of its own) beside the session's
    cluster; stopped at the end of the module, leaving no process behind (the registry and
    its relay to the node)."""
    root = tmp_path_factory.mktemp("registry")
    folder = root / "state"
    log = root / "registry.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*REGISTRY_COMMAND, "--state-dir", str(folder)],
            cwd=REPO_ROOT,
            env=local_cluster.env,  # TASKLEASE_STATE_DIR: the node to serve
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    address = _read_export_line(process, log, "REGISTRY", "registry")
    try:
        yield LocalRegistry(address, folder, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        assert code == 0, f"`registry` stopped with {code}:\n{log.read_text()[-4000:]}"
        left = _processes_naming(str(folder)) + _processes_naming(f"TCP:{address}")
        assert not left, f"the registry left processes behind: {left}"
        assert not folder.exists(), f"the registry left {folder} behind"
