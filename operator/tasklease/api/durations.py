"""Go-style duration strings ("90s", "1h30m", "500ms") as `timedelta`.

The CRD stores durations as strings in the format Kubernetes users already write for
`metav1.Duration` fields, because CEL's `duration()` parses exactly that format: the API
server can then compare `ackTimeout` with `reportProgressTimeout` itself. The models parse
them into `timedelta` so no code ever handles a bare number of unknown unit.

What the pattern accepts is a strict subset of what Go's `time.ParseDuration` (and so CEL)
accepts, so a string the schema lets through never makes a CEL rule fail to evaluate.

A Task's durations are whole milliseconds. Go counts nanoseconds and `timedelta`
microseconds, so a finer duration would not be what the operator measures and reports
("1ns" came back as "1us" in its Events); no lease timing means anything below a
millisecond. The API server refuses such a duration (`WHOLE_MILLISECONDS_RULE`) and so do
the models, so that the two never disagree about a Task.
"""

from __future__ import annotations

import functools
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

# One or more <number><unit> groups, the grammar of Go's time.ParseDuration (no sign: the
# API has no use for negative durations, and the schema refuses them early). Go spells the
# micro sign both ways (U+00B5 and U+03BC).
GO_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h))+$"
# Bounds the work of the pattern and of CEL's duration() on a hostile string.
MAX_DURATION_LENGTH = 64
_MAX_NANOSECONDS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds
# The longest duration Go, and so CEL, can represent (about 106751 days), in timedelta's
# microsecond resolution.
MAX_DURATION = timedelta(microseconds=_MAX_NANOSECONDS // 1000)

_PART = re.compile(r"([0-9]+)(?:\.([0-9]+))?(ns|us|µs|μs|ms|s|m|h)")
_NANOSECONDS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_NANOSECONDS_PER_MILLISECOND = 1_000_000
_MICROSECONDS_PER_HOUR = 3_600_000_000
_MICROSECONDS_PER_MINUTE = 60_000_000
_MICROSECONDS_PER_SECOND = 1_000_000


def parse_go_duration(value: Any) -> timedelta:
    """Parse "1h30m" into a timedelta; pass timedeltas through; refuse anything else.

    The arithmetic is Go's: integer nanoseconds, each part's fraction truncated to the
    nanosecond. `timedelta` resolves microseconds, so finer values are rounded up: a
    positive duration never becomes zero.
    """
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError(f"{value} is negative; a duration must not be")
        if value > MAX_DURATION:
            raise ValueError(f"{value} is longer than the longest duration, {MAX_DURATION}")
        return value
    if not isinstance(value, str) or len(value) > MAX_DURATION_LENGTH:
        raise ValueError(f"{value!r} is not a duration such as '90s', '15m' or '1h30m'")
    return _parse_duration_text(value)


def parse_whole_milliseconds(value: Any) -> timedelta:
    """`parse_go_duration`, refusing a duration that is not a whole number of milliseconds.

    Judged on the exact value: "999999ns" is refused, although it rounds up to 1ms.
    """
    if isinstance(value, str) and len(value) <= MAX_DURATION_LENGTH:
        nanoseconds = _duration_text_nanoseconds(value)
        exact = nanoseconds % _NANOSECONDS_PER_MILLISECOND == 0
    else:
        parsed = parse_go_duration(value)
        exact = parsed % timedelta(milliseconds=1) == timedelta(0)
    if not exact:
        raise ValueError(
            f"{value!r} is not a whole number of milliseconds, such as '250ms', '1.5s' or '2m'"
        )
    return parse_go_duration(value)


# Every Task the operator parses carries four or five durations, nearly always the same few
# strings: a regular expression per field per watch event cost an eighth of the operator's
# CPU per heartbeat. Failures are not cached (lru_cache never caches an exception).
@functools.lru_cache(maxsize=1024)
def _duration_text_nanoseconds(value: str) -> int:
    if not re.fullmatch(GO_DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration such as '90s', '15m' or '1h30m'")
    nanoseconds = 0
    for whole, fraction, unit in _PART.findall(value):
        scale = _NANOSECONDS_PER_UNIT[unit]
        nanoseconds += int(whole) * scale
        if fraction:
            nanoseconds += int(fraction) * scale // 10 ** len(fraction)
    if nanoseconds > _MAX_NANOSECONDS:
        raise ValueError(f"{value!r} is longer than the longest duration, about 2562047h")
    return nanoseconds


@functools.lru_cache(maxsize=1024)
def _parse_duration_text(value: str) -> timedelta:
    nanoseconds = _duration_text_nanoseconds(value)
    return timedelta(microseconds=-(-nanoseconds // 1000))  # rounded up


def format_go_duration(value: timedelta) -> str:
    """Render the shortest exact Go duration string ("2m"; "1h0m30s" becomes "1h30s").

    Below one second the unit is the one Go picks ("500ms", "1.5ms", "250us"); from one
    second on, hours, minutes and (fractional) seconds ("1h2m3.5s"). Exact to the
    microsecond, so `parse_go_duration(format_go_duration(d)) == d`.
    """
    microseconds = value // timedelta(microseconds=1)
    if microseconds < 0:
        return "-" + format_go_duration(-value)
    if microseconds == 0:
        return "0s"
    if microseconds < _MICROSECONDS_PER_SECOND:
        milliseconds, rest = divmod(microseconds, 1000)
        if not milliseconds:
            return f"{rest}us"
        return _with_fraction(milliseconds, rest, digits=3) + "ms"
    hours, rest = divmod(microseconds, _MICROSECONDS_PER_HOUR)
    minutes, rest = divmod(rest, _MICROSECONDS_PER_MINUTE)
    seconds, rest = divmod(rest, _MICROSECONDS_PER_SECOND)
    text = ""
    if hours:
        text += f"{hours}h"
    if minutes:
        text += f"{minutes}m"
    if seconds or rest:
        text += _with_fraction(seconds, rest, digits=6) + "s"
    return text


def _with_fraction(whole: int, fraction: int, *, digits: int) -> str:
    if not fraction:
        return str(whole)
    return f"{whole}.{fraction:0{digits}d}".rstrip("0")


# CEL has no remainder for durations, and a rule that builds a duration from a string it
# made costs too much for the API server's estimate. getMilliseconds() counts whole
# milliseconds (truncating), so a duration of at least 1ms is whole milliseconds exactly
# when taking one nanosecond off lowers that count; below 1ms only zero is. (A negative one
# is left to the pattern, which refuses it: this message would not be the reason.)
WHOLE_MILLISECONDS_RULE: dict[str, str] = {
    "rule": (
        "duration(self) < duration('1ms') ? duration(self) <= duration('0s') : "
        "(duration(self) - duration('1ns')).getMilliseconds() "
        "< duration(self).getMilliseconds()"
    ),
    "message": "must be a whole number of milliseconds, such as '250ms', '1.5s' or '2m'",
}

# A Task's durations. A field that sets its own x-kubernetes-validations must list
# WHOLE_MILLISECONDS_RULE among them (they replace the type's; tests/unit/test_crd.py
# checks every duration of the CRD for it).
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_whole_milliseconds),
    PlainSerializer(format_go_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": GO_DURATION_PATTERN,
            "maxLength": MAX_DURATION_LENGTH,
            "x-kubernetes-validations": [WHOLE_MILLISECONDS_RULE],
        }
    ),
]
