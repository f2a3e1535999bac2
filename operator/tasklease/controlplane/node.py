"""A real node for the local cluster: containerd and a kubelet, so pods run as containers.

kind cannot run on these machines (Docker cannot start privileged containers: the VM's
capability bounding set lacks CAP_SYS_RESOURCE), so the node is a kubelet on containerd,
joined to the local control plane, with everything it touches kept to itself:

- **Network**: containerd and the kubelet run in a network namespace of their own
  (`nsenter --net`, not `ip netns exec`, which would also give each a private mount
  namespace and hide the kubelet's volume mounts from the containers). A veth pair joins it
  to the host: the host end is `host_ip`, the node end `node_ip` (the Node's InternalIP,
  which the API server dials for `kubectl logs`). Pods get addresses from the CNI bridge
  plugin inside the namespace, and the host routes the pod range to `node_ip`, so tests can
  reach a pod's ports. There is no kube-proxy: inside the namespace, a DNAT rule sends the
  `kubernetes` Service (10.96.0.1:443), which in-cluster clients dial, to a relay (socat) on
  `host_ip` that forwards to the API server's loopback port. The kubelet's own iptables
  chains (`makeIPTablesUtilChains`) are off. Deleting the namespace removes the veth, the
  bridge, the pods' interfaces, the DNAT rule and the route in one step.
- **Processes and cgroups**: containerd places itself (and so every shim it starts) in
  `/<id>/runtime`, the kubelet in `/<id>/kubelet`, and pods go under `/<id>/kubepods`
  (`cgroupRoot`), in every mounted cgroup hierarchy. Stopping kills what is left in those
  cgroups, so no container outlives the node, and removes them.
- **Registries**: containerd reads a `hosts.toml` per registry from `registry_hosts_dir(...)`
  (its `config_path`) at each pull, so a registry can be made reachable after the node
  started. The local registry (`registry.py`) listens on the host's 127.0.0.1, which inside
  the namespace is the node's own loopback: `add_registry_mirror` sends pulls of
  `127.0.0.1:PORT/...` to a relay on `host_ip` instead, over plain HTTP. The link's
  addresses are in `link.json` in the node's folder (`read_link`) for such helpers in other
  processes.
- **Files and mounts**: containerd's root, state and socket, the kubelet's root, certs and
  pod logs, the CNI configuration and IPAM data all live under the node's folder; stopping
  unmounts whatever is mounted below it. The kubelet also uses a few fixed host paths (its
  device-plugin socket, `/var/log/containers` links, the CNI result cache); stopping removes
  what this node put there.

Needs root, Linux, and the Debian packages in `hostdeps.NODE` (installed when missing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from tasklease.controlplane.binaries import Binaries
from tasklease.controlplane.kubeconfig import write_kubeconfig
from tasklease.controlplane.pki import Pki, issue_client_cert
from tasklease.controlplane.process import TAIL_LINES, Child

NODE_NAME: Final = "tasklease-node"
SERVICE_PORT: Final = 443
# 10.250.N.0/30 joins host and node; 10.244.N.0/24 holds the pods; N is picked free.
LINK_NETWORK: Final = "10.250.{n}.0/30"
POD_NETWORK: Final = "10.244.{n}.0/24"
CNI_BIN_DIR: Final = Path("/usr/lib/cni")
# Paths the kubelet, containerd and the CNI plugins use whatever they are told.
DEVICE_PLUGIN_SOCKET: Final = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
CONTAINER_LOG_LINKS: Final = Path("/var/log/containers")
CNI_RESULT_CACHE: Final = Path("/var/lib/cni/results")
CNI_LOOPBACK_NETWORK: Final = "cni-loopback"  # containerd's own, for each pod's `lo`
NETNS_DIR: Final = Path("/run/netns")
LINK_FILE: Final = "link.json"
# Folders the above create when missing; removed at stop if this node created them and
# they are empty again (deepest first).
HOST_DIRS: Final = (
    DEVICE_PLUGIN_SOCKET.parent,
    DEVICE_PLUGIN_SOCKET.parent.parent,
    CONTAINER_LOG_LINKS,
    CNI_RESULT_CACHE,
    CNI_RESULT_CACHE.parent,
    Path("/run/containerd/s"),
    Path("/run/containerd"),
    NETNS_DIR,
)
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
# A unix socket path must fit in sun_path (108 bytes).
_SOCKET_PATH_MAX: Final = 100
_KILL_ROUNDS: Final = 50
_REAP_TIMEOUT_S: Final = 10.0


class NodeError(RuntimeError):
    """The node could not start or stop cleanly; the message says why and what to do."""


@dataclass(frozen=True)
class NodeImages:
    """Image archives the node imports at start, since it pulls from no registry: the pod
    sandbox ("pause") image containerd needs, named `sandbox_name`, and any others (the
    project's own image)."""

    sandbox: Path
    sandbox_name: str
    others: tuple[Path, ...] = ()


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0) -> str:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise NodeError(
            f"`{' '.join(argv)}` failed with exit code {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


# -- addresses -------------------------------------------------------------------------


@dataclass(frozen=True)
class Addresses:
    """The node's link to the host and its pod range."""

    host_ip: str
    node_ip: str
    link_prefix: int
    pod_cidr: str

    @property
    def pod_gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @classmethod
    def pick(cls, in_use: Iterable[ipaddress.IPv4Network], *, start: int) -> Addresses:
        """The first N (from `start`, wrapping) whose link and pod networks overlap nothing
        in use on the host (its routes and addresses)."""
        taken = list(in_use)
        for offset in range(256):
            n = (start + offset) % 256
            link = ipaddress.IPv4Network(LINK_NETWORK.format(n=n))
            pod = ipaddress.IPv4Network(POD_NETWORK.format(n=n))
            if any(link.overlaps(net) or pod.overlaps(net) for net in taken):
                continue
            host, node = link.hosts()
            return cls(str(host), str(node), link.prefixlen, str(pod))
        raise NodeError(
            f"every network {POD_NETWORK} and {LINK_NETWORK} (n = 0..255) is in use here"
        )


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    routes = json.loads(_run(["ip", "-json", "-4", "route", "show", "table", "all"]) or "[]")
    found: list[ipaddress.IPv4Network] = []
    for route in routes:
        destination = route.get("dst", "default")
        if destination in ("default", "") or ":" in destination:
            continue
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network(destination, strict=False))
    return found


