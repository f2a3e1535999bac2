"""`python -m tasklease.controlplane`: obtain the binaries, or run a control plane in the
foreground.

    export KUBEBUILDER_ASSETS=$(python -m tasklease.controlplane binaries)
    python -m tasklease.controlplane up          # prints `export KUBECONFIG=...`
    python -m tasklease.controlplane up --node   # and a real node: pods run as containers
    python -m tasklease.controlplane image       # build the image into the running node
    python -m tasklease.controlplane registry    # a local OCI registry the node pulls from
    python -m tasklease.controlplane image --push 127.0.0.1:PORT   # build and push there

`up` stays in the foreground and stops everything on Ctrl-C, SIGTERM or SIGHUP (a closed
terminal). It never daemonises: a background control plane is one nobody remembers to stop.
The state dir defaults to `./.tasklease/controlplane` (or `$TASKLEASE_STATE_DIR`), so the
kubeconfig path is predictable from the repository root and `image` finds the node that `up`
started; it is emptied on stop (`--keep-state` keeps logs and etcd data). `registry` runs in
the foreground too, with its own folder (`./.tasklease/registry`, or
`$TASKLEASE_REGISTRY_DIR`), which holds its address (`address`) while it runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from tasklease.controlplane.binaries import (
    BinariesError,
    find_binaries,
    obtain_binaries,
    obtain_helm,
    obtain_registry,
)
from tasklease.controlplane.cluster import ControlPlane, ControlPlaneError
from tasklease.controlplane.hostdeps import (
    IMAGE,
    MONITORING,
    NODE,
    HostDependencyError,
    ensure,
)
from tasklease.controlplane.image import (
    PAUSE_IMAGE,
    ImageError,
    build_image,
    build_pause_image,
    default_tag,
    import_image,
    push_image,
)
from tasklease.controlplane.node import LINK_FILE, NodeError, NodeImages
from tasklease.controlplane.registry import Registry, RegistryError
from tasklease.controlplane.versions import ETCD_VERSION, KUBERNETES_VERSION, REGISTRY_VERSION

STATE_DIR_ENV = "TASKLEASE_STATE_DIR"
DEFAULT_STATE_DIR = Path(os.environ.get(STATE_DIR_ENV) or ".tasklease/controlplane")
REGISTRY_DIR_ENV = "TASKLEASE_REGISTRY_DIR"
DEFAULT_REGISTRY_DIR = Path(os.environ.get(REGISTRY_DIR_ENV) or ".tasklease/registry")
# Registries a push reaches over plain HTTP (`--tls-verify=false`): this machine's own.
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class _Stop(BaseException):
    """Raised by the signal handler; a BaseException so no `except Exception` swallows it."""


def _say(message: str) -> None:
    print(f"tasklease: {message}", file=sys.stderr, flush=True)


def _install_stop_handlers() -> None:
    stopping = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            # A second Ctrl-C must not interrupt the orderly stop half-way; it is bounded
            # (SIGKILL after a grace period) and SIGKILL of this process still ends all.
            _say("already stopping")
            return
        stopping = True
        raise _Stop(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def _binaries(args: argparse.Namespace) -> int:
    _install_stop_handlers()
    try:
        found = find_binaries() if args.no_build else obtain_binaries()
    except _Stop as stop:
        _say(f"{stop.args[0]}: build stopped")
        return 130
    if found is None:
        _say(f"no binaries for Kubernetes {KUBERNETES_VERSION} / etcd {ETCD_VERSION}")
        return 1
    _say(f"binaries from {found.source}")
    print(found.directory, flush=True)
    return 0


def _helm(args: argparse.Namespace) -> int:
    _install_stop_handlers()
    try:
        path = obtain_helm(build=not args.no_build)
    except _Stop as stop:
        _say(f"{stop.args[0]}: build stopped")
        return 130
    except BinariesError as error:
        _say(str(error))
        return 1
    print(path, flush=True)
    return 0


def _up(args: argparse.Namespace) -> int:
    _install_stop_handlers()
    started = time.monotonic()
    try:
        binaries = obtain_binaries()
        images = _node_images() if args.node else None
        plane = ControlPlane.start(
            args.state_dir,
            keep_state=args.keep_state,
            binaries=binaries,
            timeout=args.timeout,
            node=images,
        )
    except _Stop:
        _say("interrupted during start-up; stopped")
        return 130
    with plane:
        what = "control plane and node" if plane.node is not None else "control plane"
        _say(
            f"Kubernetes {KUBERNETES_VERSION} {what} ready at {plane.server} in "
            f"{time.monotonic() - started:.1f}s (state: {plane.state_dir})"
        )
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        print(
            f"# running in the foreground; stop with Ctrl-C or `kill {os.getpid()}`",
            flush=True,
        )
        try:
            while True:
                time.sleep(1.0)
                plane.check_running()
        except _Stop as stop:
            _say(f"{stop.args[0]}: stopping")
        except ControlPlaneError as error:
            _say(str(error))
            return 1
    _say("stopped")
    return 0


def _node_images() -> NodeImages:
    """What a new node imports: the sandbox image (built here once, cached)."""
    ensure(NODE + IMAGE, purpose="a local node", say=_say)
    return NodeImages(sandbox=build_pause_image(), sandbox_name=PAUSE_IMAGE)


def _image(args: argparse.Namespace) -> int:
    """Build the image; push it to `--push`, or else import it into the node `up --node` runs
    on this state dir, if any."""
    _install_stop_handlers()
    try:
        repo_root = Path(__file__).resolve().parents[3]
        archive = build_image(repo_root, args.tag, base=args.base, rebuild=args.rebuild)
        socket = args.state_dir / "node" / "containerd" / "containerd.sock"
        if args.push:
            destination = f"{args.push}/{args.tag or default_tag(repo_root)}"
            loopback = args.push.rsplit(":", 1)[0] in _LOOPBACK_HOSTS
            push_image(archive, destination, tls_verify=not loopback)
        elif socket.exists():
            names = import_image(archive, socket)
            _say(f"imported into the local node's containerd as {', '.join(names)}")
        else:
            _say(f"no local node runs on {args.state_dir}; `make cluster NODE=1` starts one")
    except _Stop as stop:
        _say(f"{stop.args[0]}: build stopped")
        return 130
    print(archive, flush=True)
    return 0


def _registry(args: argparse.Namespace) -> int:
    """Run a local registry in the foreground; the node `up --node` runs, if any, pulls from
    it."""
    _install_stop_handlers()
    try:
        registry = Registry.start(args.state_dir, binary=obtain_registry())
    except _Stop:
        _say("interrupted during start-up; stopped")
        return 130
    try:
        node = args.cluster_state_dir / "node"
        if (node / LINK_FILE).exists():
            relay = registry.serve_node(node)
            _say(f"the local node pulls {registry.address}/... through {relay}")
        else:
            _say(
                f"no local node runs on {args.cluster_state_dir}: pushes work, but no node "
                f"pulls from here (start `make cluster NODE=1` first, then the registry)"
            )
        _say(
            f"distribution registry {REGISTRY_VERSION} at {registry.url} (plain HTTP, "
            f"storage in {registry.folder}, emptied on stop)"
        )
        print(f"export REGISTRY={registry.address}", flush=True)
        print(
            f"# running in the foreground; stop with Ctrl-C or `kill {os.getpid()}`",
            flush=True,
        )
        while True:
            time.sleep(1.0)
            registry.check_running()
    except _Stop as stop:
        _say(f"{stop.args[0]}: stopping")
    except RegistryError as error:
        _say(str(error))
        return 1
    finally:
        registry.stop()
    _say("stopped")
    return 0


def _node_deps(args: argparse.Namespace) -> int:
    ensure(
        NODE + IMAGE + MONITORING,
        purpose="a local node, the image build and the monitoring tests",
        say=_say,
    )
    _say("every Debian package a local node, the image and the monitoring tests need is here")
    return 0


def _gomod(args: argparse.Namespace) -> int:
    from tasklease.controlplane.gomod import regenerate

    regenerate(args.output, say=_say)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasklease.controlplane",
        description=(
            f"A local Kubernetes {KUBERNETES_VERSION} control plane (etcd {ETCD_VERSION}, "
            f"kube-apiserver, kube-controller-manager), no Docker needed."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    binaries = commands.add_parser(
        "binaries",
        help="find or build the binaries; print their folder (for KUBEBUILDER_ASSETS)",
    )
    binaries.add_argument(
        "--no-build", action="store_true", help="fail instead of building when not found"
    )
    binaries.set_defaults(run=_binaries)

    helm = commands.add_parser(
        "helm", help="find or build the pinned helm (for the chart tests); print its path"
    )
    helm.add_argument(
        "--no-build", action="store_true", help="fail instead of building when not found"
    )
    helm.set_defaults(run=_helm)

    up = commands.add_parser("up", help="run a control plane in the foreground")
    up.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"certs, etcd data, logs and the kubeconfig (default: ./{DEFAULT_STATE_DIR})",
    )
    up.add_argument(
        "--keep-state", action="store_true", help="keep the state dir (logs, data) after stop"
    )
    up.add_argument(
        "--timeout", type=float, default=120.0, help="seconds each component may take to start"
    )
    up.add_argument(
        "--node",
        action="store_true",
        help=(
            "also run a real node (kube-scheduler, containerd and a kubelet) so pods run as "
            "containers; needs root, installs missing Debian packages"
        ),
    )
    up.set_defaults(run=_up)

    image = commands.add_parser(
        "image",
        help=(
            "build the Dockerfile with buildah (no Docker, no registry) and import it into the "
            "running local node; print the image archive's path"
        ),
    )
    image.add_argument("--tag", help="the image's name (default: tasklease:<version>)")
    image.add_argument(
        "--base",
        help="a fully-qualified base image for PYTHON_IMAGE, pulled if buildah's storage lacks "
        "it (default: python:3.11-slim when stored, else a stand-in made by mmdebstrap)",
    )
    image.add_argument(
        "--rebuild", action="store_true", help="build even if a cached archive matches"
    )
    image.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the state dir of the cluster whose node imports it (default: ./{DEFAULT_STATE_DIR})",
    )
    image.add_argument(
        "--push",
        metavar="REGISTRY",
        help="push it to REGISTRY/<name>:<tag> (plain HTTP for a registry on 127.0.0.1) "
        "instead of importing it into the node",
    )
    image.set_defaults(run=_image)

    registry = commands.add_parser(
        "registry",
        help=(
            "run a local OCI registry (CNCF distribution) on 127.0.0.1 in the foreground, "
            "pulled from by the node `up --node` runs; prints `export REGISTRY=...`"
        ),
    )
    registry.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_REGISTRY_DIR,
        help=f"its configuration, storage, log and address (default: ./{DEFAULT_REGISTRY_DIR})",
    )
    registry.add_argument(
        "--cluster-state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the state dir of the cluster whose node pulls from it (default: "
        f"./{DEFAULT_STATE_DIR})",
    )
    registry.set_defaults(run=_registry)

    node_deps = commands.add_parser(
        "node-deps",
        help="install the Debian packages `up --node` and `image` need (root), or name them",
    )
    node_deps.set_defaults(run=_node_deps)

    gomod = commands.add_parser(
        "gomod", help="regenerate the wrapper go.mod/go.sum after a version bump"
    )
    gomod.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "gobuild",
        help="folder to write go.mod and go.sum into (default: the package's gobuild/)",
    )
    gomod.set_defaults(run=_gomod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except (
        BinariesError,
        ControlPlaneError,
        HostDependencyError,
        ImageError,
        NodeError,
        RegistryError,
    ) as error:
        _say(str(error))
        return 1
    return code
