"""What a local node may change on the host, read so that a test can compare before and after:
processes, mounts, network interfaces and namespaces, cgroups, iptables rules, and the fixed
host paths the kubelet, containerd and the CNI plugins use."""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tasklease.controlplane.node import DEVICE_PLUGIN_SOCKET, HOST_DIRS, cgroup_hierarchies

# Programs a node starts; any of them running afterwards was left behind.
NODE_PROGRAMS = frozenset(
    {"containerd", "containerd-shim", "containerd-shim-runc-v2", "kubelet", "kube-scheduler",
     "socat", "pause", "runc"}
)  # fmt: skip


def _lines(*argv: str) -> tuple[str, ...]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return tuple(sorted(result.stdout.splitlines()))


def _processes() -> tuple[str, ...]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if name in NODE_PROGRAMS:
            found.append(f"{proc.name} {name}")
    return tuple(sorted(found))


def _iptables() -> tuple[str, ...]:
    # Chain lines carry packet counters ("[0:0]"), which move by themselves.
    rules = _lines("iptables-save")
    return tuple(re.sub(r"\[\d+:\d+\]", "", line) for line in rules if not line.startswith("#"))


def _cgroups() -> tuple[str, ...]:
    return tuple(
        sorted(
            str(child)
            for hierarchy in cgroup_hierarchies()
            for child in hierarchy.iterdir()
            if child.is_dir()
        )
    )


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _host_files() -> tuple[str, ...]:
    entries = []
    for folder in HOST_DIRS:
        if folder.is_dir():
            entries.append(f"{folder}/")
            entries += [str(entry) for entry in folder.iterdir()]
    if DEVICE_PLUGIN_SOCKET.exists() and not _listening(DEVICE_PLUGIN_SOCKET):
        # A kubelet that died without stopping leaves its socket at this fixed path; the next
        # kubelet replaces it and removes it when it stops.
        entries.remove(str(DEVICE_PLUGIN_SOCKET))
    return tuple(sorted(entries))


@dataclass(frozen=True)
class HostState:
    processes: tuple[str, ...]
    mounts: tuple[str, ...]
    links: tuple[str, ...]
    netns: tuple[str, ...]
    cgroups: tuple[str, ...]
    iptables: tuple[str, ...]
    files: tuple[str, ...]

    def differences(self, other: HostState) -> dict[str, tuple[list[str], list[str]]]:
        """Per aspect, what `other` lacks and what it has in excess of this state."""
        found = {}
        for aspect in self.__dataclass_fields__:
            before, after = set(getattr(self, aspect)), set(getattr(other, aspect))
            if before != after:
                found[aspect] = (sorted(before - after), sorted(after - before))
        return found


def host_state() -> HostState:
    return HostState(
        processes=_processes(),
        mounts=tuple(
            sorted(
                line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            )
        ),
        links=tuple(
            line.split(":")[1].strip().split("@")[0] for line in _lines("ip", "-o", "link")
        ),
        netns=_lines("ip", "netns", "list"),
        cgroups=_cgroups(),
        iptables=_iptables(),
        files=_host_files(),
    )
