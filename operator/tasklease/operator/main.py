"""Run the operator: `tasklease operator`."""

from __future__ import annotations

import logging

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
    handlers.configure(settings, operator)
    health = f"http://0.0.0.0:{operator.health_port}/healthz" if operator.health_port else None
    kopf.run(
        settings=settings,
        standalone=settings.peering.standalone,
        peering_name=operator.peering,
        priority=operator.priority,
        clusterwide=not operator.namespaces,
        namespaces=operator.namespaces,
        liveness_endpoint=health,
    )
