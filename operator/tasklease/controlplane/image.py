"""Building the project's image from its `Dockerfile` without a Docker engine or a registry,
into an archive containerd imports; and the pod sandbox ("pause") image containerd needs.

The local real node (`node.py`) runs pods on containerd with `imagePullPolicy: Never`, so the
image must reach containerd as a file (`ctr -n k8s.io images import FILE`). This machine has
no Docker engine to build with and no registry to pull from or push to, so:

- **buildah** (daemonless) builds the unchanged `Dockerfile`, which Docker users keep building
  with `docker build`. buildah gets storage of its own under the cache root
  (`<cache root>/image/buildah`, see `binaries.cache_root()`), never `/var/lib/containers`,
  and its own `storage.conf`, `registries.conf` (no search registries: a short name fails
  at once instead of being looked up remotely) and signature policy, so nothing of the
  user's container configuration changes what is built, and nothing here changes theirs.
  The build never pulls (`--pull=never`) unless a base image is named explicitly.
- **The base**: the Dockerfile's `python:3.11-slim` when buildah's storage already holds it
  (`python -m tasklease.controlplane image --base <registry>/library/python:3.11-slim` pulls
  it there, where a registry is reachable); else a stand-in made on this machine
  from Debian's own packages by mmdebstrap (bookworm's python3 is 3.11, in a virtualenv at
  `/usr/local` so that `python` and `pip` are where the official image has them). It is
  cached, keyed by its recipe: a change of the recipe (or of the host's extra CA
  certificates it copies) rebuilds it.
- **The archive**: `buildah push` of the image's id to a `docker-archive:` file, which
  containerd imports under the normalised name a pod's `image: tasklease:0.1.0` resolves
  to. (An `oci-archive:` would be a quarter of the size, compressed, but containerd names
  its image by the `ref.name` annotation exactly as written, and `tasklease:0.1.0` is not
  the name the kubelet asks for; pushing by name rather than id would add the image's
  `localhost/` name to the archive.) The archive is keyed by a hash of the build context
  (the files `.dockerignore` lets through, the Dockerfile, the base image's id, the build
  arguments), so an unchanged context costs a hash of a few dozen small files and no build
  at all; a changed one rebuilds with buildah's layer cache (`--layers`). After a build,
  dangling images (the replaced build's) are pruned, so the storage does not grow.
- **A registry**: `push_image` pushes an archive's image to a registry with buildah (the
  local one of `registry.py` speaks plain HTTP: `--tls-verify=false`), for a node that pulls
  it instead of importing it.
- **The pause image**: Kubernetes' own `build/pause/linux/pause.c`, from the
  `k8s.io/kubernetes` module the control plane is built from (already in the Go module
  cache), linked statically, alone in a `FROM scratch` image; named `PAUSE_IMAGE`
  (`tasklease.local/pause:<Kubernetes version>`) so that no one takes it for a registry's.

Every buildah and mmdebstrap run is serialised by one `flock` (they share buildah's
storage); each command prints its progress as `tasklease: ...` lines on stderr, and fails with an
`ImageError` that carries the tail of the failing command's output and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from docker.utils.build import exclude_paths

from tasklease.controlplane import hostdeps
from tasklease.controlplane.binaries import cache_root
from tasklease.controlplane.process import TAIL_LINES, file_lock, printer, run_with_progress
from tasklease.controlplane.versions import KUBERNETES_VERSION

IMAGE_CACHE_NAME: Final = "image"
BASE_ARG: Final = "PYTHON_IMAGE"
STANDIN_BASE: Final = "localhost/tasklease-base:bookworm-python3"
STANDIN_SUITE: Final = "bookworm"
STANDIN_PACKAGES: Final = ("ca-certificates", "python3", "python3-venv")
# Bump when the stand-in's recipe changes in a way its key would not see (the key already
# covers the mmdebstrap arguments, hooks, image configuration and the copied certificates).
STANDIN_RECIPE_REVISION: Final = 1
RECIPE_LABEL: Final = "io.tasklease.base.recipe"
HOST_CA_DIR: Final = Path("/usr/local/share/ca-certificates")
SYSTEM_CA_BUNDLE: Final = "/etc/ssl/certs/ca-certificates.crt"
PAUSE_REPOSITORY: Final = "tasklease.local/pause"
# Tagged with the Kubernetes release whose pause.c it is built from, so the name is known
# without looking at the source (containerd's `sandbox_image`); `/pause -v` prints pause's
# own version (that release's build/pause/Makefile TAG).
PAUSE_IMAGE: Final = f"{PAUSE_REPOSITORY}:{KUBERNETES_VERSION}"
PAUSE_USER: Final = "65535:65535"
PAUSE_RECIPE_REVISION: Final = 1
# Bump when what the archive holds changes in a way the context hash would not see.
ARCHIVE_REVISION: Final = 1
STORAGE_DRIVER: Final = "overlay"

MMDEBSTRAP_TIMEOUT_S: Final = 1200.0
BUILD_TIMEOUT_S: Final = 1800.0
PUSH_TIMEOUT_S: Final = 600.0
IMPORT_TIMEOUT_S: Final = 600.0
QUICK_TIMEOUT_S: Final = 120.0
HEARTBEAT_S: Final = 15.0


class ImageError(RuntimeError):
    """An image could not be built, exported or imported; the message says what to do."""


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{int(value) // 60}m{int(value) % 60:02d}s"


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.0f} MB"


def _key(recipe: object) -> str:
    """A short, stable hash of a JSON-able recipe."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _read_iid(iidfile: Path) -> str:
    """The image id buildah wrote to `--iidfile`, without its `sha256:`."""
    return iidfile.read_text().strip().removeprefix("sha256:")


