"""The benchmark's /proc parsing (bench/procstat.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.procstat import (
    CpuSnapshot,
    classify_components,
    cpu_seconds,
    parse_smaps_rss_kib,
    parse_stat_cpu_ticks,
    parse_status_rss_kib,
    rss_bytes,
    split_cmdline,
)

# A real line from /proc/<pid>/stat, with a command name that contains spaces and a ')'.
STAT = (
    "4242 (kube) api server) S 1 4242 4242 0 -1 4194560 12345 0 0 0 "
    "1500 250 3 4 20 0 12 0 1000 123456789 5000 18446744073709551615 "
    "1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)

STATUS = """Name:\tpython
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t  300000 kB
VmSize:\t  290000 kB
VmRSS:\t  102400 kB
RssAnon:\t   90000 kB
Threads:\t3
"""


def test_cpu_ticks_are_utime_plus_stime_counted_after_the_last_parenthesis() -> None:
    assert parse_stat_cpu_ticks(STAT) == 1500 + 250


def test_children_cpu_is_not_counted() -> None:
    # cutime/cstime (fields 16, 17: 3 and 4 above) belong to reaped children, not to us.
    assert parse_stat_cpu_ticks(STAT) != 1500 + 250 + 3 + 4


def test_a_line_without_a_command_name_is_refused() -> None:
    with pytest.raises(ValueError, match="stat"):
        parse_stat_cpu_ticks("garbage")


def test_rss_is_read_in_kib() -> None:
    assert parse_status_rss_kib(STATUS) == 102400


def test_a_zombie_has_no_rss() -> None:
    assert parse_status_rss_kib("Name:\tx\nState:\tZ (zombie)\n") == 0


def test_cmdline_is_split_on_nul() -> None:
    raw = b"/bin/etcd\0--data-dir=/tmp/cp-1/etcd\0--name=x\0"
    assert split_cmdline(raw) == ["/bin/etcd", "--data-dir=/tmp/cp-1/etcd", "--name=x"]


def test_components_are_found_by_their_state_dir() -> None:
    processes = [
        (10, ["/cache/etcd", "--data-dir=/tmp/cp-1/etcd"]),
        (11, ["/cache/kube-apiserver", "--tls-cert-file=/tmp/cp-1/pki/apiserver.crt"]),
        # Another engineer's control plane on the same machine: not ours.
        (12, ["/cache/kube-apiserver", "--tls-cert-file=/tmp/cp-2/pki/apiserver.crt"]),
        (13, ["/usr/bin/vim", "/tmp/cp-1/etcd/notes"]),
        (14, []),
    ]
    found = classify_components(processes, "/tmp/cp-1", ["etcd", "kube-apiserver"])
    assert found == {"etcd": 10, "kube-apiserver": 11}


def test_two_processes_of_one_component_are_an_error() -> None:
    processes = [
        (10, ["/a/etcd", "--data-dir=/tmp/cp-1/etcd"]),
        (11, ["/b/etcd", "--data-dir=/tmp/cp-1/etcd2"]),
    ]
    with pytest.raises(RuntimeError, match="two etcd"):
        classify_components(processes, "/tmp/cp-1", ["etcd"])


def test_deltas_give_cores() -> None:
    before = CpuSnapshot(at=100.0, cpu_s={"operator": 1.0, "etcd": 2.0})
    after = CpuSnapshot(at=110.0, cpu_s={"operator": 3.5, "etcd": 2.5})
    delta = after.minus(before)
    assert delta.seconds == 10.0
    assert delta.cores("operator") == pytest.approx(0.25)
    assert delta.total(["operator", "etcd"]) == pytest.approx(3.0)


def test_this_process_can_be_read() -> None:
    assert cpu_seconds(os.getpid()) > 0
    assert rss_bytes(os.getpid()) > 1024 * 1024


SMAPS = """\
55d0c0a00000-55d0c0c00000 r-xp 00000000 08:01 123   /usr/bin/python3.11
Rss:                 100 kB
55d0c1000000-55d0c3000000 rw-p 00000000 00:00 0     [heap]
Rss:                4000 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                1024 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Rss:                 512 kB
7f0004000000-7f0008000000 rw-p 00000000 00:00 0
Rss:                 300 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0     [stack]
Rss:                  20 kB
"""


def test_smaps_rss_is_split_by_kind_of_mapping() -> None:
    own = Path(f"/proc/{os.getpid()}/smaps").read_text()
    assert parse_smaps_rss_kib(own)["file"] > 0

    assert parse_smaps_rss_kib(SMAPS) == {
        "file": 100,
        "heap": 4000,
        "arenas 1 MiB": 1536,
        "anon other": 320,
    }
