"""The runner's contract: the environment a runner container gets for the attempt it runs.

The operator writes it into every runner pod it makes (`tasklease.lease.pods`); the runner
SDK reads it (`tasklease.runner.sdk.Identity`), and the wrapper hands it on to each program
it runs for a pool runner's claim (`tasklease.runner.wrapper`). A pod takes its own name
from the downward API, so that the name the runner fences its writes with is the pod's.
A pool runner's own pod may set TASKLEASE_POD_NAME and TASKLEASE_NAMESPACE the same way.

The names are reserved: a Task's template may not set any TASKLEASE_* variable (the API
refuses it), so a template cannot spoof the lease identity.
"""

from __future__ import annotations

import json
from typing import Any, Final

ENV_TASK: Final = "TASKLEASE_TASK"
ENV_NAMESPACE: Final = "TASKLEASE_NAMESPACE"
ENV_EPOCH: Final = "TASKLEASE_EPOCH"
ENV_ATTEMPT: Final = "TASKLEASE_ATTEMPT"
ENV_POD_NAME: Final = "TASKLEASE_POD_NAME"
ENV_PARAMETERS: Final = "TASKLEASE_PARAMETERS"  # JSON
ENV_CHECKPOINT: Final = "TASKLEASE_CHECKPOINT"  # JSON; only when there is one
RESERVED_ENV: Final = (
    ENV_TASK,
    ENV_NAMESPACE,
    ENV_EPOCH,
    ENV_ATTEMPT,
    ENV_POD_NAME,
    ENV_PARAMETERS,
    ENV_CHECKPOINT,
)
RESERVED_ENV_PREFIX: Final = "TASKLEASE_"


def runner_env(
    *,
    task: str,
    namespace: str,
    epoch: int,
    attempt: int,
    pod_name: str,
    parameters: dict[str, str],
    checkpoint: Any,
) -> dict[str, str]:
    """The variables of one attempt's runner, in this order (numbers in decimal, the
    parameters and the checkpoint as JSON)."""
    env = {
        ENV_TASK: task,
        ENV_NAMESPACE: namespace,
        ENV_EPOCH: str(epoch),
        ENV_ATTEMPT: str(attempt),
        ENV_POD_NAME: pod_name,
        ENV_PARAMETERS: json.dumps(parameters, sort_keys=True),
    }
    if checkpoint is not None:
        env[ENV_CHECKPOINT] = json.dumps(checkpoint)
    return env