# -- cgroups ---------------------------------------------------------------------------


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 controllers, named ones, and v2)."""
    mounts: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fstype = after.split(" ", 1)[0]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append(Path(before.split(" ")[4]))
    return sorted(set(mounts))


class _Cgroups:
    """`/<name>` in every hierarchy: created at start, emptied and removed at stop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hierarchies = cgroup_hierarchies()

    def path(self, *parts: str) -> str:
        return "/" + "/".join((self.name, *parts))

    def create(self, *children: str) -> None:
        for hierarchy in self.hierarchies:
            for child in ("", *children):
                folder = hierarchy / self.name / child if child else hierarchy / self.name
                folder.mkdir(exist_ok=True)
                if (folder / "cpuset.cpus").exists():
                    # A new cpuset cgroup starts empty and admits no process until set.
                    parent = folder.parent
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        (folder / name).write_text((parent / name).read_text())

    def _folders(self) -> list[Path]:
        folders: list[Path] = []
        for hierarchy in self.hierarchies:
            top = hierarchy / self.name
            if top.is_dir():
                folders += [Path(root) for root, _dirs, _files in os.walk(top)]
        return folders

    def pids(self) -> set[int]:
        found: set[int] = set()
        for folder in self._folders():
            with contextlib.suppress(OSError):
                found |= {int(pid) for pid in (folder / "cgroup.procs").read_text().split()}
        return found

    def kill_all(self, *, also: Iterable[int] = ()) -> None:
        """SIGKILL every process in our cgroups until none is left (a process may fork
        while we read), then wait until they, and `also` (processes that were in our
        cgroups earlier), are gone from the process table: a process that exits leaves its
        cgroup at once but lingers until its parent reaps it, and a shim's parent is init."""
        killed: set[int] = set(also)
        for _ in range(_KILL_ROUNDS):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed |= pids
            time.sleep(0.1)
        else:
            raise NodeError(f"processes in cgroup /{self.name} survive SIGKILL: {sorted(pids)}")
        deadline = time.monotonic() + _REAP_TIMEOUT_S
        while (left := {pid for pid in killed if Path(f"/proc/{pid}").exists()}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        if left:
            raise NodeError(f"killed processes {sorted(left)} were not reaped")

    def remove(self) -> None:
        for folder in sorted(self._folders(), key=lambda path: len(path.parts), reverse=True):
            for _ in range(20):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the kernel reaps the last task
                    time.sleep(0.05)


# -- mounts ----------------------------------------------------------------------------


def mounts_under(folder: Path) -> list[Path]:
    """Mount points at or below `folder`, deepest first."""
    prefix = str(folder.resolve())
    found: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda path: len(path.parts), reverse=True)


