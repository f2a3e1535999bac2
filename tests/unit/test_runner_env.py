"""The runner's contract: what the operator writes into a runner pod's environment is what
the runner SDK reads back, and what the wrapper hands on to each program of a pool runner."""

from __future__ import annotations

from tasklease.api.runner_env import ENV_POD_NAME, RESERVED_ENV, RESERVED_ENV_PREFIX
from tasklease.lease.pods import runner_pod
from tasklease.runner.sdk import Identity
from tasklease.runner.wrapper import identity_env
from tests.unit.builders import NAMESPACE, make_task


def test_a_runner_pod_environment_reads_back_as_the_attempts_identity() -> None:
    task = make_task()
    manifest = runner_pod(task, epoch=3, attempt=2, checkpoint={"row": 7})
    [container] = manifest["spec"]["containers"]
    env = {
        item["name"]: manifest["metadata"]["name"]
        if item["name"] == ENV_POD_NAME
        else item["value"]
        for item in container["env"]
        if item["name"].startswith(RESERVED_ENV_PREFIX)
    }

    identity = Identity.from_env(env)
    assert identity == Identity(
        task=task.name,
        namespace=NAMESPACE,
        epoch=3,
        pod_name=manifest["metadata"]["name"],
        attempt=2,
        parameters={"date": "2024-01-01"},
        checkpoint={"row": 7},
    )
    assert identity_env(identity) == env
    assert set(env) == set(RESERVED_ENV)
