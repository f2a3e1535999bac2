"""Leader election's pure parts, on fake time: who may take the Lease (expiry judged on our
own clock from when we saw the record change), what a claim, a renewal and a release write,
and when a leader must give up."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tasklease.api.times import rfc3339_micro
from tasklease.kube.leader import (
    Election,
    LeaderElector,
    LeaseRecord,
    RenewalClock,
)

NOW = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)
STAMP = "2026-11-28T12:00:00.123456Z"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def held_by(holder: str | None, renew_time: str = "2026-11-28T11:00:00.000000Z") -> LeaseRecord:
    return LeaseRecord(holder, 15, "2026-11-28T10:00:00.000000Z", renew_time, 3)


def test_micro_time_is_what_the_api_server_expects() -> None:
    assert rfc3339_micro(NOW) == STAMP


def test_record_round_trips_through_the_lease_spec() -> None:
    record = held_by("a_1")
    assert LeaseRecord.from_spec(record.spec()) == record
    # A Lease created by someone else with fields left out.
    assert LeaseRecord.from_spec({}) == LeaseRecord(None, 15)
    assert LeaseRecord.from_spec({"holderIdentity": ""}).holder is None


def test_no_lease_yet_is_claimed_with_a_fresh_record() -> None:
    election = Election("me_1", clock=FakeClock())
    assert election.claim(None, now=NOW) == LeaseRecord("me_1", 15, STAMP, STAMP, 0)


def test_another_holder_is_respected_until_its_record_stops_changing_for_a_lease() -> None:
    clock = FakeClock()
    election = Election("me_1", clock=clock)
    record = held_by("other_1", renew_time="t0")
    assert election.claim(record, now=NOW) is None
    clock.now += 14.5
    assert election.claim(record, now=NOW) is None
    # It renewed: the 15 s count again from now, whatever its renewTime says.
    renewed = held_by("other_1", renew_time="t1")
    assert election.claim(renewed, now=NOW) is None
    clock.now += 14.5
    assert election.claim(renewed, now=NOW) is None
    clock.now += 0.5
    taken = election.claim(renewed, now=NOW)
    assert taken == LeaseRecord("me_1", 15, STAMP, STAMP, 4)  # one more transition


def test_expiry_does_not_trust_the_holders_wall_clock() -> None:
    """A renewTime far in the past (a holder whose clock is behind) does not make the Lease
    expired: only not seeing it change for a lease duration does."""
    clock = FakeClock()
    election = Election("me_1", clock=clock)
    ancient = held_by("other_1", renew_time="1999-01-01T00:00:00.000000Z")
    assert election.claim(ancient, now=NOW) is None


def test_a_released_lease_is_taken_at_once() -> None:
    election = Election("me_1", clock=FakeClock())
    released = Election("other_1").release(held_by("other_1"), now=NOW)
    assert released.holder is None and released.duration_s == 1
    assert released.transitions == 3
    taken = election.claim(released, now=NOW)
    assert taken is not None and taken.holder == "me_1" and taken.transitions == 4


def test_renewal_keeps_the_acquire_time_and_transitions() -> None:
    election = Election("me_1", clock=FakeClock())
    mine = held_by("me_1")
    renewed = election.claim(mine, now=NOW)
    assert renewed == LeaseRecord("me_1", 15, mine.acquire_time, STAMP, 3)


def test_renewal_clock_counts_from_the_start_of_the_last_successful_renewal() -> None:
    clock = FakeClock()
    renewals = RenewalClock(renew_deadline_s=10.0, clock=clock)
    assert renewals.remaining_s() == 0.0  # never renewed: nothing to lose
    renewals.renewed(clock.now)
    clock.now += 4.0  # the answer came back late; the deadline still counts from the start
    assert renewals.remaining_s() == pytest.approx(6.0)
    clock.now += 6.0
    assert renewals.remaining_s() <= 0


async def _nothing() -> None:
    return None


def test_timings_must_let_the_leader_give_up_before_its_lease_runs_out() -> None:
    with pytest.raises(ValueError, match="renew_deadline_s < lease_duration_s"):
        LeaderElector(
            object(),  # no request is made
            namespace="ns",
            name="lease",
            identity="me_1",
            on_started_leading=_nothing,
            on_stopped_leading=_nothing,
            lease_duration_s=15,
            renew_deadline_s=15.0,
        )