def unmount_all(folder: Path) -> None:
    for _ in range(5):
        points = mounts_under(folder)
        if not points:
            return
        for point in points:
            _run(["umount", "--lazy", str(point)], check=False)
    left = mounts_under(folder)
    if left:
        raise NodeError(f"cannot unmount {', '.join(map(str, left))}")


# -- configuration ---------------------------------------------------------------------


def containerd_config(
    *,
    folder: Path,
    socket: Path,
    cgroup: str,
    sandbox_image: str,
    cni_conf_dir: Path,
    registry_hosts: Path,
) -> str:
    """containerd's configuration: its own root, state and socket; pods through CRI."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
root = "{folder / "root"}"
state = "{folder / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[cgroup]
  path = "{cgroup}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{folder / "opt"}"

  [{cri}]
    sandbox_image = "{sandbox_image}"
    # Without it runc fails every sandbox here: root may not lower oom_score_adj.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

    [{cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"

      [{cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"

        [{cri}.containerd.runtimes.runc.options]
          SystemdCgroup = false

    [{cri}.cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = "{cni_conf_dir}"

    [{cri}.registry]
      config_path = "{registry_hosts}"
"""


def registry_hosts_dir(node_folder: Path) -> Path:
    """containerd's `config_path`: one folder per registry host, holding its `hosts.toml`."""
    return node_folder / "containerd" / "certs.d"


def registry_hosts_toml(*, host: str, mirror: str) -> str:
    """containerd's hosts.toml for pulling `host`'s images from `mirror` (a URL; `http://`
    for plain HTTP), with `host` itself tried last."""
    return f"""\
# Written by tasklease: pulls of {host}/... go to {mirror}, then to {host} itself.
server = "http://{host}"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
"""


def add_registry_mirror(node_folder: Path, *, host: str, mirror: str) -> Path:
    """Make the node's containerd pull `host`'s images from `mirror`, from its next pull on;
    the folder written (removed with the node, or by the caller when the mirror goes)."""
    folder = registry_hosts_dir(node_folder) / host
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts.toml").write_text(registry_hosts_toml(host=host, mirror=mirror))
    return folder


def read_link(node_folder: Path) -> Addresses:
    """The addresses of a running node's link, from the file it wrote at start."""
    try:
        data = json.loads((node_folder / LINK_FILE).read_text())
        return Addresses(**data)
    except (OSError, ValueError, TypeError) as error:
        raise NodeError(f"no running node in {node_folder} ({error})") from None


def cni_config(*, network: str, addresses: Addresses, ipam_dir: Path) -> dict[str, object]:
    """A bridge with host-local addresses; no IP masquerade (pods need only the API server,
    which the node reaches through the host link) and no portmap, so no iptables chains.
    containerd sets up each pod's loopback itself."""
    return {
        "cniVersion": "0.4.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": addresses.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ],
    }


def kubelet_config(
    *,
    socket: Path,
    client_ca: Path,
    cgroups: _Cgroups,
    pod_logs: Path,
    volume_plugins: Path,
) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroups.path(),
        "kubeletCgroups": cgroups.path("kubelet"),
        "failCgroupV1": False,
        "failSwapOn": False,
        # The host's iptables are not ours to change (and the node has its own namespace).
        "makeIPTablesUtilChains": False,
        "address": "0.0.0.0",
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "podLogsDir": str(pod_logs),
        "volumePluginDir": str(volume_plugins),
        "clusterDomain": "cluster.local",
        "serializeImagePulls": False,
        "registerNode": True,
        # Far below what a shared CI disk has free, so nothing is evicted for disk pressure.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
    }


