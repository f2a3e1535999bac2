"""The one place that names the control-plane versions.

Everything else (the binary cache key, the build's version ldflags, the `gomod` generator,
the check that `gobuild/go.mod` matches) derives from these strings. Bumping Kubernetes
means: change `KUBERNETES_VERSION`, run `python -m tasklease.controlplane gomod`, commit the
new `gobuild/go.mod` and `go.sum`.
"""

from __future__ import annotations

from typing import Final

KUBERNETES_VERSION: Final = "v1.37.2"
ETCD_VERSION: Final = "v3.7.0"
# Helm, for the chart's tests; `go install`ed as is (no wrapper module needed).
HELM_VERSION: Final = "v3.22.0"
# The CNCF distribution registry, for installing from a registry on the local node;
# `go install`ed as is, like helm.
REGISTRY_VERSION: Final = "v3.0.0"


def kubernetes_minor() -> int:
    """The minor version, e.g. 37 for v1.37.2."""
    return int(KUBERNETES_VERSION.lstrip("v").split(".")[1])


def staging_version() -> str:
    """The version of the `k8s.io/*` staging modules published with this release (v0.Y.Z)."""
    _major, minor, patch = KUBERNETES_VERSION.lstrip("v").split(".")
    return f"v0.{minor}.{patch}"


def cache_key() -> str:
    """Folder name of the binary cache entry for these versions."""
    return f"kube-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"


def helm_cache_key() -> str:
    """Folder name of the cache entry holding the `helm` binary."""
    return f"helm-{HELM_VERSION}"


def registry_cache_key() -> str:
    """Folder name of the cache entry holding the `registry` binary."""
    return f"registry-{REGISTRY_VERSION}"
