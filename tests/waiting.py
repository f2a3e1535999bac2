"""Waiting for something outside the test (an API server, a process) to come about.

Every wait in the tests goes through here, so that each one has a deadline and fails naming
what it waited for and what it saw last, instead of hanging or failing later on a symptom.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class _Polling(Generic[T]):
    """What one wait has seen so far, and whether its time is up."""

    def __init__(self, what: str, until: Callable[[T], object] | None, timeout: float) -> None:
        self.what = what
        self.until = until
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.last: object = None
        self.error: Exception | None = None

    def reached(self, value: T) -> bool:
        self.last, self.error = value, None
        return bool(self.until(value) if self.until is not None else value)

    def time_is_up(self) -> bool:
        return time.monotonic() >= self.deadline

    def timed_out(self) -> AssertionError:
        seen = f"last raised: {self.error!r}" if self.error else f"last seen: {self.last!r}"
        return AssertionError(f"timed out after {self.timeout}s waiting for {self.what}; {seen}")


@overload
def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float = ...,
    interval: float = ...,
    retrying: tuple[type[Exception], ...] = ...,
) -> T: ...
@overload
def wait_for(
    what: str,
    probe: Callable[[], T],
    *,
    until: Callable[[T], object],
    timeout: float = ...,
    interval: float = ...,
    retrying: tuple[type[Exception], ...] = ...,
) -> T: ...
def wait_for(
    what: str,
    probe: Callable[[], Any],
    *,
    until: Callable[[Any], object] | None = None,
    timeout: float = 30.0,
    interval: float = 0.1,
    retrying: tuple[type[Exception], ...] = (),
) -> Any:
    """Poll `probe` until what it returns is truthy (or satisfies `until`), and return that.

    Exceptions of the `retrying` types count as "not yet" (a server still starting); when
    time runs out the last one is chained to the failure, which names `what` and the last
    value seen. Other exceptions end the wait at once."""
    polling: _Polling[Any] = _Polling(what, until, timeout)
    while True:
        try:
            value = probe()
        except retrying as error:
            polling.error = error
        else:
            if polling.reached(value):
                return value
        if polling.time_is_up():
            raise polling.timed_out() from polling.error
        time.sleep(interval)


async def wait_for_async(
    what: str,
    probe: Callable[[], T | None] | Callable[[], Awaitable[T | None]],
    *,
    # Not asyncio.timeout around the call: the deadline is part of the failure's message.
    timeout: float = 30.0,  # noqa: ASYNC109
    interval: float = 0.05,
    retrying: tuple[type[Exception], ...] = (),
) -> T:
    """`wait_for` for a test that runs an event loop: the loop goes on while it waits.
    `probe` may be a coroutine function (run a blocking call with `asyncio.to_thread`)."""
    polling: _Polling[T | None] = _Polling(what, None, timeout)
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except retrying as error:
            polling.error = error
        else:
            if polling.reached(value):
                assert value is not None
                return value
        if polling.time_is_up():
            raise polling.timed_out() from polling.error
        await asyncio.sleep(interval)


async def run_until(what: str, probe: Callable[[], object], *, turns: int = 1000) -> None:
    """Give the event loop turns until `probe` holds: for tests whose every coroutine is in
    this process, where waiting on a clock would only slow them down; fail naming `what`."""
    for _ in range(turns):
        if probe():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not so after {turns} turns of the event loop: {what}")