# -- the node --------------------------------------------------------------------------


class Node:
    """A running node. `Node.start(...)`; `stop()` is idempotent and leaves nothing behind."""

    def __init__(self, *, folder: Path, run_id: str) -> None:
        self.folder = folder
        self.run_id = run_id
        self.name = NODE_NAME
        self.netns = f"tasklease-{run_id}"
        self.host_link = f"tlh{run_id}"
        self.network = f"tasklease-{run_id}"
        self.cgroups = _Cgroups(f"tasklease-{run_id}")
        self.addresses: Addresses | None = None
        self._children: list[Child] = []
        self._stopped = False
        self._host_dirs_before = {path for path in HOST_DIRS if path.exists()}

    # -- public ------------------------------------------------------------------------

    @property
    def children(self) -> tuple[Child, ...]:
        return tuple(self._children)

    @property
    def containerd_socket(self) -> Path:
        return self.folder / "containerd" / "containerd.sock"

    @property
    def pod_logs(self) -> Path:
        return self.folder / "pod-logs"

    def log_path(self, component: str) -> Path:
        return self.folder / "logs" / f"{component}.log"

    def ctr(self, *args: str, timeout: float = 300.0) -> str:
        """Run `ctr` against this node's containerd, in the `k8s.io` namespace (CRI's)."""
        return _run(
            ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
            timeout=timeout,
        )

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", "--no-unpack", str(archive))

    @classmethod
    def start(
        cls,
        folder: Path,
        *,
        binaries: Binaries,
        pki: Pki,
        apiserver_port: int,
        service_ip: str,
        images: NodeImages,
        timeout: float = 120.0,
    ) -> Node:
        """Start containerd and a kubelet registered as `tasklease-node` with the API server
        on 127.0.0.1:`apiserver_port`, after importing `images`. Returns once the kubelet
        runs; the caller waits for the Node to be Ready (it has the API client)."""
        if os.geteuid() != 0:
            raise NodeError(
                "a local node runs containerd and a kubelet, which need root; run as root "
                "(or use the control plane without a node)"
            )
        socket_path = folder / "containerd" / "containerd.sock"
        if len(str(socket_path)) > _SOCKET_PATH_MAX:
            raise NodeError(
                f"the node's folder {folder} is too deep for a unix socket path "
                f"({len(str(socket_path))} > {_SOCKET_PATH_MAX} characters); use a shorter "
                f"state dir"
            )
        node = cls(folder=folder, run_id=secrets.token_hex(3))
        try:
            node._boot(
                binaries=binaries,
                pki=pki,
                apiserver_port=apiserver_port,
                service_ip=service_ip,
                images=images,
                timeout=timeout,
            )
        except BaseException:
            node.stop()
            raise
        return node

    def check_running(self) -> None:
        for child in self._children:
            if not child.running:
                raise NodeError(
                    f"{child.name} exited with code {child.process.returncode}. Last "
                    f"{TAIL_LINES} lines of its log:\n{child.tail()}"
                )

    def stop(self) -> None:
        """Stop the kubelet, every container, containerd and the relay; then remove the
        cgroups, mounts, network namespace and host files this node made."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[str] = []
        children = {child.name: child for child in self._children}
        # Shims exit by themselves once their containers are deleted; wait for those too.
        ours = self.cgroups.pids()

        def stop_child(name: str, timeout: float) -> Callable[[], None]:
            return lambda: children[name].stop(timeout=timeout) if name in children else None

        steps: list[tuple[str, Callable[[], None]]] = [
            ("stop the kubelet", stop_child("kubelet", 10)),
            ("stop the containers", self._kill_tasks),
            ("stop containerd", stop_child("containerd", 10)),
            ("kill what is left in the node's cgroups", lambda: self.cgroups.kill_all(also=ours)),
            ("stop the relay", stop_child("relay", 5)),
            ("unmount", lambda: unmount_all(self.folder)),
            ("delete the network namespace", self._delete_network),
            ("remove the cgroups", self.cgroups.remove),
            ("remove host files", self._remove_host_files),
        ]
        # Every step runs even when one before it failed: each cleans up something else.
        for what, step in steps:
            try:
                step()
            except Exception as error:
                errors.append(f"{what}: {error}")
        for child in self._children:
            with contextlib.suppress(Exception):
                child.stop(timeout=1)
        if errors:
            raise NodeError("the node did not stop cleanly: " + "; ".join(errors))

    # -- start-up ----------------------------------------------------------------------

    def _mkdir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _boot(
        self,
        *,
        binaries: Binaries,
        pki: Pki,
        apiserver_port: int,
        service_ip: str,
        images: NodeImages,
        timeout: float,
    ) -> None:
        self._mkdir(self.folder / "logs")
        addresses = self._make_network(apiserver_port=apiserver_port, service_ip=service_ip)
        (self.folder / LINK_FILE).write_text(json.dumps(dataclasses.asdict(addresses)))
        self.cgroups.create("runtime", "kubelet")

        # The relay from the node's side of the link to the API server on loopback.
        self._spawn(
            "relay",
            [
                "socat",
                f"TCP-LISTEN:{apiserver_port},bind={addresses.host_ip},reuseaddr,fork",
                f"TCP:127.0.0.1:{apiserver_port}",
            ],
            in_netns=False,
        )

        containerd_dir = self._mkdir(self.folder / "containerd")
        cni_conf_dir = self._mkdir(self.folder / "cni" / "net.d")
        (cni_conf_dir / "10-tasklease.conflist").write_text(
            json.dumps(
                cni_config(
                    network=self.network,
                    addresses=addresses,
                    ipam_dir=self.folder / "cni" / "ipam",
                ),
                indent=2,
            )
        )
        config = containerd_dir / "config.toml"
        config.write_text(
            containerd_config(
                folder=containerd_dir,
                socket=self.containerd_socket,
                cgroup=self.cgroups.path("runtime"),
                sandbox_image=images.sandbox_name,
                cni_conf_dir=cni_conf_dir,
                registry_hosts=self._mkdir(registry_hosts_dir(self.folder)),
            )
        )
        containerd = self._spawn("containerd", ["containerd", "--config", str(config)])
        containerd.await_ready(
            self._containerd_ready, timeout=timeout, what="answer", error=NodeError
        )
        for archive in (images.sandbox, *images.others):
            self.import_image(archive)

        credentials = issue_client_cert(
            pki, "node", common_name=f"system:node:{self.name}", organization="system:nodes"
        )
        kubelet_dir = self._mkdir(self.folder / "kubelet")
        kubeconfig = kubelet_dir / "kubeconfig"
        write_kubeconfig(
            kubeconfig,
            # The node reaches the API server as pods do: the Service address, relayed.
            server=f"https://{service_ip}:{SERVICE_PORT}",
            ca=pki.ca.cert,
            cert=credentials.cert,
            key=credentials.key,
            user=f"system:node:{self.name}",
        )
        kubelet_config_path = kubelet_dir / "config.yaml"
        kubelet_config_path.write_text(
            yaml.safe_dump(
                kubelet_config(
                    socket=self.containerd_socket,
                    client_ca=pki.ca.cert,
                    cgroups=self.cgroups,
                    pod_logs=self._mkdir(self.pod_logs),
                    volume_plugins=self._mkdir(kubelet_dir / "volume-plugins"),
                )
            )
        )
        self._spawn(
            "kubelet",
            [
                str(binaries.kubelet),
                f"--config={kubelet_config_path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self._mkdir(kubelet_dir / 'root')}",
                f"--cert-dir={self._mkdir(kubelet_dir / 'pki')}",
                f"--hostname-override={self.name}",
                f"--node-ip={addresses.node_ip}",
            ],
        )

    def _spawn(self, name: str, argv: list[str], *, in_netns: bool = True) -> Child:
        if in_netns:
            argv = ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *argv]
        child = Child.start(name, argv, log_path=self.log_path(name))
        self._children.append(child)
        return child

    def _containerd_ready(self) -> bool:
        if not self.containerd_socket.exists():
            return False
        try:
            self.ctr("version", timeout=10)
        except (NodeError, subprocess.TimeoutExpired):
            return False
        return True

    def _make_network(self, *, apiserver_port: int, service_ip: str) -> Addresses:
        addresses = Addresses.pick(_networks_in_use(), start=secrets.randbelow(256))
        self.addresses = addresses
        netns = self.netns
        link = f"{addresses.host_ip}/{addresses.link_prefix}"
        node_link = f"{addresses.node_ip}/{addresses.link_prefix}"
        _run(["ip", "netns", "add", netns])
        steps: list[list[str]] = [
            [
                "ip",
                "link",
                "add",
                self.host_link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns,
            ],
            ["ip", "addr", "add", link, "dev", self.host_link],
            ["ip", "link", "set", self.host_link, "up"],
            ["ip", "-n", netns, "link", "set", "lo", "up"],
            ["ip", "-n", netns, "addr", "add", node_link, "dev", "eth0"],
            ["ip", "-n", netns, "link", "set", "eth0", "up"],
            ["ip", "-n", netns, "route", "add", "default", "via", addresses.host_ip],
            [
                "ip",
                "route",
                "add",
                addresses.pod_cidr,
                "via",
                addresses.node_ip,
                "dev",
                self.host_link,
            ],
            ["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        ]
        relay = f"{addresses.host_ip}:{apiserver_port}"
        for chain in ("OUTPUT", "PREROUTING"):
            steps.append(
                ["ip", "netns", "exec", netns, "iptables", "-t", "nat", "-A", chain,
                 "-d", f"{service_ip}/32", "-p", "tcp", "--dport", str(SERVICE_PORT),
                 "-j", "DNAT", "--to-destination", relay]
            )  # fmt: skip
        for step in steps:
            _run(step)
        return addresses

    # -- stopping ----------------------------------------------------------------------

    def _kill_tasks(self) -> None:
        """Kill and delete every container through containerd, so the shims exit and
        remove their sockets (under /run/containerd/s, which containerd 1.6 does not move)."""
        if not self._containerd_ready():
            return
        listing = self.ctr("tasks", "list", "--quiet", timeout=30).split()
        for task in listing:
            with contextlib.suppress(NodeError, subprocess.TimeoutExpired):
                self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, timeout=30)
        for task in listing:
            with contextlib.suppress(NodeError, subprocess.TimeoutExpired):
                self.ctr("tasks", "delete", "--force", task, timeout=30)

    def _delete_network(self) -> None:
        if (NETNS_DIR / self.netns).exists():
            _run(["ip", "netns", "delete", self.netns])
        # The veth goes with the namespace, and the pod route with the veth; a link left by
        # an interrupted start-up would not.
        _run(["ip", "link", "delete", self.host_link], check=False)

    def _remove_host_files(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            DEVICE_PLUGIN_SOCKET.unlink()
        pod_logs = str(self.pod_logs)
        if CONTAINER_LOG_LINKS.is_dir():
            for link in CONTAINER_LOG_LINKS.iterdir():
                with contextlib.suppress(OSError):
                    if link.is_symlink() and os.readlink(link).startswith(pod_logs):
                        link.unlink()
        if CNI_RESULT_CACHE.is_dir():
            # `<network>-<sandbox id>-<interface>`: ours, and containerd's loopback entry
            # of the same sandboxes.
            prefix = f"{self.network}-"
            for result in CNI_RESULT_CACHE.glob(f"{prefix}*"):
                sandbox = result.name.removeprefix(prefix).rsplit("-", 1)[0]
                for entry in (result, CNI_RESULT_CACHE / f"{CNI_LOOPBACK_NETWORK}-{sandbox}-lo"):
                    with contextlib.suppress(OSError):
                        entry.unlink()
        if (
            NETNS_DIR not in self._host_dirs_before
            and NETNS_DIR.is_dir()
            and not any(NETNS_DIR.iterdir())
        ):
            # `ip netns add` makes the folder a shared bind mount of itself on first use.
            unmount_all(NETNS_DIR)
        for folder in sorted(HOST_DIRS, key=lambda path: len(path.parts), reverse=True):
            if folder not in self._host_dirs_before:
                with contextlib.suppress(OSError):  # not empty (someone else's), or gone
                    folder.rmdir()
        shutil.rmtree(self.folder, ignore_errors=True)
