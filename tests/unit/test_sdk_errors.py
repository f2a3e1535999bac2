"""How the runner SDK reads a failed request: which failures say the API server is down (an
outage the operator sees too, which does not count against the lease) and which may be a
partition of this runner alone (which does). The network errors are real ones, raised by
urllib3 (the client's transport) against local sockets."""

from __future__ import annotations

import socket

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from tasklease.controlplane.cluster import free_port
from tasklease.runner.sdk import _server_down


def _failure(port: int, *, timeout_s: float = 5.0) -> Exception:
    try:
        urllib3.PoolManager().request(
            "GET", f"http://127.0.0.1:{port}/apis", retries=0, timeout=timeout_s
        )
    except Exception as error:
        return error
    raise AssertionError("the request succeeded")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_server_errors_say_the_server_is_down(status: int) -> None:
    assert _server_down(ApiException(status=status))


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_refusals_say_nothing_of_an_outage(status: int) -> None:
    assert not _server_down(ApiException(status=status))


def test_a_refused_connection_says_the_server_is_down() -> None:
    assert _server_down(_failure(free_port()))


def test_a_timeout_may_be_a_partition() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        assert not _server_down(_failure(silent.getsockname()[1], timeout_s=0.2))
