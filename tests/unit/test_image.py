"""The pure parts of `make image` (no buildah, no containerd): which files make the build
context, the hash that decides whether the cached archive is still the image of this source,
the stand-in base's recipe key, and reading an archive's image names.

The build itself (buildah, mmdebstrap, ctr) runs for real in the end-to-end suite
(`make image`, tests/e2e/test_real_node.py).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from tasklease.controlplane.image import (
    ImageError,
    archive_names,
    context_files,
    context_hash,
    dockerfile_base_default,
    ignore_patterns,
    standin_recipe_key,
)
from tests.conftest import REPO_ROOT as ROOT

# The repository's own .dockerignore, in miniature.
IGNORE = """\
# an allowlist
*
!pyproject.toml
!constraints.txt
!operator/
operator/*.egg-info
operator/pkg/tooling
**/__pycache__
**/*.pyc
"""

TREE = {
    "pyproject.toml": "[project]\nname = 'pkg'\n",
    "constraints.txt": "a==1\n",
    "README.md": "not in the context\n",
    "operator/pkg/__init__.py": "",
    "operator/pkg/core.py": "VALUE = 1\n",
    "operator/pkg/sub/deep.py": "DEEP = 1\n",
    "operator/pkg/__pycache__/core.cpython-311.pyc": "bytecode",
    "operator/pkg/sub/stray.pyc": "bytecode",
    "operator/pkg/tooling/cli.py": "local tooling\n",
    "operator/pkg.egg-info/PKG-INFO": "generated\n",
    ".venv/lib/site.py": "a virtualenv\n",
    "tests/test_core.py": "a test\n",
}
# Docker always sends the Dockerfile and the ignore file, whatever the patterns say.
IN_CONTEXT = [
    ".dockerignore",
    "Dockerfile",
    "constraints.txt",
    "operator/pkg/__init__.py",
    "operator/pkg/core.py",
    "operator/pkg/sub/deep.py",
    "pyproject.toml",
]


def make_tree(root: Path, files: dict[str, str] | None = None) -> Path:
    for relative, text in (files if files is not None else TREE).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / ".dockerignore").write_text(IGNORE)
    (root / "Dockerfile").write_text("ARG PYTHON_IMAGE=python:3.11-slim\nFROM ${PYTHON_IMAGE}\n")
    return root


def digest(root: Path, **inputs: str) -> str:
    return context_hash(root, dockerfile=root / "Dockerfile", inputs=inputs or {"base-id": "b"})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "repo")


# --- which files count ------------------------------------------------------------------------


def test_context_holds_what_dockerignore_lets_through_sorted(tree: Path) -> None:
    assert context_files(tree) == IN_CONTEXT


def test_no_ignore_file_means_everything(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "c.txt").write_text("c")
    assert context_files(tmp_path) == ["a/c.txt", "b.txt"]


def test_containerignore_wins_over_dockerignore(tree: Path) -> None:
    (tree / ".containerignore").write_text("*\n!pyproject.toml\n")
    assert "pyproject.toml" in context_files(tree)
    assert "constraints.txt" not in context_files(tree)


def test_an_exception_reaches_into_an_excluded_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, {"docs/a.md": "a", "docs/keep/b.md": "b", "other/c.md": "c"})
    (tmp_path / ".dockerignore").write_text("docs\n!docs/keep/b.md\nother\n")
    assert context_files(tmp_path) == [".dockerignore", "Dockerfile", "docs/keep/b.md"]


def test_the_last_matching_rule_wins(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a.txt": "a", "b.txt": "b"})
    (tmp_path / ".dockerignore").write_text("*.txt\n!*.txt\nb.txt\n")
    assert context_files(tmp_path) == [".dockerignore", "Dockerfile", "a.txt"]


def test_ignore_patterns_skip_comments_and_blank_lines(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("# comment\n\n/abs/\n!keep\n  spaced  \n")
    assert ignore_patterns(tmp_path) == ["/abs/", "!keep", "spaced"]


# --- the hash -----------------------------------------------------------------------------------


def test_the_hash_is_stable(tree: Path, tmp_path: Path) -> None:
    again = make_tree(tmp_path / "again", dict(reversed(list(TREE.items()))))
    assert digest(tree) == digest(tree) == digest(again)
    assert len(digest(tree)) == 64


def test_a_change_of_a_context_file_changes_the_hash(tree: Path) -> None:
    before = digest(tree)
    with (tree / "operator/pkg/sub/deep.py").open("a") as handle:
        handle.write("# one more line\n")
    assert digest(tree) != before


def test_a_new_or_removed_or_renamed_file_changes_the_hash(tree: Path) -> None:
    before = digest(tree)
    (tree / "operator/pkg/new.py").write_text("")
    added = digest(tree)
    assert added != before
    (tree / "operator/pkg/new.py").rename(tree / "operator/pkg/renamed.py")
    assert digest(tree) not in (before, added)
    (tree / "operator/pkg/renamed.py").unlink()
    assert digest(tree) == before


def test_the_executable_bit_counts(tree: Path) -> None:
    before = digest(tree)
    os.chmod(tree / "operator/pkg/core.py", 0o755)
    assert digest(tree) != before


@pytest.mark.parametrize(
    "ignored",
    [
        "README.md",
        "operator/pkg/__pycache__/core.cpython-311.pyc",
        "operator/pkg/sub/stray.pyc",
        "operator/pkg/tooling/cli.py",
        "operator/pkg.egg-info/PKG-INFO",
        ".venv/lib/site.py",
        "tests/test_core.py",
        "tests/new_test.py",
    ],
)
def test_an_ignored_file_does_not_change_the_hash(tree: Path, ignored: str) -> None:
    before = digest(tree)
    path = tree / ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("changed\n")
    assert digest(tree) == before


def test_the_dockerfile_the_ignore_file_and_the_inputs_count(tree: Path) -> None:
    before = digest(tree)
    assert digest(tree, **{"base-id": "other"}) != before
    with (tree / "Dockerfile").open("a") as handle:
        handle.write("USER 65532\n")
    after_dockerfile = digest(tree)
    assert after_dockerfile != before
    with (tree / ".dockerignore").open("a") as handle:
        handle.write("# a comment only\n")
    assert digest(tree) != after_dockerfile


def test_a_symlink_counts_by_its_target(tree: Path) -> None:
    (tree / "operator/pkg/link.py").symlink_to("core.py")
    before = digest(tree)
    assert "operator/pkg/link.py" in context_files(tree)
    (tree / "operator/pkg/link.py").unlink()
    (tree / "operator/pkg/link.py").symlink_to("sub/deep.py")
    assert digest(tree) != before


# --- the rest -----------------------------------------------------------------------------------


def test_the_base_default_comes_from_the_dockerfile(tree: Path) -> None:
    assert dockerfile_base_default(tree / "Dockerfile") == "python:3.11-slim"
    assert dockerfile_base_default(ROOT / "Dockerfile") == "python:3.11-slim"
    (tree / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(ImageError, match="PYTHON_IMAGE"):
        dockerfile_base_default(tree / "Dockerfile")


def test_the_standin_recipe_key_follows_the_host_certificates(tmp_path: Path) -> None:
    ca = tmp_path / "extra.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\none\n")
    with_ca = standin_recipe_key([ca])
    assert standin_recipe_key([ca]) == with_ca
    assert standin_recipe_key([]) != with_ca
    ca.write_text("-----BEGIN CERTIFICATE-----\ntwo\n")
    assert standin_recipe_key([ca]) != with_ca


def _docker_archive(path: Path, manifest: object) -> Path:
    with tarfile.open(path, "w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_archive_names_are_its_repo_tags(tmp_path: Path) -> None:
    archive = _docker_archive(
        tmp_path / "a.tar",
        [{"Config": "c.json", "RepoTags": ["tasklease.local/pause:v1"], "Layers": []}],
    )
    assert archive_names(archive) == ["tasklease.local/pause:v1"]


def test_a_broken_archive_says_to_rebuild(tmp_path: Path) -> None:
    (tmp_path / "broken.tar").write_text("not a tar")
    with pytest.raises(ImageError, match="build again"):
        archive_names(tmp_path / "broken.tar")
