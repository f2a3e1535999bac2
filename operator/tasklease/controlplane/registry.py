"""A local OCI registry: the CNCF distribution registry (`registry serve`), so that the image
and the chart are installed from a registry, as on a real cluster.

- **Where**: `127.0.0.1:<free port>` on the host, plain HTTP. Loopback only, so nothing off
  the machine reaches it and it needs no TLS: buildah pushes with `--tls-verify=false`, helm
  with `--plain-http`, and the node's containerd is told by a hosts.toml. Its configuration,
  storage and log are in a folder of its own, emptied on stop (what it holds is rebuilt in
  seconds). A second registry on the same folder fails at start (a lock), instead of wiping
  the first one's storage.
- **The node**: containerd runs in the node's network namespace, where 127.0.0.1 is the
  node's own loopback, not the host's. As for the API server (`node.py`), a relay (socat)
  on the host's end of the node's link (`host_ip`, the same port) forwards to the registry,
  and a hosts.toml in containerd's `config_path` sends pulls of `127.0.0.1:PORT/...` there.
  Pods name the image as it was pushed (`127.0.0.1:PORT/tasklease:0.1.0`), and containerd
  stores it under that name. Both go when the registry stops.
- **Tracing off**: distribution v3 exports OpenTelemetry traces over OTLP unless told not
  to (`OTEL_TRACES_EXPORTER=none`); there is no collector here to send them to.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from tasklease.controlplane.cluster import StateDir, free_port
from tasklease.controlplane.node import add_registry_mirror, read_link
from tasklease.controlplane.process import TAIL_LINES, Child

MARKER: Final = ".tasklease-registry"
ADDRESS_FILE: Final = "address"
STOP_TIMEOUT_S: Final = 10.0
_PORT_RETRIES: Final = 3
# What the OCI distribution spec names for a manifest; the registry answers a HEAD with the
# digest of the one it stores (image index, OCI or Docker manifest, or a Helm chart's).
MANIFEST_TYPES: Final = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


class RegistryError(RuntimeError):
    """The registry could not start or serve the node; the message says why."""


def registry_config(*, address: str, storage: Path) -> str:
    """distribution's configuration: filesystem storage, plain HTTP on `address`."""
    # JSON is YAML; a fixed HTTP secret (random per start) keeps it from warning about one.
    return json.dumps(
        {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": address, "secret": secrets.token_hex(16)},
        },
        indent=2,
    )


def _opener() -> urllib.request.OpenerDirector:
    # No proxies: an HTTP_PROXY meant for the outside must not capture loopback requests.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Registry:
    """A running registry. `Registry.start(folder, binary=...)`; `stop()` is idempotent and
    removes what it made (its process, the node's relay and hosts.toml, its folder's content)."""

    def __init__(self, state: StateDir) -> None:
        self._state = state
        self.folder = state.path
        self.address = ""  # 127.0.0.1:PORT once started
        self._children: list[Child] = []
        self._mirrors: list[Path] = []
        self._stopped = False

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.folder / "registry.log"

    @classmethod
    def start(cls, folder: Path, *, binary: Path, timeout_s: float = 30.0) -> Registry:
        """Start the registry with its files in `folder` (made if missing; refused if it holds
        files that are not a registry's); return once it answers `GET /v2/`."""
        registry = cls(StateDir(folder, marker=MARKER, owner="registry", error=RegistryError))
        try:
            registry._boot(binary, timeout_s=timeout_s)
        except BaseException:
            registry.stop()
            raise
        return registry

    def serve_node(self, node_folder: Path, *, timeout_s: float = 10.0) -> str:
        """Make the running node in `node_folder` pull `127.0.0.1:PORT/...` from this registry
        (a relay on its link's host end, and a hosts.toml); the relay's address."""
        link = read_link(node_folder)
        relay_address = f"{link.host_ip}:{self.port}"
        relay = Child.start(
            "registry-relay",
            [
                "socat",
                f"TCP-LISTEN:{self.port},bind={link.host_ip},reuseaddr,fork",
                f"TCP:{self.address}",
            ],
            log_path=self.folder / "relay.log",
        )
        self._children.append(relay)
        relay.await_ready(
            lambda: self._answers(f"http://{relay_address}"),
            timeout=timeout_s,
            what="answer",
            error=RegistryError,
        )
        try:
            mirror = add_registry_mirror(
                node_folder, host=self.address, mirror=f"http://{relay_address}"
            )
        except OSError as error:
            raise RegistryError(
                f"cannot tell the node's containerd about the registry ({error}); the node "
                f"runs as root, so run the registry as root too"
            ) from None
        self._mirrors.append(mirror)
        return relay_address

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest the registry serves for `repository:reference`; None if it has none."""
        request = urllib.request.Request(
            f"{self.url}/v2/{repository}/manifests/{reference}",
            method="HEAD",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        try:
            with _opener().open(request, timeout=10) as response:
                digest = response.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise
        return str(digest) if digest else None

    def check_running(self) -> None:
        for child in self._children:
            if not child.running:
                raise RegistryError(
                    f"{child.name} exited with code {child.process.returncode}. Last "
                    f"{TAIL_LINES} lines of its log:\n{child.tail()}"
                )

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for mirror in self._mirrors:
            shutil.rmtree(mirror, ignore_errors=True)
        for child in reversed(self._children):
            child.stop(timeout=STOP_TIMEOUT_S)
        self._state.release(keep=False)

    # -- start-up ----------------------------------------------------------------------

    def _boot(self, binary: Path, *, timeout_s: float) -> None:
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
        config = self.folder / "config.yml"
        for attempt in range(1, _PORT_RETRIES + 1):
            # A port picked free may be taken before the registry binds it; then pick again.
            self.address = f"127.0.0.1:{free_port()}"
            config.write_text(
                registry_config(address=self.address, storage=self.folder / "storage")
            )
            child = Child.start(
                "registry", [str(binary), "serve", str(config)], log_path=self.log_path, env=env
            )
            try:
                child.await_ready(
                    lambda: self._answers(self.url),
                    timeout=timeout_s,
                    what="answer",
                    error=RegistryError,
                )
            except RegistryError as error:
                child.stop(timeout=STOP_TIMEOUT_S)
                if "address already in use" not in str(error) or attempt == _PORT_RETRIES:
                    raise
                continue
            self._children.append(child)
            (self.folder / ADDRESS_FILE).write_text(self.address + "\n")
            return

    def _answers(self, url: str) -> bool:
        try:
            with _opener().open(f"{url}/v2/", timeout=2) as response:
                return int(response.status) == 200
        except (OSError, ValueError):
            return False
