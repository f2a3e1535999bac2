"""The operator's clock for lease deadlines, which stops while the operator cannot see.

Expiry is measured on the operator's own clock from what it observed (design invariant 3),
and time during which nobody could report or the operator could not see must not count
against a lease: when the API server is down, runners cannot report and the operator
cannot see the reports they would have made. Timing leases on the plain monotonic clock,
an outage longer than a lease window would end every lease at once when the API server
came back, racing the runners' first reports after it (as the node lifecycle controller
stops evicting when every node goes silent at once: the fault is the control plane's).

`Sight` is that clock: monotonic time minus the time spent blind. The operator is blind
from the first failure of any of its watches until every watch that failed is back: while
blind the clock stands still, so no deadline passes; after, every lease has what was left
of its window when sight was lost. A request of the operator's that got no answer (or a 5xx
or 429 one) was blind for as long as it waited: a hung API server, whose watches may stay
open and silent, is noticed only by such a timeout. That time is given back too (the clock
stands still for as long), but a failed request leaves nothing to recover from: the next
one may come only with the next event or deadline, which a clock standing still would
never bring.

The reconciler takes `Sight.clock` as its monotonic clock for everything it times (reports,
deadlines, pool runners' Lease renewals); wall-clock rules (attemptTimeout,
activeDeadline, lateAfter) are unaffected.

A standby replica is blind too when its leader election cannot reach the Lease. It keeps
its blind periods, so that when it leads after an outage, the ages of the leases it first
sees in its listing (the API server's write times, `api/written.py`) leave out the time
nobody could report (`blind_within`): the outage that made the old leader step down does
not count against the runners it leaves behind. A process that starts after an outage did
not see it and cannot leave it out (docs/design.md, "Known limits").
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from tasklease.kube.client import NO_ANSWER

logger = logging.getLogger(__name__)

# Blind periods kept for `blind_within`: enough for any lease window after a flapping
# control plane; older ones only shorten ages further back than any window.
_PERIODS_KEPT = 256


class Sight:
    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._blind_since: float | None = None
        self._blind_total = 0.0  # blind time of the periods that ended
        self._down: set[str] = set()
        self.periods = 0  # blind periods that ended (for the log and metrics)
        self._last = float("-inf")
        self._ended: deque[tuple[float, float]] = deque(maxlen=_PERIODS_KEPT)

    @property
    def blind(self) -> bool:
        return self._blind_since is not None

    @property
    def blind_seconds(self) -> float:
        """All the time spent blind so far, the current period included."""
        current = 0.0 if self._blind_since is None else self._monotonic() - self._blind_since
        return self._blind_total + current

    def clock(self) -> float:
        """Monotonic time that stands still while the operator is blind. It never goes
        back: a blind period found to have begun earlier (a request that timed out) is
        made up for by standing still for longer."""
        if self._blind_since is not None:
            reading = self._blind_since - self._blind_total
        else:
            reading = self._monotonic() - self._blind_total
        self._last = max(self._last, reading)
        return self._last

    def lost(self, source: str, *, since: float | None = None) -> None:
        """`source` (a watch, the leader election) failed; `since`: when it last worked, if
        it knows (a poll that failed may have been blind since its last answer)."""
        if self._blind_since is None:
            now = self._monotonic()
            self._blind_since = now if since is None else min(now, since)
            logger.warning("cannot see the API server (%s): lease deadlines stand still", source)
        self._down.add(source)

    def blind_within(self, seconds: float) -> float:
        """How much of the last `seconds` (of the monotonic clock) this process was blind."""
        now = self._monotonic()
        start = now - seconds
        periods = list(self._ended)
        if self._blind_since is not None:
            periods.append((self._blind_since, now))
        return sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in periods)

    def give_back(self, seconds: float) -> None:
        """A request waited `seconds` in vain: the clock stands still that much longer
        (unless the operator is blind anyway, when it stands still already)."""
        if self._blind_since is None and seconds > 0:
            self._blind_total += seconds

    def regained(self, source: str) -> None:
        """`source` works again; sight is back when no source is down."""
        self._down.discard(source)
        if self._down or self._blind_since is None:
            return
        now = self._monotonic()
        lasted = now - self._blind_since
        self._ended.append((self._blind_since, now))
        self._blind_total += lasted
        self._blind_since = None
        self.periods += 1
        logger.warning(
            "the API server is visible again after %.1fs; every lease's deadline moves by that",
            lasted,
        )

    # --- as a RequestObserver of the writer -------------------------------------------------

    def api_request(self, *, verb: str, resource: str, code: str, seconds: float) -> None:
        if code == NO_ANSWER or code == "429" or code.startswith("5"):
            self.give_back(seconds)

    def api_throttled(self, *, budget: str, seconds: float) -> None:
        del budget, seconds  # waiting for our own rate limit is not blindness
