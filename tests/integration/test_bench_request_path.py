"""`python -m bench.request_path` run small against the session's API server, so that the
benchmark cannot rot (its figures are for bench runs, never asserted on)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.request_path import measure

pytestmark = pytest.mark.cluster


def test_request_path_measures_both_clients(control_plane: Any) -> None:
    found = asyncio.run(
        measure(control_plane.kubeconfig, requests=40, in_flight=4, repeats=1, compare=True)
    )
    assert set(found) == {
        "cpu_us_per_request",
        "wall_us_per_request",
        "trust_env_cpu_us_per_request",
        "trust_env_wall_us_per_request",
        "cpu_ratio",
    }
    assert all(value > 0 for value in found.values())