def _keep_only(archive: Path, pattern: str) -> None:
    """Delete the other archives beside `archive` that match `pattern` (replaced builds)."""
    for stale in archive.parent.glob(pattern):
        if stale != archive:
            stale.unlink(missing_ok=True)


def image_cache_dir() -> Path:
    """Where the buildah storage, the stand-in base's root file system and the archives go."""
    return cache_root() / IMAGE_CACHE_NAME


# --- the build context ----------------------------------------------------------------------


def ignore_patterns(context: Path) -> list[str]:
    """The patterns of the context's `.containerignore` (which buildah prefers) or
    `.dockerignore`, as docker-py reads them; none if neither exists."""
    for name in (".containerignore", ".dockerignore"):
        path = context / name
        if path.is_file():
            lines = (line.strip() for line in path.read_text().splitlines())
            return [line for line in lines if line and not line.startswith("#")]
    return []


def context_files(context: Path) -> list[str]:
    """The files the build context holds after the ignore file (slash-separated, relative to
    `context`, sorted), as Docker sends them: docker-py's implementation of Docker's rules
    (the last matching pattern wins, `!` re-includes, `**` spans folders; the Dockerfile and
    the ignore file are always sent)."""
    kept = exclude_paths(str(context), ignore_patterns(context))
    return sorted(
        path for path in kept if (context / path).is_file() or (context / path).is_symlink()
    )


def _file_digest(path: Path) -> str:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return f"link:{os.readlink(path)}"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    executable = "x" if info.st_mode & 0o111 else "-"
    return f"{executable}:{digest.hexdigest()}"


def context_hash(context: Path, *, dockerfile: Path, inputs: Mapping[str, str]) -> str:
    """A hash of what a build of `dockerfile` in `context` depends on: each context file's
    path, content and executable bit, the Dockerfile and the ignore file themselves, and
    `inputs` (the base image's id, the build arguments, the tag). Stable across runs and
    machines: files in sorted order, no timestamps."""
    digest = hashlib.sha256()

    def add(key: str, value: str) -> None:
        digest.update(f"{key}\0{value}\n".encode())

    for relative in context_files(context):
        add(f"file:{relative}", _file_digest(context / relative))
    add("dockerfile", _file_digest(dockerfile))
    for name in (".containerignore", ".dockerignore"):
        if (context / name).is_file():
            add(f"ignore:{name}", _file_digest(context / name))
    for key in sorted(inputs):
        add(f"input:{key}", inputs[key])
    return digest.hexdigest()


# --- running things ---------------------------------------------------------------------------


def _tail(lines: Iterable[str]) -> str:
    return "\n".join(lines).strip() or "(no output)"


