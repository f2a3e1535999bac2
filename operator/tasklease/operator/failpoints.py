"""Failpoints: places in the operator where a robustness run can make it die, as a `kill -9`
would, between two of the writes of one decision (after the lease write, before the pod or
the status; after the pod, before the status). They are armed only by the environment
variable `TASKLEASE_FAILPOINTS` (`name=probability,...`, e.g. `after-lease-write=0.05`) and
are a dictionary lookup otherwise. The soak (`make soak`) arms them; nothing else should.

Dying there must lose nothing (design invariant 5): everything needed to go on is on the
Task, and the next operator finishes what this one began.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Final

logger = logging.getLogger(__name__)

ENV: Final = "TASKLEASE_FAILPOINTS"
AFTER_LEASE_WRITE: Final = "after-lease-write"
AFTER_STATUS_WRITE: Final = "after-status-write"
AFTER_POD_CREATE: Final = "after-pod-create"
NAMES: Final = frozenset({AFTER_LEASE_WRITE, AFTER_STATUS_WRITE, AFTER_POD_CREATE})


def _armed(setting: str) -> dict[str, float]:
    armed: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in setting.split(","))):
        name, _, probability = item.partition("=")
        if name not in NAMES:
            raise ValueError(f"{ENV}: unknown failpoint {name!r} (known: {sorted(NAMES)})")
        armed[name] = float(probability or "1")
    return armed


_ARMED: Final = _armed(os.environ.get(ENV, ""))


def reached(name: str) -> None:
    """Die here, at once and without cleanup, with the probability the environment gave."""
    probability = _ARMED.get(name)
    if probability is not None and random.random() < probability:
        logger.warning("failpoint %s: dying as a kill -9 would", name)
        logging.shutdown()
        os._exit(137)
