"""Retry delays: exponential, capped, with deterministic jitter.

The jitter is derived from the task's uid and the attempt number instead of a random
generator, so the delay is a pure function of what is stored on the Task: an operator that
restarts in the middle of a backoff computes the same delay again, and tests need no seed.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from tasklease.api.models import Backoff


def jitter_fraction(*, task_uid: str, attempt: int) -> float:
    """A stable value in [0, 1) for this task and attempt."""
    digest = hashlib.blake2b(f"{task_uid}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def retry_delay(policy: Backoff, *, failed_attempt: int, task_uid: str) -> timedelta:
    """Delay before the attempt that follows `failed_attempt` (1-based).

    The first retry waits `initial`, each further one `factor` times longer, never more than
    `max`; jitter then adds up to `jitter` of that. Jitter comes after the cap on purpose:
    capped first, every task at the cap would retry at the same instant.
    """
    exponent = max(failed_attempt - 1, 0)
    cap_s = policy.max.total_seconds()
    try:
        base_s = policy.initial.total_seconds() * policy.factor**exponent
    except OverflowError:
        # float pow raises (not inf) from factor**309 on; an exception here would fail the
        # reconcile of this Task on every retry. Far past the cap is the cap (0 stays 0).
        base_s = cap_s if policy.initial > timedelta(0) else 0.0
    base_s = min(base_s, cap_s)
    spread = policy.jitter * jitter_fraction(task_uid=task_uid, attempt=failed_attempt)
    return timedelta(seconds=base_s * (1 + spread))