def _run_streaming(
    argv: Sequence[str],
    *,
    label: str,
    say: Callable[[str], None],
    echo: Callable[[str], str | None],
    timeout_s: float,
    hint: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run a long command, saying the lines `echo` picks and, when it has said nothing for a
    while, that it is still at work. On failure (or timeout) the error carries the tail."""
    try:
        finished = run_with_progress(
            argv,
            label=label,
            say=say,
            on_line=echo,
            progress_line=lambda elapsed_s: (
                f"{label}: still at work, {_seconds(elapsed_s)} elapsed"
            ),
            interval_s=HEARTBEAT_S,
            timeout_s=timeout_s,
            cwd=cwd,
            env=env,
        )
    except OSError as error:
        raise ImageError(f"cannot run `{shlex.join(argv)}` ({label}): {error}. {hint}") from None
    if finished.returncode is None:
        raise ImageError(
            f"`{shlex.join(argv)}` ({label}) did not finish within {_seconds(timeout_s)}. "
            f"Last lines of its output:\n{_tail(finished.tail)}\n{hint}"
        )
    if finished.returncode != 0:
        raise ImageError(
            f"`{shlex.join(argv)}` ({label}) failed with exit code {finished.returncode} after "
            f"{_seconds(finished.elapsed_s)}. Last lines of its output:\n"
            f"{_tail(finished.tail)}\n{hint}"
        )


def _run(
    argv: Sequence[str],
    *,
    label: str,
    hint: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = QUICK_TIMEOUT_S,
) -> str:
    """Run a short command and return its stdout; on failure the error carries its output."""
    try:
        result = subprocess.run(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ImageError(f"`{shlex.join(argv)}` ({label}): {error}. {hint}") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).splitlines()[-TAIL_LINES:]
        raise ImageError(
            f"`{shlex.join(argv)}` ({label}) failed with exit code {result.returncode}:\n"
            f"{_tail(output)}\n{hint}"
        )
    return result.stdout


def _ensure(names: Iterable[str], *, purpose: str, say: Callable[[str], None]) -> None:
    wanted = set(names)
    hostdeps.ensure(
        [requirement for requirement in hostdeps.IMAGE if requirement.name in wanted],
        purpose=purpose,
        say=say,
    )


# --- buildah with storage of its own ------------------------------------------------------------


_POLICY: Final = {"default": [{"type": "insecureAcceptAnything"}]}


@dataclass(frozen=True)
class Buildah:
    """buildah on storage under `home`, isolated from the user's container configuration.

    The signature policy accepts anything: every image here is either made on this machine
    (the stand-in base, the builds) or named explicitly by the user as a base.
    """

    home: Path

    @classmethod
    def default(cls) -> Buildah:
        return cls(image_cache_dir() / "buildah")

    @property
    def root(self) -> Path:
        return self.home / "root"

    @property
    def runroot(self) -> Path:
        return self.home / "runroot"

    @property
    def policy(self) -> Path:
        return self.home / "policy.json"

    @property
    def lock(self) -> Path:
        return self.home.parent / "buildah.lock"

    @contextlib.contextmanager
    def locked(self, say: Callable[[str], None]) -> Iterator[None]:
        """Hold the lock every buildah and mmdebstrap run here takes, with the configuration
        written (`prepare`)."""
        with file_lock(
            self.lock, say=say, waiting=f"another image build holds {self.lock}; waiting for it"
        ):
            self.prepare()
            yield

    def prepare(self) -> None:
        """Write the configuration files; after a reboot, empty the run root (it would list
        mounts and locks of the previous boot; a tmpfs run root would have been emptied)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.policy.write_text(json.dumps(_POLICY, indent=2) + "\n")
        (self.home / "registries.conf").write_text(
            "# tasklease's own: fully-qualified names only, so nothing is looked up remotely\n"
            "# by a short name.\n"
            "unqualified-search-registries = []\n"
            'short-name-mode = "enforcing"\n'
        )
        (self.home / "storage.conf").write_text(
            "[storage]\n"
            f'driver = "{STORAGE_DRIVER}"\n'
            f"graphroot = {json.dumps(str(self.root))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
        )
        boot_file = self.home / "runroot.boot-id"
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot_id = "unknown"
        previous = boot_file.read_text().strip() if boot_file.exists() else None
        if previous != boot_id:
            shutil.rmtree(self.runroot, ignore_errors=True)
            boot_file.write_text(boot_id + "\n")

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(self.home / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.home / "registries.conf"),
        }

    def argv(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            STORAGE_DRIVER,
            *args,
        ]

    @property
    def hint(self) -> str:
        return (
            f"buildah's storage for tasklease is {self.root}; if it is damaged, delete "
            f"{self.home} (everything in it is rebuilt on the next run)."
        )

    def run(self, *args: str, label: str, timeout_s: float = QUICK_TIMEOUT_S) -> str:
        return _run(
            self.argv(*args), label=label, hint=self.hint, env=self.env(), timeout_s=timeout_s
        )

    def stream(
        self,
        *args: str,
        label: str,
        say: Callable[[str], None],
        echo: Callable[[str], str | None],
        timeout_s: float,
        cwd: Path | None = None,
    ) -> None:
        _run_streaming(
            self.argv(*args),
            label=label,
            say=say,
            echo=echo,
            timeout_s=timeout_s,
            hint=self.hint,
            env=self.env(),
            cwd=cwd,
        )

    @contextlib.contextmanager
    def scratch_container(self) -> Iterator[str]:
        """A new working container `FROM scratch` (after removing those an interrupted run
        left), removed on leaving."""
        self.remove_working_containers()
        container = self.run(
            "from", "--signature-policy", str(self.policy), "scratch", label="buildah from"
        ).strip()
        try:
            yield container
        finally:
            subprocess.run(
                self.argv("rm", container), env=self.env(), capture_output=True, check=False
            )

    def commit(self, container: str, name: str, *, timeout_s: float = QUICK_TIMEOUT_S) -> str:
        """Commit `container` as the image `name`; its id."""
        with tempfile.TemporaryDirectory(dir=self.home) as work:
            iidfile = Path(work) / "iid"
            self.run(
                "commit",
                "--quiet",
                "--signature-policy",
                str(self.policy),
                "--iidfile",
                str(iidfile),
                container,
                name,
                label="buildah commit",
                timeout_s=timeout_s,
            )
            return _read_iid(iidfile)

    def inspect(self, name: str) -> dict[str, object] | None:
        """`buildah inspect` of a stored image, or None when the storage lacks it."""
        result = subprocess.run(
            self.argv("inspect", "--type", "image", name),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=QUICK_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            return None
        data: dict[str, object] = json.loads(result.stdout)
        return data

    def image_names(self) -> list[str]:
        listed = json.loads(self.run("images", "--json", label="buildah images") or "[]")
        return [name for image in listed or [] for name in image.get("names") or []]

    def remove_working_containers(self) -> None:
        """Working containers left by an interrupted run; the lock is held, so none is live."""
        self.run("rm", "--all", label="buildah rm --all")

    def prune(self) -> None:
        """Remove dangling images (a replaced build's final image and the builder stage's
        layers) until none is left; the current image and its ancestors, the layer cache of
        the next build, stay."""
        for _ in range(20):
            if not self.run("rmi", "--prune", label="buildah rmi --prune").strip():
                return

    def push(self, image_id: str, archive: Path, name: str, *, label: str) -> None:
        """Write `image_id` to a docker-archive file naming it `name`, atomically."""
        if ":" in str(archive):
            raise ImageError(
                f"cannot write an image archive to {archive}: a path with a colon cannot be "
                f"named in buildah's `docker-archive:PATH:NAME`. Set TASKLEASE_CACHE_DIR to "
                f"a folder without one."
            )
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(f".{archive.name}.partial-{os.getpid()}")
        partial.unlink(missing_ok=True)
        try:
            # By id, not by name: pushing a name also records the image's other names
            # (`localhost/...`) in the archive, and containerd would import those too.
            self.run(
                "push",
                "--quiet",
                "--signature-policy",
                str(self.policy),
                image_id,
                f"docker-archive:{partial}:{name}",
                label=label,
                timeout_s=PUSH_TIMEOUT_S,
            )
            partial.rename(archive)
        finally:
            partial.unlink(missing_ok=True)


# --- the base ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseImage:
    """The image the Dockerfile's `PYTHON_IMAGE` build argument names."""

    name: str
    image_id: str
    standin: bool


def _standin_config() -> list[str]:
    """`buildah config` arguments matching what the build relies on in python:3.11-slim."""
    return [
        "--env",
        "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--env",
        "LANG=C.UTF-8",
        # This base is built on this machine, whose network egress may go through a
        # TLS-intercepting proxy: it trusts the host's extra CA certificates (copied in by
        # the recipe) and pip uses the system bundle that holds them, so the Dockerfile's
        # `pip wheel` and `pip install` can download from the package index during the
        # build. The official base does neither; nothing in the final image relies on it.
        "--env",
        f"PIP_CERT={SYSTEM_CA_BUNDLE}",
        "--cmd",
        '["python3"]',
    ]


def host_extra_cas() -> list[Path]:
    """The host's locally added CA certificates (`update-ca-certificates` input)."""
    if not HOST_CA_DIR.is_dir():
        return []
    return sorted(path for path in HOST_CA_DIR.rglob("*.crt") if path.is_file())


def _standin_argv(ca_folder: Path | None) -> list[str]:
    """mmdebstrap's arguments, without the output file."""
    dpkg_options = [
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/locale/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
    ]
    hooks = []
    if ca_folder is not None:
        hooks.append(
            f'cp -- {shlex.quote(str(ca_folder))}/*.crt "$1/usr/local/share/ca-certificates/"'
        )
    hooks += [
        'chroot "$1" update-ca-certificates',
        # The official image's interpreter lives in /usr/local; a virtualenv there puts
        # `python` and `pip` on the same paths and lets pip install without touching
        # Debian's own packages.
        'chroot "$1" python3 -m venv /usr/local',
        'rm -f "$1"/usr/local/bin/activate* "$1"/usr/local/bin/Activate.ps1',
        'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old',
    ]
    return [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(STANDIN_PACKAGES)}",
        *(f"--dpkgopt={option}" for option in dpkg_options),
        *(f"--customize-hook={hook}" for hook in hooks),
        # The container runtime provides /dev; device nodes in the tarball would only get
        # in the way of unpacking it.
        "--skip=output/dev",
        STANDIN_SUITE,
    ]


