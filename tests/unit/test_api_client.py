"""The operator's API client reads the proxy environment once, not on every request."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest

from tasklease.kube.client import api_client

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://10.1.2.3:6443", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: t}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
"""

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def _client_settings(folder: Path) -> dict[str, Any]:
    async def made() -> dict[str, Any]:
        api = await api_client(kubeconfig=folder / "kubeconfig")
        try:
            session = api.rest_client.pool_manager
            return {
                "trust_env": session.trust_env,
                "proxy": api.rest_client.proxy,
                "proxy_headers": api.rest_client.proxy_headers,
            }
        finally:
            await api.close()

    return asyncio.run(made())


def test_without_proxy_variables_requests_go_straight_to_the_api_server(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # trust_env off: aiohttp would otherwise look up .netrc and the proxy in a thread per request.
    assert _client_settings(tmp_path) == {"trust_env": False, "proxy": None, "proxy_headers": None}


def test_a_proxy_in_the_environment_is_kept_with_its_credentials_as_a_header(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environment.setenv("HTTPS_PROXY", "http://alice:s3cret@proxy.example:3128")
    settings = _client_settings(tmp_path)
    assert settings["trust_env"] is False
    assert settings["proxy"] == "http://proxy.example:3128"
    credentials = base64.b64encode(b"alice:s3cret").decode()
    assert settings["proxy_headers"] == {"Proxy-Authorization": f"Basic {credentials}"}


def test_no_proxy_covering_the_api_server_wins(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environment.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    environment.setenv("NO_PROXY", "localhost,10.1.2.3")
    assert _client_settings(tmp_path) == {"trust_env": False, "proxy": None, "proxy_headers": None}
