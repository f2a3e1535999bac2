"""`python -m tasklease.controlplane.image_cli`: build the image, or the pause image, into an
archive containerd imports, without Docker or a registry (see `image.py`).

    python -m tasklease.controlplane.image_cli build                  # prints the archive path
    python -m tasklease.controlplane.image_cli build --import-into /run/containerd/containerd.sock
    python -m tasklease.controlplane.image_cli pause                  # the sandbox image
    python -m tasklease.controlplane.image_cli base                   # only the stand-in base

Only the archive's path goes to stdout (so `$(...)` takes it); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasklease.controlplane.hostdeps import HostDependencyError
from tasklease.controlplane.image import (
    PAUSE_IMAGE,
    ImageError,
    build_base,
    build_image,
    build_pause_image,
    import_image,
)


def _say(message: str) -> None:
    print(f"tasklease: {message}", file=sys.stderr, flush=True)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasklease.controlplane.image_cli",
        description="Build the tasklease image with buildah (no Docker, no registry) into an "
        "archive that `ctr -n k8s.io images import` takes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the Dockerfile; print the archive's path")
    build.add_argument("--tag", help="the image's name (default: tasklease:<version>)")
    build.add_argument(
        "--base",
        help="a fully-qualified base image for PYTHON_IMAGE, pulled if buildah's storage lacks "
        "it (default: python:3.11-slim when stored, else a stand-in made by mmdebstrap)",
    )
    build.add_argument(
        "--context",
        type=Path,
        default=_repo_root(),
        help="the repository's root, holding the Dockerfile (default: this checkout)",
    )
    pause = sub.add_parser("pause", help=f"build the sandbox image {PAUSE_IMAGE}")
    for command in (build, pause):
        command.add_argument(
            "--rebuild", action="store_true", help="build even if a cached archive matches"
        )
        command.add_argument(
            "--import-into",
            metavar="ADDRESS",
            help="then `ctr images import` it into the containerd whose socket this is",
        )
        command.add_argument(
            "--namespace", default="k8s.io", help="containerd namespace (default: k8s.io)"
        )
    base = sub.add_parser("base", help="make the stand-in base only; print its name")
    base.add_argument("--rebuild", action="store_true", help="remake it even if up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "base":
            made = build_base(rebuild=args.rebuild)
            print(f"{made.name} {made.image_id}", flush=True)
            return 0
        if args.command == "build":
            archive = build_image(args.context, args.tag, base=args.base, rebuild=args.rebuild)
        else:
            archive = build_pause_image(rebuild=args.rebuild)
        if args.import_into:
            import_image(archive, args.import_into, namespace=args.namespace)
    except (ImageError, HostDependencyError) as error:
        _say(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    print(archive, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