def standin_recipe_key(cas: Sequence[Path] | None = None) -> str:
    """A key that changes whenever what the stand-in base is made from changes."""
    cas = host_extra_cas() if cas is None else cas
    return _key(
        {
            "revision": STANDIN_RECIPE_REVISION,
            "mmdebstrap": _standin_argv(Path("/CA") if cas else None),
            "config": _standin_config(),
            "cas": [hashlib.sha256(path.read_bytes()).hexdigest() for path in cas],
        }
    )


def _labels(data: Mapping[str, object]) -> dict[str, str]:
    oci = data.get("OCIv1")
    config = oci.get("config") if isinstance(oci, dict) else None
    labels = config.get("Labels") if isinstance(config, dict) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _image_id(data: Mapping[str, object], name: str) -> str:
    image_id = data.get("FromImageID")
    if not isinstance(image_id, str) or not image_id:
        raise ImageError(f"`buildah inspect {name}` names no image id")
    return image_id


def _standin_base(buildah: Buildah, *, say: Callable[[str], None]) -> BaseImage:
    """The stand-in base (Debian's python3 made by mmdebstrap), in buildah's storage as
    `STANDIN_BASE`; made, or re-imported from the cached root file system, when its recipe
    changed or the storage lacks it. Call with buildah's lock held."""
    cas = host_extra_cas()
    key = standin_recipe_key(cas)
    stored = buildah.inspect(STANDIN_BASE)
    if stored is not None and _labels(stored).get(RECIPE_LABEL) == key:
        return BaseImage(STANDIN_BASE, _image_id(stored, STANDIN_BASE), standin=True)
    cache = buildah.home.parent
    rootfs = cache / f"base-{STANDIN_SUITE}-python3-{key}.tar"
    if not rootfs.is_file():
        for stale in cache.glob(f"base-{STANDIN_SUITE}-python3-*.tar"):
            stale.unlink()
        _make_rootfs(rootfs, cas, say=say)
    started = time.monotonic()
    say(f"importing the stand-in base into buildah's storage as {STANDIN_BASE}")
    with buildah.scratch_container() as container:
        buildah.run("add", container, str(rootfs), "/", label="buildah add", timeout_s=600)
        buildah.run(
            "config",
            *_standin_config(),
            "--label",
            f"{RECIPE_LABEL}={key}",
            container,
            label="buildah config",
        )
        image_id = buildah.commit(container, STANDIN_BASE, timeout_s=600)
    say(f"stand-in base {STANDIN_BASE} ({image_id[:12]}) in {_seconds(time.monotonic() - started)}")
    return BaseImage(STANDIN_BASE, image_id, standin=True)


