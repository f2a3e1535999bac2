"""The examples users copy, and the README's main-job command, keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "manifest", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(EXAMPLES))
)
def test_example_manifest_is_accepted_by_the_api_server(
    kubectl: Any, namespace: str, manifest: Path
) -> None:
    result = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(manifest), check=False)
    assert result.returncode == 0, result.stderr


def test_demo_runs_to_completion(tmp_path: Path, control_plane_binaries: Any) -> None:
    """`make demo`: its own control plane, operator and executor; exit 0 once the hung
    runner's task was handed over and finished."""
    result = subprocess.run(
        [sys.executable, "-m", "tasklease.demo", "--state-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ProgressTimeout" in result.stdout
    assert "rebuild-index-2" in result.stdout
    assert "ExitCode3 is in spec.retry.nonRetryableErrors" in result.stdout
