"""Finding, or building, the control-plane binaries: etcd, kube-apiserver,
kube-controller-manager and kubectl.

No Python package ships kube-apiserver and there is no Docker here to pull an image from, so
the binaries come, in this order, from:

1. the folder named by `KUBEBUILDER_ASSETS` (the envtest convention), when it holds all four.
   envtest's own asset bundles lack kube-controller-manager, so they are usually skipped;
2. a per-user cache keyed by version, `${XDG_CACHE_HOME:-~/.cache}/tasklease/<key>/`, where
   `TASKLEASE_CACHE_DIR` replaces `${XDG_CACHE_HOME:-~/.cache}/tasklease` (the versioned
   sub-folder stays, so a version bump never runs stale binaries);
3. a build from the Go module proxy through the wrapper module in `gobuild/`, once per version
   and machine. Measured on two cores with Go 1.26: 7.4 minutes with the modules already
   downloaded (add the download of ~750 MB of modules otherwise); with Go's build cache warm
   (binary cache wiped), about 15 seconds.

The build is serialised with `flock` on a lock file next to the cache entry, so two test runs
started together build once: the second waits, then finds the entry filled. It builds into a
temporary folder beside the entry and renames it into place, so an interrupted build never
leaves a half-filled entry that would later be taken for a complete one.

`helm` (for the chart's tests) comes the same way, from its own cache entry
`<cache root>/helm-<version>/helm`, or the file named by `TASKLEASE_HELM`; it is built with
`go install helm.sh/helm/v3/cmd/helm@<version>` (GOBIN pointed at a temporary folder beside
the entry), with the version ldflags Helm's own Makefile sets. About two minutes cold.

The CNCF distribution registry (`registry`, for installing from a registry on the local node,
`registry.py`) comes the same way: `<cache root>/registry-<version>/registry`, or the file
named by `TASKLEASE_REGISTRY_BINARY`; `go install
github.com/distribution/distribution/v3/cmd/registry@<version>`, with the version ldflags of
its Makefile.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final, TextIO

from tasklease.controlplane.process import file_lock, printer, run_with_progress
from tasklease.controlplane.versions import (
    ETCD_VERSION,
    HELM_VERSION,
    KUBERNETES_VERSION,
    REGISTRY_VERSION,
    cache_key,
    helm_cache_key,
    kubernetes_minor,
    registry_cache_key,
)

ASSETS_ENV: Final = "KUBEBUILDER_ASSETS"
CACHE_ENV: Final = "TASKLEASE_CACHE_DIR"
# kube-scheduler and kubelet serve the local real node (`node.py`); they are built with the
# rest, so one cache entry holds a whole cluster.
BINARY_NAMES: Final = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "kube-scheduler",
    "kubelet",
)
KUBERNETES_COMMANDS: Final = tuple(
    f"k8s.io/kubernetes/cmd/{name}" for name in BINARY_NAMES if name != "etcd"
)
ETCD_COMMAND: Final = "go.etcd.io/etcd/server/v3"
HELM_ENV: Final = "TASKLEASE_HELM"
HELM_MODULE: Final = "helm.sh/helm/v3"
HELM_COMMAND: Final = f"{HELM_MODULE}/cmd/helm"
REGISTRY_ENV: Final = "TASKLEASE_REGISTRY_BINARY"
REGISTRY_MODULE: Final = "github.com/distribution/distribution/v3"
REGISTRY_COMMAND: Final = f"{REGISTRY_MODULE}/cmd/registry"
PROGRESS_INTERVAL: Final = 5.0


class BinariesError(RuntimeError):
    """The binaries are neither available nor buildable; the message says what to do."""


@dataclass(frozen=True)
class Binaries:
    """A folder holding the four control-plane binaries, and where it came from."""

    directory: Path
    source: str  # "KUBEBUILDER_ASSETS", "cache" or "build"

    @property
    def etcd(self) -> Path:
        return self.directory / "etcd"

    @property
    def kube_apiserver(self) -> Path:
        return self.directory / "kube-apiserver"

    @property
    def kube_controller_manager(self) -> Path:
        return self.directory / "kube-controller-manager"

    @property
    def kubectl(self) -> Path:
        return self.directory / "kubectl"

    @property
    def kube_scheduler(self) -> Path:
        return self.directory / "kube-scheduler"

    @property
    def kubelet(self) -> Path:
        return self.directory / "kubelet"


def cache_root() -> Path:
    """The folder holding one cache entry per version, plus the build lock files."""
    if override := os.environ.get(CACHE_ENV):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "tasklease"


def cache_dir() -> Path:
    """The cache entry for the pinned versions."""
    return cache_root() / cache_key()


def _complete(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in BINARY_NAMES)


def _assets_minor(directory: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(directory / "kube-apiserver"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v1\.(\d+)\.", out)
    return int(match.group(1)) if match else None


def find_binaries(*, progress: TextIO | None = None) -> Binaries | None:
    """The binaries from `KUBEBUILDER_ASSETS` or the cache, without building; None if absent."""
    say = printer(progress)
    if assets := os.environ.get(ASSETS_ENV):
        directory = Path(assets).expanduser().resolve()
        if _complete(directory):
            minor = _assets_minor(directory)
            if minor is not None and minor != kubernetes_minor():
                # The user asked for this folder explicitly; honour it, but say why things
                # may differ from CI.
                say(
                    f"warning: {ASSETS_ENV}={directory} holds Kubernetes 1.{minor}; "
                    f"tasklease is tested with {KUBERNETES_VERSION}"
                )
            return Binaries(directory, ASSETS_ENV)
        missing = [name for name in BINARY_NAMES if not os.access(directory / name, os.X_OK)]
        say(f"{ASSETS_ENV}={directory} lacks {', '.join(missing)}; using the tasklease cache")
    if _complete(cache_dir()):
        return Binaries(cache_dir(), "cache")
    return None


def obtain_binaries(*, build: bool = True, progress: TextIO | None = None) -> Binaries:
    """The control-plane binaries, building them into the cache when nowhere to be found.

    Progress and notes go to `progress` (default: stderr), since a cold build is long.
    """
    if found := find_binaries(progress=progress):
        return found
    target = cache_dir()
    if not build:
        raise BinariesError(
            f"no Kubernetes {KUBERNETES_VERSION} control-plane binaries in {target}; run "
            f"`python -m tasklease.controlplane binaries` to build them, or set {ASSETS_ENV} "
            f"to a folder holding {', '.join(BINARY_NAMES)}"
        )
    built = _build_into_cache(target, progress=progress)
    return Binaries(target, "build" if built else "cache")


def _build_lock(
    target: Path, say: Callable[[str], None]
) -> contextlib.AbstractContextManager[None]:
    """The lock serialising builds into the cache entry `target`."""
    lock_path = target.parent / f"{target.name}.lock"
    return file_lock(
        lock_path,
        say=say,
        waiting=f"another process is building the binaries (lock {lock_path}); waiting for it",
    )


def _build_into_cache(target: Path, *, progress: TextIO | None) -> bool:
    """Build into `target`; False if another process did while we waited for the lock."""
    say = printer(progress)
    go = shutil.which("go")
    if go is None:
        raise BinariesError(
            f"Kubernetes {KUBERNETES_VERSION} control-plane binaries are not in "
            f"{ASSETS_ENV} nor in {target}, and building them needs the Go toolchain, but "
            f"`go` is not on PATH. Install Go (1.26 or newer), or set {ASSETS_ENV} to a "
            f"folder holding {', '.join(BINARY_NAMES)} (Kubernetes 1.{kubernetes_minor()})."
        )
    with _build_lock(target, say):
        if _complete(target):
            say(f"another process built the binaries into {target}")
            return False
        # Holding the lock, any earlier build folder is from a build that was killed.
        for stale in target.parent.glob(f".{target.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        try:
            source = work / "src"
            output = work / "bin"
            _write_wrapper_module(source)
            output.mkdir()
            started = time.monotonic()
            say(
                f"building etcd {ETCD_VERSION} and Kubernetes {KUBERNETES_VERSION} "
                f"({', '.join(name for name in BINARY_NAMES if name != 'etcd')}) into "
                f"{target}; a cold build takes 10-20 minutes, once: later runs reuse the cache"
            )
            _go_build(
                go,
                ["-ldflags", _kubernetes_ldflags(), "-o", f"{output}/", *KUBERNETES_COMMANDS],
                cwd=source,
                label=f"Kubernetes {KUBERNETES_VERSION}",
                say=say,
            )
            _go_build(
                go,
                ["-ldflags", "-s -w", "-o", str(output / "etcd"), ETCD_COMMAND],
                cwd=source,
                label=f"etcd {ETCD_VERSION}",
                say=say,
            )
            if not _complete(output):
                raise BinariesError(f"go build finished but {output} lacks some binaries")
            if target.exists():
                # An incomplete entry (a file deleted by hand); we hold the lock, so replace it.
                shutil.rmtree(target)
            output.rename(target)
            say(f"built in {_elapsed(time.monotonic() - started)}: {target}")
            return True
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _write_wrapper_module(source: Path) -> None:
    """Copy `gobuild/go.mod` and `go.sum` out of the package (which may be a read-only or
    zipped install), after checking that they pin the versions in `versions.py`."""
    source.mkdir(parents=True)
    gobuild = resources.files("tasklease.controlplane").joinpath("gobuild")
    go_mod = gobuild.joinpath("go.mod").read_text()
    for module, version in (
        ("k8s.io/kubernetes", KUBERNETES_VERSION),
        (ETCD_COMMAND, ETCD_VERSION),
    ):
        if not re.search(
            rf"^\s*(require\s+)?{re.escape(module)} {re.escape(version)}\b", go_mod, re.M
        ):
            raise BinariesError(
                f"gobuild/go.mod does not require {module} {version} (see versions.py); "
                f"regenerate it with `python -m tasklease.controlplane gomod`"
            )
    (source / "go.mod").write_text(go_mod)
    (source / "go.sum").write_bytes(gobuild.joinpath("go.sum").read_bytes())


def _kubernetes_ldflags() -> str:
    flags = ["-s", "-w"]
    minor = str(kubernetes_minor())
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={KUBERNETES_VERSION}",
            f"-X {package}.gitMajor=1",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def go_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # Static binaries: no libc coupling, and no C toolchain needed on the machine.
    return {**os.environ, "CGO_ENABLED": "0", **(extra or {})}


def run_go(
    go: str,
    args: Sequence[str],
    *,
    cwd: Path,
    label: str,
    say: Callable[[str], None],
    interval: float = PROGRESS_INTERVAL,
    env: Mapping[str, str] | None = None,
    fallback: str | None = None,
) -> None:
    """Run a go command, printing a progress line every `interval` seconds.

    `go build -v` names each package as it compiles it; counting those lines is the only
    progress Go offers. On failure the error carries the tail of go's output.
    """
    counts = {"packages": 0, "downloads": 0}

    def count(line: str) -> None:
        if line.startswith("go: downloading"):
            counts["downloads"] += 1
        elif line and not line.startswith(("go:", "#", " ", "\t")):
            counts["packages"] += 1

    def progress_line(elapsed_s: float) -> str:
        return (
            f"building {label}: {counts['packages']} packages compiled, "
            f"{counts['downloads']} modules downloaded, {_elapsed(elapsed_s)} elapsed"
        )

    finished = run_with_progress(
        [go, *args],
        label=label,
        say=say,
        on_line=count,
        progress_line=progress_line,
        interval_s=interval,
        cwd=cwd,
        env=go_env(env),
    )
    if finished.returncode != 0:
        output = "\n".join(finished.tail)
        if fallback is None:
            fallback = (
                f"set {ASSETS_ENV} to a folder holding {', '.join(BINARY_NAMES)} "
                f"(Kubernetes 1.{kubernetes_minor()})"
            )
        raise BinariesError(
            f"`{shlex.join(['go', *args])}` ({label}) failed with exit code "
            f"{finished.returncode} after {_elapsed(finished.elapsed_s)}. Last lines of its "
            f"output:\n{output}\nIf the Go module proxy is unreachable, {fallback} instead."
        )
    compiled = f", {counts['packages']} packages compiled" if counts["packages"] else ""
    say(f"{label}: done in {_elapsed(finished.elapsed_s)}{compiled}")


def _go_build(
    go: str, args: Sequence[str], *, cwd: Path, label: str, say: Callable[[str], None]
) -> None:
    run_go(go, ["build", "-v", "-trimpath", *args], cwd=cwd, label=label, say=say)


# --- helm ---------------------------------------------------------------------------------


def helm_cache_dir() -> Path:
    """The cache entry holding the pinned `helm` binary."""
    return cache_root() / helm_cache_key()


def find_helm(*, progress: TextIO | None = None) -> Path | None:
    """`helm` from `TASKLEASE_HELM` or the cache, without building; None if absent."""
    if explicit := os.environ.get(HELM_ENV):
        path = Path(explicit).expanduser().resolve()
        if os.access(path, os.X_OK) and path.is_file():
            return path
        printer(progress)(f"{HELM_ENV}={path} is not an executable file; using the tasklease cache")
    cached = helm_cache_dir() / "helm"
    return cached if os.access(cached, os.X_OK) else None


def obtain_helm(*, build: bool = True, progress: TextIO | None = None) -> Path:
    """The pinned `helm` binary, `go install`ed into the cache when nowhere to be found."""
    if found := find_helm(progress=progress):
        return found
    target = helm_cache_dir()
    if not build:
        raise BinariesError(
            f"no helm {HELM_VERSION} in {target}; build it with "
            f"`python -m tasklease.controlplane helm`, or set {HELM_ENV} to a helm "
            f"{HELM_VERSION} binary"
        )
    _install_helm_into_cache(target, progress=progress)
    return target / "helm"


def _helm_kubernetes_minor(go: str, *, cwd: Path, say: Callable[[str], None]) -> str:
    """The Kubernetes minor of the client-go this helm release is built with; Helm's own
    Makefile bakes it in as the default `.Capabilities.KubeVersion` and as the version
    `helm lint` checks deprecated APIs against (else both say 1.20)."""
    module = f"{HELM_MODULE}@{HELM_VERSION}"
    result = subprocess.run(
        [go, "mod", "download", "-json", module],
        cwd=cwd,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    go_mod_path = ""
    if result.returncode == 0:
        with contextlib.suppress(ValueError):
            go_mod_path = str(json.loads(result.stdout).get("GoMod", ""))
    if not go_mod_path:
        raise BinariesError(
            f"`go mod download {module}` failed with exit code {result.returncode}:\n"
            f"{(result.stdout + result.stderr)[-4000:]}\nIf the Go module proxy is "
            f"unreachable, set {HELM_ENV} to a helm {HELM_VERSION} binary instead."
        )
    match = re.search(r"^\s*k8s\.io/client-go v0\.(\d+)\.", Path(go_mod_path).read_text(), re.M)
    if match is None:
        say(f"{module}'s go.mod names no k8s.io/client-go; helm will assume Kubernetes 1.20")
        return "20"
    return match.group(1)


def _helm_ldflags(kubernetes_minor_of_helm: str) -> str:
    flags = ["-s", "-w", f"-X {HELM_MODULE}/internal/version.version={HELM_VERSION}"]
    for package in (f"{HELM_MODULE}/pkg/lint/rules", f"{HELM_MODULE}/pkg/chartutil"):
        flags += [
            f"-X {package}.k8sVersionMajor=1",
            f"-X {package}.k8sVersionMinor={kubernetes_minor_of_helm}",
        ]
    return " ".join(flags)


def _install_helm_into_cache(target: Path, *, progress: TextIO | None) -> bool:
    """`go install` helm into `target`; False if another process did while we waited."""
    say = printer(progress)

    def ldflags(go: str, work: Path) -> str:
        return _helm_ldflags(_helm_kubernetes_minor(go, cwd=work, say=say))

    return _go_install_into_cache(
        target,
        binary="helm",
        command=HELM_COMMAND,
        version=HELM_VERSION,
        ldflags=ldflags,
        env_name=HELM_ENV,
        say=say,
    )


def _go_install_into_cache(
    target: Path,
    *,
    binary: str,
    command: str,
    version: str,
    ldflags: Callable[[str, Path], str],
    env_name: str,
    say: Callable[[str], None],
) -> bool:
    """`go install command@version` (its executable named `binary`) into `target`, with the
    flags `ldflags(go, work folder)` gives; False if another process did while we waited."""
    go = shutil.which("go")
    if go is None:
        raise BinariesError(
            f"{binary} {version} is not in {target} and {env_name} is not set, and "
            f"building it needs the Go toolchain, but `go` is not on PATH. Install Go (1.26 "
            f"or newer), or set {env_name} to a {binary} {version} binary."
        )
    with _build_lock(target, say):
        if os.access(target / binary, os.X_OK):
            say(f"another process installed {binary} into {target}")
            return False
        for stale in target.parent.glob(f".{target.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        try:
            output = work / "bin"
            output.mkdir()
            started = time.monotonic()
            say(
                f"building {binary} {version} into {target} with `go install`; a cold build "
                f"takes a few minutes, once: later runs reuse the cache"
            )
            run_go(
                go,
                [
                    "install",
                    "-v",
                    "-trimpath",
                    "-ldflags",
                    ldflags(go, work),
                    f"{command}@{version}",
                ],
                cwd=work,
                label=f"{binary} {version}",
                say=say,
                env={"GOBIN": str(output)},
                fallback=f"set {env_name} to a {binary} {version} binary",
            )
            if not os.access(output / binary, os.X_OK):
                raise BinariesError(f"go install finished but {output} holds no {binary}")
            if target.exists():
                shutil.rmtree(target)
            output.rename(target)
            say(f"built {binary} in {_elapsed(time.monotonic() - started)}: {target / binary}")
            return True
        finally:
            shutil.rmtree(work, ignore_errors=True)


# --- the distribution registry -------------------------------------------------------------


def registry_cache_dir() -> Path:
    """The cache entry holding the pinned `registry` binary."""
    return cache_root() / registry_cache_key()


def find_registry(*, progress: TextIO | None = None) -> Path | None:
    """`registry` from `TASKLEASE_REGISTRY_BINARY` or the cache, without building; None if
    absent."""
    if explicit := os.environ.get(REGISTRY_ENV):
        path = Path(explicit).expanduser().resolve()
        if os.access(path, os.X_OK) and path.is_file():
            return path
        printer(progress)(
            f"{REGISTRY_ENV}={path} is not an executable file; using the tasklease cache"
        )
    cached = registry_cache_dir() / "registry"
    return cached if os.access(cached, os.X_OK) else None


def registry_ldflags() -> str:
    """The version flags of distribution's own Makefile (no revision: built from the proxy)."""
    package = f"{REGISTRY_MODULE}/version"
    return f"-s -w -X {package}.version={REGISTRY_VERSION} -X {package}.mainpkg={REGISTRY_MODULE}"


def obtain_registry(*, build: bool = True, progress: TextIO | None = None) -> Path:
    """The pinned distribution `registry`, `go install`ed into the cache when nowhere to be
    found."""
    if found := find_registry(progress=progress):
        return found
    target = registry_cache_dir()
    if not build:
        raise BinariesError(
            f"no registry {REGISTRY_VERSION} in {target}; build it with "
            f"`python -m tasklease.controlplane registry`, or set {REGISTRY_ENV} to a "
            f"distribution registry {REGISTRY_VERSION} binary"
        )
    _go_install_into_cache(
        target,
        binary="registry",
        command=REGISTRY_COMMAND,
        version=REGISTRY_VERSION,
        ldflags=lambda _go, _work: registry_ldflags(),
        env_name=REGISTRY_ENV,
        say=printer(progress),
    )
    return target / "registry"
