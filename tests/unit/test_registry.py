"""The local registry's pure parts: its configuration, and containerd's hosts.toml and
`config_path` that point the node at it. The registry itself runs, is pulled from by the node
and is stopped leaving nothing behind in tests/e2e/test_real_node.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from tasklease.controlplane.node import (
    add_registry_mirror,
    containerd_config,
    registry_hosts_dir,
)
from tasklease.controlplane.registry import registry_config


def test_config_serves_plain_http_on_the_address_from_the_storage_folder(tmp_path: Path) -> None:
    config = yaml.safe_load(registry_config(address="127.0.0.1:5000", storage=tmp_path))
    assert config["http"]["addr"] == "127.0.0.1:5000"
    assert "tls" not in config["http"]
    assert config["storage"]["filesystem"]["rootdirectory"] == str(tmp_path)


def test_node_pulls_the_registry_host_from_the_mirror(tmp_path: Path) -> None:
    folder = add_registry_mirror(tmp_path, host="127.0.0.1:5000", mirror="http://10.250.7.1:5000")
    assert folder == registry_hosts_dir(tmp_path) / "127.0.0.1:5000"
    hosts = tomllib.loads((folder / "hosts.toml").read_text())
    assert hosts["host"] == {"http://10.250.7.1:5000": {"capabilities": ["pull", "resolve"]}}
    config = tomllib.loads(
        containerd_config(
            folder=tmp_path,
            socket=tmp_path / "containerd.sock",
            cgroup="/x/runtime",
            sandbox_image="pause",
            cni_conf_dir=tmp_path / "net.d",
            registry_hosts=registry_hosts_dir(tmp_path),
        )
    )
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["registry"]["config_path"] == str(registry_hosts_dir(tmp_path))
