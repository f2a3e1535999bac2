"""`python -m bench.heartbeat_cost` run small against the session's API server, so that the
measurement cannot rot (its figures are for bench runs, never asserted on), and the fencing
claim behind its `task_merge_rv` lever checked on a real API server."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest

from bench.heartbeat_cost import (
    FIGURES,
    MERGE_PATCH,
    make_tasks,
    measure,
    parse_args,
    post_json,
)
from bench.loadgen import Api
from tasklease.api.models import EPOCH_ANNOTATION, GROUP, HOLDER_ANNOTATION

pytestmark = pytest.mark.cluster


def test_heartbeat_cost_reports_cpu_per_write_against_a_lease(control_plane: Any) -> None:
    args = parse_args(
        [
            *("--writes", "50", "--rounds", "1", "--in-flight", "4"),
            *("--variants", "task_merge_rv", "--no-policies"),
            *("--namespace", f"hb-{secrets.token_hex(3)}"),
        ]
    )
    found = asyncio.run(measure(control_plane, args))
    for key in FIGURES:
        assert found[key] > 0, key
    assert set(found["variants"]) == {"lease", "task_small", "task", "task_merge_rv"}
    assert found["object_bytes"]["task"] > found["object_bytes"]["task_small"]


def test_resource_version_precondition_refuses_a_heartbeat_once_the_lease_moved(
    control_plane: Any,
) -> None:
    """The merge patch with a resourceVersion precondition fences as the `test`s do: once
    the operator hands the task on, the old runner's write is refused (409)."""

    async def scenario() -> tuple[int, int]:
        async with Api(
            control_plane.server,
            ca=control_plane.admin_ca,
            cert=control_plane.admin_cert,
            key=control_plane.admin_key,
            connections=2,
        ) as api:
            namespace = f"hb-{secrets.token_hex(3)}"
            await post_json(api, "/api/v1/namespaces", {"metadata": {"name": namespace}})
            [path] = await make_tasks(
                api, group=GROUP, namespace=namespace, prefix="fenced", count=1
            )
            seen = (await api.get_json(path))["metadata"]["resourceVersion"]

            def heartbeat(version: str) -> bytes:
                patch = {
                    "metadata": {"resourceVersion": version},
                    "status": {"progress": {"epoch": 3, "percent": 5}},
                }
                return json.dumps(patch).encode()

            delivered, answer = await api.call(
                "PATCH", f"{path}/status", heartbeat(seen), content_type=MERGE_PATCH
            )
            seen = json.loads(answer)["metadata"]["resourceVersion"]
            handout = {"metadata": {"annotations": {EPOCH_ANNOTATION: "4", HOLDER_ANNOTATION: "b"}}}
            moved, _ = await api.call(
                "PATCH", path, json.dumps(handout).encode(), content_type=MERGE_PATCH
            )
            assert moved == 200
            refused, _ = await api.call(
                "PATCH", f"{path}/status", heartbeat(seen), content_type=MERGE_PATCH
            )
            return delivered, refused

    delivered, refused = asyncio.run(scenario())
    assert (delivered, refused) == (200, 409)
