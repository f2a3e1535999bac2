"""CPU time and memory of processes, read from /proc (Linux only).

CPU is `utime + stime` of `/proc/<pid>/stat` (all threads of the process, children not
included), in clock ticks converted to seconds; memory is `VmRSS` of `/proc/<pid>/status`.
The parsing functions take the files' text so they can be tested without a process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS: int = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


class ProcessGone(RuntimeError):
    """The process exited (or never existed) while we were reading it."""


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of /proc/<pid>/stat.

    The second field (the command name in parentheses) may contain spaces and parentheses,
    so fields are counted after the *last* ')': state is field 3, utime 14, stime 15.
    """
    close = stat.rfind(")")
    if close < 0:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    fields = stat[close + 2 :].split()
    # fields[0] is field 3 (state); field n is fields[n - 3].
    utime, stime = int(fields[14 - 3]), int(fields[15 - 3])
    return utime + stime


def parse_status_rss_kib(status: str) -> int:
    """VmRSS in KiB from the text of /proc/<pid>/status (0 for a zombie, which has none)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            value = int(parts[1])
            unit = parts[2] if len(parts) > 2 else "kB"
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return value
    return 0


def split_cmdline(raw: bytes) -> list[str]:
    """argv from the NUL-separated bytes of /proc/<pid>/cmdline."""
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def parse_machine_busy_ticks(stat: str) -> int:
    """Ticks all CPUs spent busy (everything but idle and iowait), from /proc/stat's first
    line: `cpu user nice system idle iowait irq softirq steal guest guest_nice`. Guest time
    is already counted in user and nice."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
            return user + nice + system + irq + softirq + steal
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def machine_busy_seconds() -> float:
    """CPU-seconds every process on the machine (ours and everyone else's) has used."""
    return parse_machine_busy_ticks((PROC / "stat").read_text()) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError) as error:
        raise ProcessGone(f"process {pid} is gone") from error
    return parse_stat_cpu_ticks(text) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError) as error:
        raise ProcessGone(f"process {pid} is gone") from error
    return parse_status_rss_kib(text) * 1024


def parse_smaps_rss_kib(smaps: str) -> dict[str, int]:
    """Resident KiB of /proc/PID/smaps by kind of mapping: where a Python process's RSS is.

    "heap": glibc's main arena; "arenas 1 MiB": anonymous mappings of exactly 1 MiB, which is
    CPython's small-object arena size (3.10+); "anon other": other anonymous mappings (glibc
    thread arenas, blocks above glibc's mmap threshold, stacks); "file": code and data of
    binaries and libraries.
    """
    kinds: dict[str, int] = {}
    kind = "file"
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if path == "[heap]":
                kind = "heap"
            elif path == "" or path.startswith("[anon"):
                kind = "arenas 1 MiB" if end - start == 1 << 20 else "anon other"
            elif path.startswith("["):
                kind = "anon other"  # [stack], [vdso], ...
            else:
                kind = "file"
        elif fields[0] == "Rss:":
            kinds[kind] = kinds.get(kind, 0) + int(fields[1])
    return kinds


def rss_by_kind_mib(pid: int) -> dict[str, float]:
    try:
        text = (PROC / str(pid) / "smaps").read_text()
    except (FileNotFoundError, ProcessLookupError) as error:
        raise ProcessGone(f"process {pid} is gone") from error
    return {kind: kib / 1024 for kind, kib in sorted(parse_smaps_rss_kib(text).items())}


def _cmdlines() -> Iterator[tuple[int, list[str]]]:
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        yield int(entry.name), split_cmdline(raw)


def classify_components(
    processes: Iterable[tuple[int, list[str]]], marker: str, names: Iterable[str]
) -> dict[str, int]:
    """Pids of the components `names` (by argv[0]'s basename) whose command line mentions
    `marker` (the control plane's state dir: every component's flags point into it)."""
    wanted = set(names)
    found: dict[str, int] = {}
    for pid, argv in processes:
        if not argv:
            continue
        name = os.path.basename(argv[0])
        if name in wanted and any(marker in arg for arg in argv[1:]):
            if name in found:
                raise RuntimeError(f"two {name} processes mention {marker}")
            found[name] = pid
    return found


def find_components(state_dir: Path, names: Iterable[str]) -> dict[str, int]:
    """Pids of the control plane's components (etcd, kube-apiserver, ...) found by scanning
    /proc for processes whose flags point into its state dir."""
    return classify_components(_cmdlines(), str(state_dir), names)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds of named processes at one wall-clock instant (monotonic seconds)."""

    at: float
    cpu_s: Mapping[str, float]

    def minus(self, earlier: CpuSnapshot) -> CpuDelta:
        return CpuDelta(
            seconds=self.at - earlier.at,
            cpu_s={
                name: self.cpu_s[name] - earlier.cpu_s[name]
                for name in self.cpu_s
                if name in earlier.cpu_s
            },
        )


@dataclass(frozen=True, slots=True)
class CpuDelta:
    """CPU seconds spent per process over `seconds` of wall-clock time."""

    seconds: float
    cpu_s: Mapping[str, float]

    def cores(self, name: str) -> float:
        """Average number of cores `name` kept busy (1.0: one core, all the time)."""
        return self.cpu_s[name] / self.seconds if self.seconds > 0 else 0.0

    def total(self, names: Iterable[str]) -> float:
        return sum(self.cpu_s[name] for name in names)


MACHINE = "machine"


def snapshot(pids: Mapping[str, int], *, now: float) -> CpuSnapshot:
    """CPU seconds of each named pid, and of the whole machine under the name `machine`."""
    cpu_s = {name: cpu_seconds(pid) for name, pid in pids.items()}
    cpu_s[MACHINE] = machine_busy_seconds()
    return CpuSnapshot(at=now, cpu_s=cpu_s)
