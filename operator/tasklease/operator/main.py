"""Run the operator: `tasklease operator`.

kopf runs the process, and only the process (docs/decisions/kopf-runs-the-process.md): the
event loop, SIGTERM and SIGINT, a graceful stop, and the liveness endpoint (`/healthz`). It
runs standalone and watches nothing. All the operator's work is our code, which kopf starts
and stops through the two handlers in `handlers.py`; the exit status is ours too
(`handlers.Shutdown`).
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import cast

import kopf
from kopf._core.engines.peering import Identity

from tasklease.operator import handlers
from tasklease.settings import OperatorSettings


def run(operator: OperatorSettings | None = None) -> None:
    operator = operator or OperatorSettings.from_env()
    logging.basicConfig(
        level=operator.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    health = f"http://0.0.0.0:{operator.health_port}/healthz" if operator.health_port else None
    memo = handlers.new_memo()
    shutdown: handlers.Shutdown = memo[handlers.MEMO_SHUTDOWN]
    kopf.run(
        # kopf's default identity is `getpass.getuser()@host`, which raises for a UID with
        # no passwd entry (the chart's 65532 in our image, or any UID a cluster assigns).
        # kopf uses it only for peering, which tasklease leaves off (leader election is its
        # own), so the host name (the pod's name) is enough.
        identity=cast(Identity, socket.gethostname() or "tasklease"),
        settings=settings,
        standalone=True,
        clusterwide=not operator.namespaces,
        namespaces=operator.namespaces,
        liveness_endpoint=health,
        memo=memo,
        stop_flag=shutdown.flag,
    )
    if shutdown.exit_code:
        sys.exit(shutdown.exit_code)
