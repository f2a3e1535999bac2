"""The operator's memory settings: malloc_trim gives freed heap pages back (glibc), or says
it cannot; TLS connections get small read buffers."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import os
import platform
import ssl

import pytest

from tasklease.kube.client import TLS_READ_BUFFER_BYTES, use_small_tls_read_buffers
from tasklease.operator.memory import malloc_trim

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_malloc_trim_returns_pages_freed_in_the_middle_of_the_heap() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"not glibc ({platform.libc_ver()[0] or 'unknown C library'}): no malloc_trim")
    trim = malloc_trim()
    assert trim is not None
    trim()
    # 64 MiB in 32 KiB blocks (below glibc's mmap threshold: they live in the heap), written
    # to so that they are resident; the last one stays, so free() alone cannot shrink the
    # heap from its top. This is the shape a burst of decoded Task bodies leaves.
    blocks = [bytearray(b"x" * (32 * 1024)) for _ in range(2048)]
    pin = blocks.pop()
    del blocks
    before = rss_bytes()
    assert trim()
    after = rss_bytes()
    assert before - after > 32 * MIB, (before // MIB, after // MIB)
    del pin


def test_tls_connections_get_small_read_buffers() -> None:
    """asyncio zero-fills a read buffer per TLS connection; ours are 64 KiB, not 256 KiB."""
    use_small_tls_read_buffers()
    loop = asyncio.new_event_loop()
    try:
        protocol = asyncio.sslproto.SSLProtocol(
            loop, asyncio.Protocol(), ssl.create_default_context(), loop.create_future()
        )
        assert len(protocol.get_buffer(-1)) == TLS_READ_BUFFER_BYTES
    finally:
        loop.close()