def _make_rootfs(target: Path, cas: Sequence[Path], *, say: Callable[[str], None]) -> None:
    started = time.monotonic()
    say(
        f"making the stand-in base (Debian {STANDIN_SUITE}: {', '.join(STANDIN_PACKAGES)}) "
        f"with mmdebstrap into {target}; about a minute, once: later builds reuse it"
    )
    with tempfile.TemporaryDirectory(prefix=".base-", dir=target.parent) as work:
        ca_folder = None
        if cas:
            ca_folder = Path(work) / "ca"
            ca_folder.mkdir()
            for index, path in enumerate(cas):
                shutil.copyfile(path, ca_folder / f"host-{index}-{path.name}")
        partial = Path(work) / "rootfs.tar"
        _run_streaming(
            [*_standin_argv(ca_folder), str(partial)],
            label="mmdebstrap",
            say=say,
            echo=lambda line: f"mmdebstrap: {line[3:]}" if line.startswith("I: ") else None,
            timeout_s=MMDEBSTRAP_TIMEOUT_S,
            hint=(
                "mmdebstrap downloads Debian's packages from its default mirror. If that is "
                "unreachable but a registry is, build on the official base instead: "
                "`python -m tasklease.controlplane image --base "
                "<registry>/library/python:3.11-slim` pulls it into tasklease's buildah "
                "storage, where later builds find it by themselves."
            ),
        )
        partial.rename(target)
    say(f"stand-in base made in {_seconds(time.monotonic() - started)} ({_size(target)})")


def dockerfile_base_default(dockerfile: Path) -> str:
    """The default of the Dockerfile's `ARG PYTHON_IMAGE=...`."""
    match = re.search(rf"^\s*ARG\s+{BASE_ARG}=(\S+)", dockerfile.read_text(), re.M)
    if match is None:
        raise ImageError(f"{dockerfile} has no `ARG {BASE_ARG}=...` line to build from")
    return match.group(1)


