"""Run the operator: `tasklease operator`."""

from __future__ import annotations

import logging
import sys

import kopf

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
