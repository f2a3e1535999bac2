"""A real, single-node Kubernetes control plane on loopback: etcd, kube-apiserver and a
kube-controller-manager running only the controllers tasklease relies on.

Why not envtest or kind: kind needs Docker (absent here and in CI), and envtest runs no
controller-manager, so namespaces never finish deleting, ownerReferences never cascade and no
`default` ServiceAccount appears. This is envtest's recipe plus kube-controller-manager with
five controllers: garbage collection, service accounts, service-account tokens, namespace
deletion and ClusterRole aggregation (see `CONTROLLERS`). By default there are no nodes and no
kubelet: Pods are stored but never run, which is what the operator's tests want (they play
the runner themselves). With `node=`, a scheduler, the controllers of `NODE_CONTROLLERS` and
a real node (`node.py`) run pods as containers, for the end-to-end suite and for trying the
chart.

Trade-offs, each chosen for fast and isolated test sessions:

- A fresh CA, keys and etcd data per start (see `pki.py`); nothing is reused between runs.
- etcd runs with `--unsafe-no-fsync`: the data is thrown away anyway, and fsync dominates
  write latency on CI disks.
- Ports are picked by binding port 0 and closing the socket, which leaves a small window for
  another process to take the port; a start that fails with "address already in use" is
  retried with new ports.
- The controller-manager authenticates as `system:kube-controller-manager` and runs each
  controller under its own service account (`--use-service-account-credentials`), as in a
  real cluster, so RBAC denials a real cluster would produce show up here too.
- The node lifecycle controller runs only with a node: with no kubelets it would only taint.

Processes never outlive the Python process that started them; see `process.py`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self, TextIO

from tasklease.controlplane.binaries import Binaries, obtain_binaries
from tasklease.controlplane.kubeconfig import write_kubeconfig
from tasklease.controlplane.node import NODE_NAME, Node, NodeError, NodeImages
from tasklease.controlplane.pki import Pki, create_pki, issue_client_cert
from tasklease.controlplane.process import TAIL_LINES, Child

SERVICE_CLUSTER_IP_RANGE: Final = "10.96.0.0/16"
FIRST_SERVICE_IP: Final = "10.96.0.1"  # the `kubernetes` Service in `default`
SERVICE_ACCOUNT_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
# Names as listed by `kube-controller-manager --help` (1.37). The aggregation controller fills
# the built-in `admin`, `edit` and `view` ClusterRoles (and any role aggregated into them, like
# a chart's "aggregate-to-edit" role for Tasks); without it they are empty and a RoleBinding
# to `edit` grants nothing, unlike in any real cluster.
CONTROLLERS: Final = (
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "clusterrole-aggregation-controller",
)
# What a node's pods need besides: Deployments, the CA bundle every namespace gets (a pod's
# service-account volume mounts it), and the controller that lifts a new node's
# `not-ready` taint.
NODE_CONTROLLERS: Final = (
    "deployment-controller",
    "replicaset-controller",
    "root-ca-certificate-publisher-controller",
    "node-lifecycle-controller",
)
COMPONENTS: Final = ("etcd", "kube-apiserver", "kube-controller-manager")
NODE_COMPONENTS: Final = ("kube-scheduler",)  # besides the node's own (node.py)
MARKER: Final = ".tasklease-controlplane"
STOP_TIMEOUT: Final = 10.0
_PORT_RETRIES: Final = 3
_TEMP_PREFIX: Final = "tasklease-controlplane-"
_SWEEP_MIN_AGE: Final = 60.0
_KEPT: Final = "kept"


class ControlPlaneError(RuntimeError):
    """A component failed to start or died; the message carries its log's tail."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl run; unlike its base class, its message includes kubectl's stderr."""

    def __str__(self) -> str:
        stderr = self.stderr.strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()}\nstderr: {stderr}"


_live: set[ControlPlane] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        planes = list(_live)
    for plane in planes:
        plane.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _sweep_stale_temp_dirs() -> None:
    """Remove temporary state dirs left by processes that were SIGKILLed (their children died
    with them, but no code ran to delete the folder). A live control plane holds a lock on its
    marker; the age check keeps us off a folder whose owner has not taken the lock yet, and
    folders stopped with `keep_state` say so in their marker."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*"):
        marker = folder / MARKER
        try:
            if time.time() - marker.stat().st_mtime < _SWEEP_MIN_AGE:
                continue
            with marker.open("r") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if lock.read().strip() != _KEPT:
                    shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # in use (BlockingIOError), not ours, or gone meanwhile
            continue