def resolve_base(
    dockerfile: Path,
    *,
    base: str | None,
    buildah: Buildah,
    say: Callable[[str], None],
) -> BaseImage:
    """The base to build on: `base` when given (pulled if the storage lacks it), else the
    Dockerfile's default when buildah's storage already holds it, else the stand-in.
    Call with buildah's lock held."""
    if base is not None:
        stored = buildah.inspect(base)
        if stored is None:
            say(f"pulling the base {base}")
            buildah.run(
                "pull",
                "--signature-policy",
                str(buildah.policy),
                base,
                label=f"buildah pull {base}",
                timeout_s=PUSH_TIMEOUT_S,
            )
            stored = buildah.inspect(base)
            if stored is None:
                raise ImageError(f"pulled {base}, yet buildah's storage does not hold it")
        return BaseImage(base, _image_id(stored, base), standin=False)
    official = dockerfile_base_default(dockerfile)
    for name in buildah.image_names():
        if name == official or name.endswith(f"/{official}"):
            stored = buildah.inspect(name)
            if stored is not None:
                say(f"base: {name} (in buildah's storage)")
                return BaseImage(name, _image_id(stored, name), standin=False)
    say(f"base: the stand-in {STANDIN_BASE} ({official} is not in buildah's storage)")
    return _standin_base(buildah, say=say)


# --- the image ----------------------------------------------------------------------------------


