"""Retry delays: exponential, capped, jittered deterministically per (task uid, attempt)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tasklease.api.models import Backoff
from tasklease.lease.backoff import jitter_fraction, retry_delay

UID = "6f1c2a9e-0d4b-4c55-9a53-1e7f3b2d8c10"
UIDS = [f"uid-{n}" for n in range(200)]


def seconds(delay: timedelta) -> float:
    return delay.total_seconds()


@pytest.mark.parametrize(
    ("factor", "expected_s"),
    [
        (2.0, [10, 20, 40, 80, 160, 300, 300, 300]),
        (3.0, [10, 30, 90, 270, 300, 300, 300, 300]),
        (1.0, [10, 10, 10, 10, 10, 10, 10, 10]),
    ],
)
def test_delay_grows_by_factor_per_failed_attempt_until_the_cap(
    factor: float, expected_s: list[float]
) -> None:
    policy = Backoff(
        initial=timedelta(seconds=10), factor=factor, max=timedelta(minutes=5), jitter=0
    )
    delays = [seconds(retry_delay(policy, failed_attempt=n, task_uid=UID)) for n in range(1, 9)]
    assert delays == expected_s


def test_first_retry_waits_the_initial_delay() -> None:
    policy = Backoff(initial=timedelta(seconds=7), jitter=0)
    assert retry_delay(policy, failed_attempt=1, task_uid=UID) == timedelta(seconds=7)


def test_attempt_zero_is_treated_like_the_first_failed_attempt() -> None:
    policy = Backoff(initial=timedelta(seconds=7), jitter=0)
    assert retry_delay(policy, failed_attempt=0, task_uid=UID) == timedelta(seconds=7)


def test_initial_delay_above_the_cap_is_capped() -> None:
    policy = Backoff(initial=timedelta(minutes=10), max=timedelta(minutes=1), jitter=0)
    assert retry_delay(policy, failed_attempt=1, task_uid=UID) == timedelta(minutes=1)


@pytest.mark.parametrize("attempt", [50, 100, 309, 1000, 10**6])
def test_huge_attempt_numbers_stay_at_the_cap_without_overflow(attempt: int) -> None:
    # factor**exponent overflows a float from 10**309 on; the delay must still be the cap.
    policy = Backoff(initial=timedelta(hours=1), factor=10, max=timedelta(hours=2), jitter=0)
    assert retry_delay(policy, failed_attempt=attempt, task_uid=UID) == timedelta(hours=2)


@pytest.mark.parametrize("jitter", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("attempt", [1, 2, 3, 5])
def test_jitter_only_lengthens_the_delay_and_by_at_most_its_fraction(
    jitter: float, attempt: int
) -> None:
    policy = Backoff(initial=timedelta(seconds=10), factor=2, max=timedelta(hours=1), jitter=jitter)
    base_s = 10 * 2 ** (attempt - 1)
    for uid in UIDS:
        delay_s = seconds(retry_delay(policy, failed_attempt=attempt, task_uid=uid))
        assert base_s <= delay_s <= base_s * (1 + jitter)


def test_jitter_spreads_tasks_that_reached_the_cap() -> None:
    # Jitter applies after the cap: tasks backing off at the cap must not retry in lockstep.
    policy = Backoff(initial=timedelta(seconds=50), factor=2, max=timedelta(seconds=60), jitter=0.5)
    delays = {retry_delay(policy, failed_attempt=5, task_uid=uid) for uid in UIDS}
    assert len(delays) == len(UIDS)
    assert all(timedelta(seconds=60) <= d <= timedelta(seconds=90) for d in delays)


def test_jitter_is_deterministic_per_task_and_attempt() -> None:
    policy = Backoff(jitter=0.5)
    first = [retry_delay(policy, failed_attempt=2, task_uid=uid) for uid in UIDS]
    again = [retry_delay(policy, failed_attempt=2, task_uid=uid) for uid in UIDS]
    assert first == again


def test_jitter_spreads_tasks_that_failed_together() -> None:
    policy = Backoff(initial=timedelta(seconds=10), jitter=0.5)
    delays = {retry_delay(policy, failed_attempt=1, task_uid=uid) for uid in UIDS}
    assert len(delays) > 0.9 * len(UIDS)


def test_jitter_differs_between_attempts_of_the_same_task() -> None:
    fractions = {jitter_fraction(task_uid=UID, attempt=n) for n in range(1, 50)}
    assert len(fractions) == 49


def test_jitter_fraction_lies_in_the_unit_interval() -> None:
    for uid in UIDS:
        for attempt in range(1, 6):
            assert 0 <= jitter_fraction(task_uid=uid, attempt=attempt) < 1


@pytest.mark.parametrize("jitter", [0.0, 1.0])
def test_zero_initial_delay_means_no_wait(jitter: float) -> None:
    policy = Backoff(initial=timedelta(0), factor=10, jitter=jitter)
    for attempt in (*range(1, 10), 1000):
        assert retry_delay(policy, failed_attempt=attempt, task_uid=UID) == timedelta(0)


def test_policy_parses_go_durations_from_the_wire() -> None:
    policy = Backoff.model_validate({"initial": "1m30s", "factor": 2, "max": "1h", "jitter": 0})
    assert retry_delay(policy, failed_attempt=2, task_uid=UID) == timedelta(minutes=3)
