"""Regenerating `gobuild/go.mod` and `go.sum` for the versions in `versions.py`.

`k8s.io/kubernetes` points its ~30 staging modules (`k8s.io/api`, `k8s.io/client-go`, ...) at
`./staging/src/...` with `replace` directives, which Go ignores in dependencies, so `go install
k8s.io/kubernetes/cmd/kube-apiserver@v1.Y.Z` refuses to build. The wrapper module requires
`k8s.io/kubernetes` and replaces each staging module by the `v0.Y.Z` version published with
that release. The list is read from that release's own go.mod, so it follows upstream when
modules are added or dropped. `go mod tidy` then pins every other dependency.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from tasklease.controlplane.binaries import (
    ETCD_COMMAND,
    KUBERNETES_COMMANDS,
    BinariesError,
    go_env,
    run_go,
)
from tasklease.controlplane.versions import ETCD_VERSION, KUBERNETES_VERSION, staging_version

MODULE: Final = "tasklease.io/controlplane-binaries"
HEADER: Final = """\
// Wrapper module that builds the Kubernetes control-plane binaries from the Go module proxy.
// k8s.io/kubernetes replaces its staging modules with local paths, which `go install …@v`
// refuses; requiring it here and pointing every staging module at its published v0.Y.Z
// twin makes it buildable. Regenerate with `python -m tasklease.controlplane gomod`.
"""
_STAGING_REPLACE: Final = re.compile(
    r"^\s*(?:replace\s+)?(k8s\.io/[\w.-]+)(?:\s+v\S+)?\s*=>\s*\./staging/", re.M
)


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """The module paths k8s.io/kubernetes replaces with its own staging folders."""
    return sorted(set(_STAGING_REPLACE.findall(kubernetes_go_mod)))


def render(kubernetes_go_mod: str) -> str:
    """The wrapper go.mod before `go mod tidy`."""
    go_line = re.search(r"^go (\S+)", kubernetes_go_mod, re.M)
    lines = [
        HEADER + f"module {MODULE}",
        "",
        f"go {go_line.group(1) if go_line else '1.26.0'}",
        "",
        "require (",
        f"\t{ETCD_COMMAND} {ETCD_VERSION}",
        f"\tk8s.io/kubernetes {KUBERNETES_VERSION}",
        ")",
        "",
    ]
    twin = staging_version()
    for module in staging_modules(kubernetes_go_mod):
        lines += [f"replace {module} => {module} {twin}", ""]
    tools = sorted([ETCD_COMMAND, *KUBERNETES_COMMANDS])
    lines += ["tool (", *(f"\t{command}" for command in tools), ")", ""]
    return "\n".join(lines)


def regenerate(output: Path, *, say: Callable[[str], None]) -> None:
    """Write a fresh go.mod and go.sum into `output` (downloads modules as needed)."""
    go = shutil.which("go")
    if go is None:
        raise BinariesError("`go` is not on PATH; regenerating go.mod needs the Go toolchain")
    with tempfile.TemporaryDirectory(prefix="tasklease-gomod-") as tmp:
        work = Path(tmp)
        download = subprocess.run(
            [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
            cwd=work,
            env=go_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if download.returncode != 0:
            raise BinariesError(
                f"go mod download k8s.io/kubernetes@{KUBERNETES_VERSION} failed:\n"
                f"{download.stdout}{download.stderr}"
            )
        upstream = Path(json.loads(download.stdout)["GoMod"]).read_text()
        (work / "go.mod").write_text(render(upstream))
        run_go(go, ["mod", "tidy"], cwd=work, label="go mod tidy", say=say)
        output.mkdir(parents=True, exist_ok=True)
        for name in ("go.mod", "go.sum"):
            shutil.copyfile(work / name, output / name)
    say(f"wrote {output / 'go.mod'} and go.sum")
