"""The host programs the local real node, the image build and the monitoring tests need,
from Debian's packages.

The node runs containerd and runc, wires pods with the standard CNI plugins, and reaches into
network namespaces with `ip` and `nsenter`; the image build uses buildah (daemonless, so no
Docker engine is needed) and a base image made from Debian's packages by mmdebstrap; the
monitoring tests run Debian's promtool and prometheus. Each is found on PATH (or, for the
CNI plugins, in `/usr/lib/cni`). When some are missing and we are root on a Debian-like
system, they are installed with apt-get; otherwise the error names the exact command to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CNI_BIN_DIR: Final = Path("/usr/lib/cni")
APT_TIMEOUT_S: Final = 900.0


class HostDependencyError(RuntimeError):
    """A host program is missing and cannot be installed here; the message says how."""


@dataclass(frozen=True)
class Requirement:
    """A program (or a file) that must exist, and the Debian package that provides it."""

    name: str
    package: str
    path: Path | None = None  # a fixed file instead of a PATH lookup (CNI plugins, libc.a)

    def present(self) -> bool:
        if self.path is not None:
            return self.path.is_file()
        return shutil.which(self.name) is not None


def _cni(plugin: str) -> Requirement:
    return Requirement(plugin, "containernetworking-plugins", CNI_BIN_DIR / plugin)


NODE: Final = (
    Requirement("containerd", "containerd"),
    Requirement("ctr", "containerd"),
    Requirement("runc", "runc"),
    _cni("bridge"),
    _cni("host-local"),
    _cni("loopback"),
    Requirement("ip", "iproute2"),
    Requirement("iptables", "iptables"),
    Requirement("nsenter", "util-linux"),
    Requirement("socat", "socat"),
)
IMAGE: Final = (
    Requirement("buildah", "buildah"),
    Requirement("mmdebstrap", "mmdebstrap"),
    # The pause image: Kubernetes' pause.c, linked statically, so glibc's static library
    # too (libc6-dev is only a recommendation of gcc).
    Requirement("gcc", "gcc"),
    Requirement(
        "libc.a",
        "libc6-dev",
        Path("/usr/lib") / (sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu") / "libc.a",
    ),
)

# The monitoring tests: promtool checks and unit-tests the chart's alert rules, and a real
# Prometheus scrapes the operator (tests/unit/test_monitoring.py,
# tests/integration/test_monitoring_queries.py); the tests run both as their own children.
# Where apt-get starts services (systemd running, no policy-rc.d), installing the package
# also starts and enables Debian's prometheus service on port 9090, which nothing here uses.
MONITORING: Final = (
    Requirement("promtool", "prometheus"),
    Requirement("prometheus", "prometheus"),
)


def missing(requirements: Iterable[Requirement]) -> list[Requirement]:
    return [requirement for requirement in requirements if not requirement.present()]


def _packages(requirements: Iterable[Requirement]) -> list[str]:
    return sorted({requirement.package for requirement in requirements})


def install_command(requirements: Iterable[Requirement]) -> str:
    """What a user would run to install the missing requirements."""
    packages = " ".join(_packages(requirements))
    return f"apt-get update && apt-get install -y {packages}"


def ensure(
    requirements: Iterable[Requirement],
    *,
    purpose: str,
    say: Callable[[str], None],
    install: bool = True,
) -> None:
    """Make sure every requirement is present, installing it with apt-get when we are root
    on a system that has apt-get (and `install`); else raise with the command to run."""
    absent = missing(requirements)
    if not absent:
        return
    names = ", ".join(requirement.name for requirement in absent)
    command = install_command(absent)
    apt_get = shutil.which("apt-get")
    if not install or os.geteuid() != 0 or apt_get is None:
        why = (
            "not root"
            if os.geteuid() != 0
            else "no apt-get here"
            if apt_get is None
            else "installing was not allowed"
        )
        raise HostDependencyError(
            f"{purpose} needs {names}, which this machine lacks ({why}). On Debian or "
            f"Ubuntu, as root: `{command}`"
        )
    say(f"{purpose} needs {names}; installing Debian packages: {' '.join(_packages(absent))}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        [apt_get, "update", "-qq"],
        [apt_get, "install", "-y", "-qq", "--no-install-recommends", *_packages(absent)],
    ):
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            raise HostDependencyError(
                f"`{' '.join(argv)}` failed with exit code {result.returncode}:\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
    still = missing(absent)
    if still:
        raise HostDependencyError(
            f"installed {' '.join(_packages(absent))}, yet "
            f"{', '.join(requirement.name for requirement in still)} is still missing"
        )
