"""What counts as a runner's silence (self-fencing), on fake time: an outage of the API
server and its recovery after do not, a partition of the runner alone does."""

from __future__ import annotations

from tasklease.runner.silence import Silence

WINDOW = 6.0


def _tries(silence: Silence, start: float, end: float, *, server_down: bool) -> None:
    """A failed try every second from `start` to `end`, both included."""
    at = start
    while at <= end:
        silence.failed(at, server_down=server_down, recovery_s=WINDOW)
        at += 1.0


def test_silence_is_the_time_since_the_last_delivered_write() -> None:
    silence = Silence(0.0)
    assert silence.silent_s(4.0) == 4.0
    silence.delivered(3.0)
    assert silence.silent_s(4.0) == 1.0


def test_a_partition_counts_in_full() -> None:
    silence = Silence(0.0)
    _tries(silence, 1.0, 7.0, server_down=False)  # timeouts, 403s: nothing says "down"
    assert silence.silent_s(7.0) == 7.0


def test_an_outage_does_not_count() -> None:
    silence = Silence(0.0)
    _tries(silence, 1.0, 9.0, server_down=True)
    assert silence.silent_s(9.0) == 0.0
    assert silence.silent_s(10.0) == 1.0  # after the last word that it is down, time counts


def test_the_recovery_after_an_outage_does_not_count() -> None:
    """Down for 9 s, then 403s (its authorizer loading) for 4 s, then a delivered write."""
    silence = Silence(0.0)
    _tries(silence, 1.0, 9.0, server_down=True)
    _tries(silence, 10.0, 13.0, server_down=False)
    assert silence.silent_s(13.0) == 0.0
    silence.delivered(14.0)
    assert silence.silent_s(15.0) == 1.0


def test_the_recovery_is_excused_for_a_bounded_time() -> None:
    """Refused for good after the outage (its rights taken away, or cut off from the server
    just then): the silence counts again `recovery_s` after the server's last "down"."""
    silence = Silence(0.0)
    _tries(silence, 1.0, 9.0, server_down=True)
    _tries(silence, 10.0, 30.0, server_down=False)
    assert silence.silent_s(30.0) == 30.0 - 9.0 - WINDOW
    assert silence.silent_s(30.0) >= WINDOW  # so the runner gives the lease up


def test_a_delivered_write_ends_the_recovery() -> None:
    silence = Silence(0.0)
    _tries(silence, 1.0, 3.0, server_down=True)
    silence.delivered(4.0)
    _tries(silence, 5.0, 11.0, server_down=False)  # then a partition of its own
    assert silence.silent_s(11.0) == 7.0


def test_an_outage_after_the_recovery_bound_is_excused_again() -> None:
    silence = Silence(0.0)
    _tries(silence, 1.0, 2.0, server_down=True)
    _tries(silence, 3.0, 12.0, server_down=False)  # 2 + 6 excused; 9..12 counts
    _tries(silence, 13.0, 20.0, server_down=True)  # down again: 12..20 excused
    assert silence.silent_s(20.0) == 20.0 - 2.0 - 6.0 - 8.0
