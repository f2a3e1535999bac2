"""How long a runner has gone without a report reaching the API server, for self-fencing.

A runner gives its lease up by itself once it has been silent for a whole report window
(`TaskLease`), about when the operator may hand the task on. What counts is silence the
operator counts too:

- time in which the API server said it was down (a refused connection, a 5xx or 429
  answer) does not count: nobody could report, and the operator, blind as well, stops its
  lease clocks (`operator/sight.py`);
- nor does the time the API server takes to come back whole after that: a server that
  has just started answers 403 until its authorizer has loaded, 404 until it serves the
  Task API, and slowly while it fills its caches, to everyone, the operator included.
  That recovery is excused for at most `recovery_s` after the server first answered again:
  a runner whose rights were really taken away during the outage stops that much later;
- anything else counts, a timeout above all: that is what a partition of this runner
  alone looks like.

Pure: the caller gives the monotonic time of each event.
"""

from __future__ import annotations


class Silence:
    def __init__(self, now: float) -> None:
        self._since = now  # the last delivered write was sent, or the lease started
        self._last_try = now
        self._excused = 0.0
        self._recovering_since: float | None = None  # the server's last "down" answer

    def delivered(self, sent_at: float) -> None:
        """A write sent at `sent_at` reached the API server."""
        self._since = self._last_try = sent_at
        self._excused = 0.0
        self._recovering_since = None

    def failed(self, now: float, *, server_down: bool, recovery_s: float) -> None:
        """A request failed at `now` without proving anything about the lease;
        `server_down`: the API server said it is down. Excused is the time since the try
        before, when the server was down then or still coming back."""
        if server_down:
            self._excused += now - self._last_try
            self._recovering_since = now
        elif self._recovering_since is not None:
            end = min(now, self._recovering_since + recovery_s)
            self._excused += max(0.0, end - self._last_try)
        self._last_try = now

    def silent_s(self, now: float) -> float:
        """The silence that counts against the lease."""
        return now - self._since - self._excused