class StateDir:
    """The folder holding one local component's files: a control plane's certs, etcd data,
    logs and kubeconfigs (or, with another `marker`, the registry's storage).

    A folder given by the caller is reused across runs (the CLI's `./.tasklease/controlplane`),
    so it is marked as ours and locked while in use: a second `up` on the same folder fails
    instead of wiping the first one's files, and a folder that is not ours is never wiped.
    Without one, a temporary folder is made (and swept once its owner died).
    """

    def __init__(
        self,
        requested: Path | None,
        *,
        marker: str = MARKER,
        owner: str = "control plane",
        error: Callable[[str], Exception] = ControlPlaneError,
    ) -> None:
        self._marker = marker
        if requested is None:
            _sweep_stale_temp_dirs()
            self.path = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
            self.created = True
        else:
            self.path = requested.expanduser().resolve()
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            entries = {entry.name for entry in self.path.iterdir()}
            if entries and marker not in entries:
                raise error(
                    f"state dir {self.path} is not empty and was not made by tasklease; "
                    f"choose an empty or new folder"
                )
        self._lock: IO[str] | None = (self.path / marker).open("a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            self._lock = None
            raise error(
                f"state dir {self.path} is in use by another {owner} (pid {holder})"
            ) from None
        self._lock.truncate(0)
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        self.clear()

    def clear(self) -> None:
        for entry in self.path.iterdir():
            if entry.name == self._marker:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def release(self, *, keep: bool) -> None:
        if keep and self._lock is not None:
            # Tells the sweeper of stale temporary dirs that this one is wanted.
            self._lock.truncate(0)
            self._lock.write(f"{_KEPT}\n")
            self._lock.flush()
        if not keep:
            if self.created:
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    self.clear()
                    (self.path / self._marker).unlink()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class _Probe:
    """HTTP(S) readiness checks, with the admin client cert and no proxies: an HTTPS_PROXY
    meant for the Go module proxy must not capture requests to loopback."""

    def __init__(self, pki: Pki) -> None:
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        context.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        self.last_error = ""

    def get(self, url: str) -> bytes | None:
        try:
            with self._opener.open(url, timeout=5) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as error:
            self.last_error = f"HTTP {error.code} from {url}: {error.read()[:500]!r}"
        except (OSError, ValueError) as error:
            self.last_error = f"{url}: {error}"
        return None


class ControlPlane:
    """A running control plane. Start with `ControlPlane.start()`, ideally as a context
    manager; `stop()` is idempotent and also runs at interpreter exit."""

    def __init__(self, *, state: StateDir, binaries: Binaries, pki: Pki, keep_state: bool) -> None:
        self.node: Node | None = None
        self._state = state
        self.binaries = binaries
        self.pki = pki
        self._keep_state = keep_state
        self._children: list[Child] = []
        self._argv: dict[str, list[str]] = {}  # how each component was started
        self._stopped = False
        self.etcd_url = ""
        self.server = ""

    # -- public API --------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._state.path

    @property
    def kubeconfig(self) -> Path:
        """Kubeconfig of the admin (client cert in `system:masters`, CA embedded)."""
        return self.state_dir / "kubeconfig"

    @property
    def admin_ca(self) -> Path:
        return self.pki.ca.cert

    @property
    def admin_cert(self) -> Path:
        return self.pki.admin.cert

    @property
    def admin_key(self) -> Path:
        return self.pki.admin.key

    def log_path(self, component: str) -> Path:
        return self.state_dir / "logs" / f"{component}.log"

    @classmethod
    def start(
        cls,
        state_dir: Path | str | None = None,
        *,
        keep_state: bool = False,
        binaries: Binaries | None = None,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        timeout: float = 120.0,
        progress: TextIO | None = None,
        node: NodeImages | None = None,
    ) -> ControlPlane:
        """Start etcd, kube-apiserver and kube-controller-manager; return once the API
        answers `/readyz`, the controller-manager has created the `default` ServiceAccount
        and aggregated the `view` ClusterRole.

        `state_dir`: where certs, etcd data, logs and the kubeconfig go; a new temporary
        folder if None. It is removed (or, if it existed before, emptied) on `stop()` unless
        `keep_state`. `extra_args` appends flags per component ("etcd", "kube-apiserver",
        "kube-controller-manager", "kube-scheduler"). `timeout` bounds each component's wait
        for readiness.

        With `node` (the image archives it imports), also start kube-scheduler, the
        controllers pods need, and a real node (`node.py`: containerd and a kubelet; needs
        root), and return once the Node is Ready and untainted.
        """
        unknown = set(extra_args or {}) - {*COMPONENTS, *NODE_COMPONENTS}
        if unknown:
            raise ValueError(f"extra_args for unknown components: {sorted(unknown)}")
        if binaries is None:
            binaries = obtain_binaries(progress=progress)
        requested = Path(state_dir) if state_dir is not None else None
        for attempt in range(1, _PORT_RETRIES + 1):
            state = StateDir(requested)
            plane: ControlPlane | None = None
            try:
                plane = cls(
                    state=state,
                    binaries=binaries,
                    pki=create_pki(state.path / "pki", service_ip=FIRST_SERVICE_IP),
                    keep_state=keep_state,
                )
                with _live_lock:
                    _live.add(plane)
                plane._boot(extra_args or {}, timeout=timeout, node=node)
                return plane
            except BaseException as error:
                # Includes KeyboardInterrupt and the CLI's SIGTERM: never leave children.
                if plane is not None:
                    plane.stop()
                else:
                    state.release(keep=keep_state)
                port_race = isinstance(error, ControlPlaneError) and (
                    "address already in use" in str(error)
                )
                if not port_race or attempt == _PORT_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the controller-manager, the apiserver, then etcd (SIGTERM, then SIGKILL
        after a grace period), and remove the state dir unless asked to keep it."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.node is not None:
                self.node.stop()
            for child in reversed(self._children):
                child.stop(timeout=STOP_TIMEOUT)
        finally:
            self._state.release(keep=self._keep_state)
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def check_running(self) -> None:
        """Raise `ControlPlaneError` (with the log tail) if a component has exited."""
        for child in self._children:
            if not child.running:
                raise self._failure(child, f"exited with code {child.process.returncode}")
        if self.node is not None:
            try:
                self.node.check_running()
            except NodeError as error:
                raise ControlPlaneError(str(error)) from None

    def restart_apiserver(
        self, *, down_for_s: float = 0.0, clean: bool = False, timeout: float = 120.0
    ) -> None:
        """An API server outage: stop kube-apiserver (SIGKILL, or SIGTERM when `clean`),
        keep it down for `down_for_s`, start it again as before (same port, same etcd), and
        return once it answers `/readyz`. Clients see refused connections meanwhile."""
        index, child = next(
            (i, c) for i, c in enumerate(self._children) if c.name == "kube-apiserver"
        )
        if clean:
            child.stop(timeout=STOP_TIMEOUT)
        else:
            child.process.kill()
            child.stop(timeout=STOP_TIMEOUT)
        time.sleep(down_for_s)
        restarted = Child.start(
            child.name, self._argv[child.name], log_path=self.log_path(child.name)
        )
        self._children[index] = restarted
        probe = _Probe(self.pki)
        self._await(
            restarted,
            lambda: probe.get(f"{self.server}/readyz") is not None,
            timeout=timeout,
            probe=probe,
        )

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float | None = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run this control plane's kubectl as the admin; output is captured as text.

        kubectl's discovery cache goes into the state dir: by default it would pile up one
        folder per random port under ~/.kube/cache.
        """
        argv = [
            str(self.binaries.kubectl),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.state_dir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def apply_crds(self, *paths: Path, timeout: float = 60.0) -> None:
        """`kubectl apply --server-side` the manifests at `paths`, then wait until every CRD
        is Established."""
        self.kubectl(
            "apply", "--server-side", *(arg for path in paths for arg in ("-f", str(path)))
        )
        self.wait_crds_established(timeout=timeout)

    def wait_crds_established(self, *, timeout: float = 60.0) -> None:
        """Wait until every CRD is Established. Not `kubectl wait --for=condition=established`:
        that fails at once, rather than waiting, on a CRD whose status has no conditions yet
        (kubernetes#66439), which a CRD just created can be."""
        deadline = time.monotonic() + timeout
        while True:
            listed = json.loads(self.kubectl("get", "crd", "-o", "json").stdout)
            pending = [
                crd["metadata"]["name"]
                for crd in listed["items"]
                if not any(
                    condition.get("type") == "Established" and condition.get("status") == "True"
                    for condition in (crd.get("status") or {}).get("conditions") or ()
                )
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRDs not Established after {timeout:.0f}s: {pending}")
            time.sleep(0.2)

    # -- start-up ----------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], extra: Mapping[str, Sequence[str]]) -> Child:
        full = [*argv, *extra.get(name, ())]
        child = Child.start(name, full, log_path=self.log_path(name))
        self._children.append(child)
        self._argv[name] = full
        return child

    def _failure(self, child: Child, what: str) -> ControlPlaneError:
        where = (
            f"; full log: {child.log_path}"
            if self._keep_state
            else " (the state dir is removed on failure; keep_state=True keeps it)"
        )
        return ControlPlaneError(
            f"{child.name} {what}{where}. Last {TAIL_LINES} lines of its log:\n{child.tail()}"
        )

    def _await(
        self, child: Child, ready: Callable[[], bool], *, timeout: float, probe: _Probe
    ) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if not child.running:
                raise self._failure(
                    child, f"exited with code {child.process.returncode} during start-up"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise self._failure(
                    child,
                    f"was not ready after {timeout:.0f}s (last probe: {probe.last_error})",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _boot(
        self, extra: Mapping[str, Sequence[str]], *, timeout: float, node: NodeImages | None
    ) -> None:
        (self.state_dir / "logs").mkdir()
        probe = _Probe(self.pki)
        pki = self.pki

        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=tasklease",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=tasklease={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
            ],
            extra,
        )

        def etcd_ready() -> bool:
            body = probe.get(f"{self.etcd_url}/health")
            return body is not None and json.loads(body).get("health") == "true"

        self._await(etcd, etcd_ready, timeout=timeout, probe=probe)

        secure_port = free_port()
        self.server = f"https://127.0.0.1:{secure_port}"
        node_args: list[str] = []
        if node is not None:
            # `kubectl logs` and `exec` go from the API server to the kubelet, at the
            # Node's InternalIP (its only address), with a client certificate the kubelet
            # authorises by webhook (system:masters may do anything).
            kubelet_client = issue_client_cert(
                pki, "apiserver-kubelet-client", common_name="kube-apiserver-kubelet-client",
                organization="system:masters",
            )  # fmt: skip
            node_args = [
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
            ]
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                # Without it the apiserver looks for a default route, and dies on hosts that
                # have none (sandboxes, some CI runners).
                "--advertise-address=127.0.0.1",
                # 1.37 refuses a loopback advertise address for the `kubernetes` Service's
                # endpoints; nothing here runs pods that would dial it, so keep none.
                "--endpoint-reconciler-type=none",
                f"--secure-port={secure_port}",
                f"--tls-cert-file={pki.apiserver.cert}",
                f"--tls-private-key-file={pki.apiserver.key}",
                f"--client-ca-file={pki.ca.cert}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--profiling=false",
                *node_args,
            ],
            extra,
        )
        self._await(
            apiserver,
            lambda: probe.get(f"{self.server}/readyz") is not None,
            timeout=timeout,
            probe=probe,
        )
        write_kubeconfig(
            self.kubeconfig,
            server=self.server,
            ca=pki.ca.cert,
            cert=pki.admin.cert,
            key=pki.admin.key,
            user="tasklease-admin",
        )

        kcm_kubeconfig = self.state_dir / "controller-manager.kubeconfig"
        write_kubeconfig(
            kcm_kubeconfig,
            server=self.server,
            ca=pki.ca.cert,
            cert=pki.controller_manager.cert,
            key=pki.controller_manager.key,
            user="system:kube-controller-manager",
        )
        controllers = CONTROLLERS if node is None else (*CONTROLLERS, *NODE_CONTROLLERS)
        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--controllers={','.join(controllers)}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--root-ca-file={pki.ca.cert}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
            extra,
        )

        def controllers_ready() -> bool:
            if (
                probe.get(f"{self.server}/api/v1/namespaces/default/serviceaccounts/default")
                is None
            ):
                return False
            view = probe.get(f"{self.server}/apis/rbac.authorization.k8s.io/v1/clusterroles/view")
            if view is None or not json.loads(view).get("rules"):
                probe.last_error = "ClusterRole view not aggregated yet"
                return False
            return True

        self._await(kcm, controllers_ready, timeout=timeout, probe=probe)
        if node is not None:
            self._boot_node(node, secure_port, extra, timeout=timeout, probe=probe)

    def _boot_node(
        self,
        images: NodeImages,
        apiserver_port: int,
        extra: Mapping[str, Sequence[str]],
        *,
        timeout: float,
        probe: _Probe,
    ) -> None:
        """kube-scheduler and a node (containerd and a kubelet); return once the Node is
        Ready and free of the taints that keep pods off it."""
        credentials = issue_client_cert(self.pki, "scheduler", common_name="system:kube-scheduler")
        scheduler_kubeconfig = self.state_dir / "scheduler.kubeconfig"
        write_kubeconfig(
            scheduler_kubeconfig,
            server=self.server,
            ca=self.pki.ca.cert,
            cert=credentials.cert,
            key=credentials.key,
            user="system:kube-scheduler",
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
            extra,
        )
        self.node = Node.start(
            self.state_dir / "node",
            binaries=self.binaries,
            pki=self.pki,
            apiserver_port=apiserver_port,
            service_ip=FIRST_SERVICE_IP,
            images=images,
            timeout=timeout,
        )
        node = self.node

        def node_ready() -> bool:
            node.check_running()
            body = probe.get(f"{self.server}/api/v1/nodes/{NODE_NAME}")
            if body is None:
                return False
            status = json.loads(body)
            ready = any(
                condition.get("type") == "Ready" and condition.get("status") == "True"
                for condition in status.get("status", {}).get("conditions", [])
            )
            taints = [
                taint["key"]
                for taint in status.get("spec", {}).get("taints", [])
                if taint.get("effect") in ("NoSchedule", "NoExecute")
            ]
            probe.last_error = f"node Ready={ready}, taints={taints}"
            return ready and not taints

        kubelet = next(child for child in node.children if child.name == "kubelet")
        self._await(kubelet, node_ready, timeout=timeout, probe=probe)

    def __repr__(self) -> str:
        return f"ControlPlane(server={self.server!r}, state_dir={str(self.state_dir)!r})"
