"""A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) for
development, demos and integration tests, without Docker.

    from tasklease.controlplane import ControlPlane

    with ControlPlane.start() as cp:
        cp.kubectl("get", "namespaces")

From a shell: `python -m tasklease.controlplane up` (see `cli.py`). Binaries come from
`KUBEBUILDER_ASSETS`, a per-user cache, or a one-off build from the Go module proxy (see
`binaries.py`). Needs the `local` extra (`cryptography`).
"""

from tasklease.controlplane.binaries import (
    ASSETS_ENV,
    CACHE_ENV,
    Binaries,
    BinariesError,
    cache_dir,
    find_binaries,
    obtain_binaries,
)
from tasklease.controlplane.cluster import ControlPlane, ControlPlaneError, KubectlError
from tasklease.controlplane.versions import ETCD_VERSION, KUBERNETES_VERSION

__all__ = [
    "ASSETS_ENV",
    "CACHE_ENV",
    "ETCD_VERSION",
    "KUBERNETES_VERSION",
    "Binaries",
    "BinariesError",
    "ControlPlane",
    "ControlPlaneError",
    "KubectlError",
    "cache_dir",
    "find_binaries",
    "obtain_binaries",
]