def project_version(repo_root: Path) -> str:
    with (repo_root / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    return str(version)


def default_tag(repo_root: Path) -> str:
    """`tasklease:<the project's version>`, what the chart's `image.tag` defaults to."""
    return f"tasklease:{project_version(repo_root)}"


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(repo_root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def build_args(repo_root: Path) -> dict[str, str]:
    """VERSION from pyproject.toml; REVISION the git commit (`-dirty` with uncommitted
    changes to tracked files); CREATED the commit's time, so that building the same source
    twice gives the same labels (and a warm layer cache)."""
    revision = _git(repo_root, "rev-parse", "HEAD") or "unknown"
    if revision != "unknown" and _git(repo_root, "status", "--porcelain", "--untracked-files=no"):
        revision += "-dirty"
    return {
        "VERSION": project_version(repo_root),
        "REVISION": revision,
        "CREATED": _git(repo_root, "log", "-1", "--format=%cI") or "unknown",
    }


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def archive_names(archive: Path) -> list[str]:
    """The image names a docker-archive file carries (its `RepoTags`), as containerd will
    name the images it imports."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                raise KeyError("manifest.json")
            manifest = json.load(member)
    except (OSError, KeyError, tarfile.TarError, json.JSONDecodeError) as error:
        raise ImageError(
            f"{archive} is not a readable docker-archive ({error}); delete it and build again"
        ) from None
    return [str(tag) for entry in manifest for tag in entry.get("RepoTags") or []]


def archive_image_id(archive: Path) -> str:
    """The id (config digest, without `sha256:`) of the image a docker-archive file holds."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                raise KeyError("manifest.json")
            (entry,) = json.load(member)
            return str(entry["Config"]).removesuffix(".json")
    except (OSError, KeyError, ValueError, tarfile.TarError) as error:
        raise ImageError(
            f"{archive} is not a readable docker-archive of one image ({error}); delete it "
            f"and build again"
        ) from None


def push_image(
    archive: Path, destination: str, *, tls_verify: bool = True, progress: TextIO | None = None
) -> str:
    """Push the image a docker-archive holds (`build_image`'s) to `destination`
    (`HOST[:PORT]/NAME:TAG`) with buildah; the digest of the manifest the registry stored.
    `tls_verify=False` also lets buildah speak plain HTTP (a registry on loopback)."""
    say = printer(progress)
    _ensure(("buildah",), purpose="pushing the tasklease image", say=say)
    buildah = Buildah.default()
    image_id = archive_image_id(archive)
    started = time.monotonic()
    with buildah.locked(say), tempfile.TemporaryDirectory(dir=buildah.home) as work:
        # buildah's storage holds the build in the OCI format it was built in, whose id is
        # not the archive's (Docker-format) config digest: push the archive's own image, loaded
        # for the push and removed after it (its layers would otherwise be stored twice).
        loaded = buildah.inspect(image_id) is None
        if loaded:
            buildah.run(
                "pull",
                "--quiet",
                "--signature-policy",
                str(buildah.policy),
                f"docker-archive:{archive}",
                label="buildah pull docker-archive",
                timeout_s=PUSH_TIMEOUT_S,
            )
        digest_file = Path(work) / "digest"
        try:
            buildah.run(
                "push",
                "--quiet",
                "--signature-policy",
                str(buildah.policy),
                f"--tls-verify={str(tls_verify).lower()}",
                "--digestfile",
                str(digest_file),
                image_id,
                f"docker://{destination}",
                label=f"buildah push {destination}",
                timeout_s=PUSH_TIMEOUT_S,
            )
        finally:
            if loaded:
                buildah.run("rmi", "--force", image_id, label="buildah rmi")
        digest = digest_file.read_text().strip()
    say(f"pushed {destination} ({digest}) in {_seconds(time.monotonic() - started)}")
    return digest


def _bud_echo(line: str) -> str | None:
    if re.match(r"^(\[\d+/\d+\] )?STEP \d+/\d+: ", line):
        return f"  {line[:140]}"
    if line.startswith("--> Using cache"):
        return "  (cached)"
    return None


def build_image(
    repo_root: Path,
    tag: str | None = None,
    *,
    base: str | None = None,
    rebuild: bool = False,
    progress: TextIO | None = None,
) -> Path:
    """Build `repo_root`'s Dockerfile with buildah and return a docker-archive of the image,
    named `tag` (default `tasklease:<version>`; containerd imports it under the normalised
    name a pod's `image: tasklease:<version>` resolves to).

    The archive is reused while the build context hash is unchanged (`rebuild` forces a
    build); `base` names a base image instead of the official-or-stand-in choice."""
    say = printer(progress)
    repo_root = repo_root.resolve()
    dockerfile = repo_root / "Dockerfile"
    if not dockerfile.is_file():
        raise ImageError(f"no Dockerfile in {repo_root}; pass the repository's root folder")
    tag = tag or default_tag(repo_root)
    buildah = Buildah.default()
    _ensure(("buildah", "mmdebstrap"), purpose="building the tasklease image", say=say)
    started = time.monotonic()
    with buildah.locked(say):
        resolved = resolve_base(dockerfile, base=base, buildah=buildah, say=say)
        arguments = {**build_args(repo_root), BASE_ARG: resolved.name}
        key = context_hash(
            repo_root,
            dockerfile=dockerfile,
            inputs={
                **arguments,
                "base-id": resolved.image_id,
                "tag": tag,
                "archive-revision": str(ARCHIVE_REVISION),
            },
        )
        archives = image_cache_dir() / "archives"
        archive = archives / f"{_file_safe(tag)}-{key[:16]}.tar"
        if archive.is_file() and not rebuild:
            say(
                f"image {tag}: build context unchanged, reusing {archive} "
                f"({_seconds(time.monotonic() - started)})"
            )
            return archive
        say(
            f"building the image {tag} from {dockerfile} with buildah on {resolved.name}; "
            f"a cold build takes a minute or two, a warm one reuses buildah's layer cache"
        )
        buildah.remove_working_containers()
        building = time.monotonic()
        with tempfile.TemporaryDirectory(dir=buildah.home) as work:
            iidfile = Path(work) / "iid"
            argv = [
                "bud",
                "--signature-policy",
                str(buildah.policy),
                # Never look anything up remotely, unless the user named a base to pull.
                "--pull=false" if base is not None else "--pull=never",
                "--layers",
                "--network=host",
                "--iidfile",
                str(iidfile),
                "--file",
                str(dockerfile),
                "--tag",
                tag,
            ]
            for name, value in arguments.items():
                argv += ["--build-arg", f"{name}={value}"]
            buildah.stream(
                *argv,
                str(repo_root),
                label="buildah bud",
                say=say,
                echo=_bud_echo,
                timeout_s=BUILD_TIMEOUT_S,
            )
            image_id = _read_iid(iidfile)
        built = time.monotonic()
        say(f"built {tag} ({image_id[:12]}) in {_seconds(built - building)}; writing the archive")
        buildah.push(image_id, archive, tag, label="buildah push")
        _keep_only(archive, f"{_file_safe(tag)}-*.tar")
        buildah.prune()
    say(
        f"image {tag}: {archive} ({_size(archive)}, written in "
        f"{_seconds(time.monotonic() - built)}; {_seconds(time.monotonic() - started)} in all)"
    )
    return archive


# --- the pause image ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PauseSource:
    """Kubernetes' pause.c and the image tag its build folder's Makefile gives it."""

    source: Path
    tag: str


def find_pause_source(*, say: Callable[[str], None]) -> PauseSource:
    """`build/pause/linux/pause.c` of the `k8s.io/kubernetes` module at KUBERNETES_VERSION,
    from the Go module cache (downloaded when absent)."""
    go = shutil.which("go")
    if go is None:
        raise ImageError(
            "the pause image is built from Kubernetes' pause.c, found through the Go module "
            "cache, but `go` is not on PATH. Install Go (1.26 or newer)."
        )
    with tempfile.TemporaryDirectory() as outside_any_module:
        output = _run(
            [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
            label="go mod download",
            hint="If the Go module proxy is unreachable, fill the module cache elsewhere.",
            cwd=Path(outside_any_module),
            env={**os.environ, "GO111MODULE": "on"},
            timeout_s=900,
        )
    info = json.loads(output)
    if "Dir" not in info:
        raise ImageError(f"`go mod download` did not give k8s.io/kubernetes's folder: {info}")
    folder = Path(info["Dir"]) / "build" / "pause"
    source = folder / "linux" / "pause.c"
    if not source.is_file():
        raise ImageError(f"k8s.io/kubernetes@{KUBERNETES_VERSION} has no {source}")
    match = re.search(r"^TAG\s*\?=\s*(\S+)", (folder / "Makefile").read_text(), re.M)
    if match is None:
        raise ImageError(f"{folder / 'Makefile'} names no `TAG ?= ...`")
    say(f"pause.c {match.group(1)} from k8s.io/kubernetes@{KUBERNETES_VERSION}")
    return PauseSource(source, match.group(1))


def pause_cflags(tag: str) -> list[str]:
    """The flags Kubernetes' build/pause/Makefile compiles with (`-DVERSION` ours)."""
    return ["-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{tag}-tasklease"]


def build_pause_image(*, progress: TextIO | None = None) -> Path:
    """A docker-archive of the pod sandbox image, named `PAUSE_IMAGE`: Kubernetes' pause.c
    linked statically, alone in a `FROM scratch` image, run as 65535 like the official one."""
    say = printer(progress)
    _ensure(("buildah", "gcc"), purpose="building the pause image", say=say)
    found = find_pause_source(say=say)
    config = ["--entrypoint", '["/pause"]', "--user", PAUSE_USER]
    key = _key(
        {
            "revision": PAUSE_RECIPE_REVISION,
            "source": hashlib.sha256(found.source.read_bytes()).hexdigest(),
            "cflags": pause_cflags(found.tag),
            "config": config,
            "name": PAUSE_IMAGE,
        }
    )
    archive = image_cache_dir() / "archives" / f"{_file_safe(PAUSE_IMAGE)}-{key}.tar"
    if archive.is_file():
        say(f"pause image {PAUSE_IMAGE}: reusing {archive}")
        return archive
    buildah = Buildah.default()
    started = time.monotonic()
    with buildah.locked(say):
        if archive.is_file():  # another process built it while we waited
            return archive
        _build_pause_locked(buildah, found, archive, config)
    say(f"pause image {PAUSE_IMAGE}: {archive} in {_seconds(time.monotonic() - started)}")
    return archive


def _build_pause_locked(
    buildah: Buildah,
    found: PauseSource,
    archive: Path,
    config: Sequence[str],
) -> None:
    with tempfile.TemporaryDirectory(dir=buildah.home) as work:
        binary = Path(work) / "pause"
        libc = _run(
            ["gcc", "-print-file-name=libc.a"], label="gcc", hint="Is gcc installed properly?"
        ).strip()
        if not os.path.isabs(libc) or not Path(libc).is_file():
            raise ImageError(
                "gcc cannot link statically here: the C library's static archive (libc.a) "
                "is missing. On Debian or Ubuntu, as root: `apt-get install -y libc6-dev`"
            )
        _run(
            ["gcc", *pause_cflags(found.tag), "-o", str(binary), str(found.source)],
            label="gcc pause.c",
            hint="pause.c is Kubernetes' own; a failure here is a toolchain problem.",
        )
        with buildah.scratch_container() as container:
            buildah.run("copy", "--chmod", "0755", container, str(binary), "/pause", label="copy")
            buildah.run("config", *config, container, label="buildah config")
            image_id = buildah.commit(container, PAUSE_IMAGE)
        buildah.push(image_id, archive, PAUSE_IMAGE, label="buildah push (pause)")
        _keep_only(archive, f"{_file_safe(PAUSE_REPOSITORY)}_*.tar")


# --- containerd ---------------------------------------------------------------------------------


def import_image(
    archive: Path,
    address: str | Path,
    *,
    namespace: str = "k8s.io",
    progress: TextIO | None = None,
) -> list[str]:
    """`ctr images import` the archive into the containerd at `address` (its socket), in
    `namespace` (the CRI plugin's is `k8s.io`); the names containerd now has it under."""
    say = printer(progress)
    hostdeps.ensure(
        [hostdeps.Requirement("ctr", "containerd")], purpose="importing an image", say=say
    )
    names = archive_names(archive)
    ctr = ["ctr", "--address", str(address), "--namespace", namespace]
    hint = (
        f"Is containerd running with its socket at {address}? Importing needs write access to "
        f"that socket (root, as a rule)."
    )
    started = time.monotonic()
    _run(
        [*ctr, "images", "import", str(archive)],
        label="ctr images import",
        hint=hint,
        timeout_s=IMPORT_TIMEOUT_S,
    )
    listed = set(_run([*ctr, "images", "ls", "-q"], label="ctr images ls", hint=hint).split())
    imported = [name for name in names if name in listed]
    if not imported:
        raise ImageError(
            f"`ctr images import {archive}` succeeded, yet containerd lists none of "
            f"{', '.join(names) or '(the archive names no image)'} in namespace {namespace}"
        )
    say(f"imported {', '.join(imported)} in {_seconds(time.monotonic() - started)}")
    return imported
