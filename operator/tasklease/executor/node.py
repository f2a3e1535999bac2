"""The executor's Node and its heartbeat, as the kubelet keeps them.

The kubelet registers its Node, then proves it is alive in two ways: cheaply, by renewing
the Node's `coordination.k8s.io/v1` Lease in `kube-node-lease` every 10 s (a quarter of the
40 s lease duration), and rarely, by rewriting the Node's status (the Ready condition's
`lastHeartbeatTime`), every 5 minutes or on a change. The node-lifecycle controller reads
both; this control plane runs none, but other tooling (`kubectl get nodes`, a real
controller elsewhere) sees a healthy node. On stop, the Ready condition turns False, so a
node with nobody behind it does not look healthy.

The Node has no taints (see `NodeAgent._untaint`) and advertises the host's CPUs, memory
and the state dir's disk.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.times import rfc3339, rfc3339_micro
from tasklease.executor.env import LOCAL_IP

logger = logging.getLogger(__name__)

LOCAL_EXECUTOR_LABEL: Final = "tasklease.io/local-executor"
NODE_LEASE_NAMESPACE: Final = "kube-node-lease"
LEASE_DURATION_S: Final = 40
MAX_PODS: Final = 110
RUNTIME_VERSION: Final = "tasklease-local://0.1.0"
CONDITION_TAINTS: Final = frozenset(
    {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
)
_REQUEST_TIMEOUT: Final = (10.0, 30.0)
_ARCHITECTURES: Final = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def node_labels(name: str) -> dict[str, str]:
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": _ARCHITECTURES.get(platform.machine(), platform.machine()),
        LOCAL_EXECUTOR_LABEL: "true",
    }


def host_capacity(state_dir: Path) -> dict[str, str]:
    """CPUs, memory and disk of this host, in Kubernetes quantities."""
    memory_ki = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory_ki = int(line.split()[1])
                    break
    except OSError:
        pass
    disk_ki = shutil.disk_usage(state_dir).total // 1024
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{memory_ki}Ki",
        "ephemeral-storage": f"{disk_ki}Ki",
        "pods": str(MAX_PODS),
    }


def node_conditions(
    *, ready: bool, heartbeat: datetime, transition: datetime, message: str
) -> list[dict[str, Any]]:
    beat, since = rfc3339(heartbeat), rfc3339(transition)

    def condition(type_: str, status: str, reason: str, text: str) -> dict[str, Any]:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": text,
            "lastHeartbeatTime": beat,
            "lastTransitionTime": since,
        }

    return [
        condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
        condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
        condition("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
        condition(
            "Ready",
            "True" if ready else "False",
            "KubeletReady" if ready else "KubeletNotReady",
            message,
        ),
    ]


def node_status(
    name: str,
    *,
    capacity: Mapping[str, str],
    ready: bool,
    heartbeat: datetime,
    transition: datetime,
    message: str,
) -> dict[str, Any]:
    """The body for the Node's status subresource (a strategic-merge patch)."""
    uname = os.uname()
    return {
        "status": {
            "capacity": dict(capacity),
            "allocatable": dict(capacity),
            "conditions": node_conditions(
                ready=ready, heartbeat=heartbeat, transition=transition, message=message
            ),
            "addresses": [
                {"type": "InternalIP", "address": LOCAL_IP},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": uname.release,
                "osImage": f"{uname.sysname} (tasklease local executor)",
                "containerRuntimeVersion": RUNTIME_VERSION,
                "kubeletVersion": "v0.0.0-tasklease-local",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": node_labels(name)["kubernetes.io/arch"],
            },
        }
    }


def node_lease(name: str, *, node_uid: str | None, renew: datetime) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NODE_LEASE_NAMESPACE}
    if node_uid:
        # As the kubelet does: deleting the Node garbage-collects its Lease.
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}
        ]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": rfc3339_micro(renew),
        },
    }


class NodeAgent:
    """Registers the Node and keeps it alive from a thread of its own."""

    def __init__(
        self,
        api_client: Any,
        *,
        name: str,
        state_dir: Path,
        lease_renew_interval_s: float,
        status_interval_s: float,
    ) -> None:
        self.name = name
        self._core = client.CoreV1Api(api_client)
        self._coordination = client.CoordinationV1Api(api_client)
        self._capacity = host_capacity(state_dir)
        self._renew_s = lease_renew_interval_s
        self._status_s = status_interval_s
        self._ready_since = datetime.now(UTC)
        self._node_uid: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="tasklease-executor-node", daemon=True
        )

    @property
    def labels(self) -> dict[str, str]:
        return node_labels(self.name)

    def register(self) -> None:
        """Create the Node (or take over an existing one of that name), mark it Ready and
        renew its Lease. Raises on failure: an executor without a node is of no use."""
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
        }
        try:
            node = self._call(self._core.create_node, body)
        except ApiException as error:
            if error.status != 409:
                raise
            node = self._call(
                self._core.patch_node, self.name, {"metadata": {"labels": self.labels}}
            )
        self._node_uid = node["metadata"]["uid"]
        self._ready_since = datetime.now(UTC)
        self._post_status(ready=True, reregister=False)
        self._renew_lease()
        self._untaint(node)

    def _untaint(self, node: dict[str, Any]) -> None:
        """Remove the not-ready/unreachable taints. The API server's TaintNodesByCondition
        admission puts `node.kubernetes.io/not-ready` on every new Node, and the
        node-lifecycle controller, which would lift it once the node is Ready, does not
        run in the local control plane."""
        taints = (node.get("spec") or {}).get("taints") or []
        kept = [taint for taint in taints if taint.get("key") not in CONDITION_TAINTS]
        if len(kept) != len(taints):
            self._call(self._core.patch_node, self.name, {"spec": {"taints": kept or None}})

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop heartbeating and mark the Node not Ready (best effort)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self._ready_since = datetime.now(UTC)
            self._post_status(ready=False)
        except Exception as error:
            logger.warning("could not mark node %s not ready: %s", self.name, error)

    def _run(self) -> None:
        next_status = time.monotonic() + self._status_s
        while not self._stopping.wait(self._renew_s):
            try:
                self._renew_lease()
                if time.monotonic() >= next_status:
                    self._post_status(ready=True)
                    next_status = time.monotonic() + self._status_s
            except Exception as error:
                logger.warning("node %s heartbeat failed: %s", self.name, error)

    def _call(self, method: Any, *args: Any) -> dict[str, Any]:
        response = method(*args, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT)
        result: dict[str, Any] = json.loads(response.data)
        return result

    def _post_status(self, *, ready: bool, reregister: bool = True) -> None:
        message = (
            "the tasklease local executor runs this node's pods as processes"
            if ready
            else "the tasklease local executor stopped"
        )
        body = node_status(
            self.name,
            capacity=self._capacity,
            ready=ready,
            heartbeat=datetime.now(UTC),
            transition=self._ready_since,
            message=message,
        )
        try:
            self._call(self._core.patch_node_status, self.name, body)
        except ApiException as error:
            if error.status != 404 or not (ready and reregister) or self._stopping.is_set():
                raise
            logger.warning("node %s was deleted; registering it again", self.name)
            self.register()

    def _renew_lease(self) -> None:
        lease = node_lease(self.name, node_uid=self._node_uid, renew=datetime.now(UTC))
        try:
            self._call(
                self._coordination.patch_namespaced_lease,
                self.name,
                NODE_LEASE_NAMESPACE,
                {"spec": lease["spec"]},
            )
        except ApiException as error:
            if error.status != 404:
                raise
            self._call(self._coordination.create_namespaced_lease, NODE_LEASE_NAMESPACE, lease)
