"""The lease clock that stands still while the operator cannot see the API server."""

from __future__ import annotations

from tasklease.kube.client import NO_ANSWER
from tasklease.operator.sight import Sight


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_runs_with_monotonic_time_while_the_operator_sees() -> None:
    time = FakeTime()
    sight = Sight(monotonic=time)
    start = sight.clock()
    time.now += 7.5
    assert sight.clock() - start == 7.5
    assert not sight.blind


def test_an_outage_does_not_count_and_leaves_every_window_as_it_was() -> None:
    time = FakeTime()
    sight = Sight(monotonic=time)
    deadline = sight.clock() + 10.0  # a lease with 10 s left
    time.now += 4.0
    sight.lost("watch of tasks")
    time.now += 35.0  # an outage longer than the window
    assert sight.clock() < deadline and sight.blind
    sight.regained("watch of tasks")
    assert not sight.blind and sight.periods == 1
    assert deadline - sight.clock() == 6.0  # what was left when sight was lost
    assert sight.blind_seconds == 35.0


def test_sight_is_back_only_when_every_failed_source_is() -> None:
    time = FakeTime()
    sight = Sight(monotonic=time)
    sight.lost("watch of tasks")
    sight.lost("watch of pods")
    time.now += 5.0
    sight.regained("watch of tasks")
    assert sight.blind
    time.now += 5.0
    sight.regained("watch of pods")
    assert not sight.blind and sight.blind_seconds == 10.0


def test_a_request_that_waited_in_vain_gives_its_wait_back_and_the_clock_never_goes_back() -> None:
    time = FakeTime()
    sight = Sight(monotonic=time)
    time.now += 20.0
    before = sight.clock()
    deadline = before + 5.0
    sight.api_request(verb="GET", resource="tasks", code=NO_ANSWER, seconds=8.0)
    assert sight.clock() == before  # never back
    assert not sight.blind  # nothing to wait for: the next request may come much later
    time.now += 8.0
    assert sight.clock() == before  # the 8 s waited in vain are made up for
    time.now += 5.0
    assert sight.clock() == deadline


def test_server_errors_give_back_their_wait_and_answers_do_not() -> None:
    time = FakeTime()
    sight = Sight(monotonic=time)
    for code in ("503", "500", "429"):
        sight.api_request(verb="PATCH", resource="tasks", code=code, seconds=1.0)
    sight.api_request(verb="PATCH", resource="tasks", code="409", seconds=1.0)
    sight.api_throttled(budget="requests", seconds=5.0)  # our own rate limit: not blindness
    assert sight.blind_seconds == 3.0


def test_a_failed_request_while_blind_is_not_counted_twice() -> None:
    time = FakeTime()
    sight = Sight(monotonic=time)
    sight.lost("watch of tasks")
    time.now += 10.0
    sight.api_request(verb="GET", resource="tasks", code=NO_ANSWER, seconds=10.0)
    sight.regained("watch of tasks")
    assert sight.blind_seconds == 10.0


def test_blind_periods_are_kept_to_leave_them_out_of_ages_seen_later() -> None:
    time = FakeTime()
    sight = Sight(monotonic=time)
    time.now = 110.0
    # A poll that failed at 110 had its last answer at 108: blind since then.
    sight.lost("the leader election's Lease", since=108.0)
    time.now = 140.0
    assert sight.blind_within(10.0) == 10.0  # the current period counts up to now
    sight.regained("the leader election's Lease")
    time.now = 150.0
    assert sight.blind_within(5.0) == 0.0
    assert sight.blind_within(20.0) == 10.0  # 130-140 of the period 108-140
    assert sight.blind_within(100.0) == 32.0  # all of it
