"""The local real node: it runs pods as containers, reachable from the host, and it stops
leaving nothing behind, so that two runs back to back both work. (That pods reach the API
server as in-cluster clients do is what every operator and runner pod of test_real_node.py
does.)"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING

import pytest

from tests.e2e.hoststate import host_state

if TYPE_CHECKING:
    from tasklease.controlplane import Binaries
    from tasklease.controlplane.node import NodeImages

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

# The pause image listens nowhere; its sandbox is what a pod's network and mounts are made of.
POD = """
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: default}
spec:
  terminationGracePeriodSeconds: 0
  containers:
    - name: pause
      image: %(image)s
      imagePullPolicy: Never
"""


def test_node_runs_pods_and_stops_leaving_nothing_behind(
    control_plane_binaries: Binaries, node_images: NodeImages
) -> None:
    from tasklease.controlplane import ControlPlane

    before = host_state()
    for run in (1, 2):
        with ControlPlane.start(binaries=control_plane_binaries, node=node_images) as plane:
            assert plane.node is not None and plane.node.addresses is not None
            plane.kubectl("apply", "-f", "-", input=POD % {"image": node_images.sandbox_name})
            plane.kubectl("wait", "pod/probe", "--for=condition=Ready", "--timeout=60s")
            pod = json.loads(plane.kubectl("get", "pod", "probe", "-o", "json").stdout)
            assert pod["spec"]["nodeName"] == "tasklease-node"
            ip = pod["status"]["podIP"]
            assert ip.startswith(plane.node.addresses.pod_cidr.rsplit(".", 2)[0]), ip
            # The host routes the pod range to the node: a closed port answers at once.
            with pytest.raises(ConnectionRefusedError), socket.create_connection((ip, 9), 5):
                pass
            # `kubectl logs` goes from the API server to the kubelet.
            plane.kubectl("logs", "probe")
            # The snapshot sees a running node (else its equality below would prove nothing).
            seen = before.differences(host_state()).keys()
            assert {"processes", "mounts", "links", "netns", "cgroups", "files"} <= seen, seen
        differences = before.differences(host_state())
        assert not differences, f"run {run} left behind (missing, extra): {differences}"
