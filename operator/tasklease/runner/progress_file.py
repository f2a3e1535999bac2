"""The progress file of `tasklease run`: how a wrapped program reports its progress.

The program rewrites the whole file (path in `TASKLEASE_PROGRESS_FILE`) whenever it has
something to say; the wrapper notices the change within about a second and reports it at
once. The format, one item per line (UTF-8)::

    3/10                       <- line 1: progress, `N/M`, `P%` or a bare `P` (0..100)
    loading partition 7        <- line 2 (optional): free-text message, may be left blank
    rows=30000                 <- further lines: `key=value` progress fields
    checkpoint={"row": 30000}  <- `checkpoint=<JSON>`: handed to the next attempt

- Progress: `N/M` is N of M done (`3/10` is 30 %; 0 <= N <= M, M > 0), `P%` and `P` are a
  percentage from 0 to 100. Decimals are allowed (`2.5/10`, `42.5%`).
- Message: the whole second line, surrounding blanks stripped; a blank line means none.
  It is always the message, even when it contains `=`.
- Fields: every further non-blank line is `key=value` (split at the first `=`; the key is
  stripped and may not be empty, the value keeps inner blanks). A later key wins.
- `checkpoint=` is not a field: its value is parsed as JSON and becomes the progress
  checkpoint, which the next attempt receives in `TASKLEASE_CHECKPOINT`. A checkpoint
  stays as last set until a file sets another one.

Malformed content never stops the work: when line 1 is not a progress value the whole file
is ignored (a half-written file usually looks like that); a bad field or checkpoint line
alone is ignored. Each problem comes back as a warning. Write the file atomically (to a
temporary name, then `mv`) to avoid half-written reads altogether.

Pure functions only: no I/O, no API client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

CHECKPOINT_KEY: Final = "checkpoint"
# The wrapper reads at most this much of the file; a longer file is ignored as malformed.
MAX_FILE_BYTES: Final = 256 * 1024

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_FRACTION = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
_PERCENT = re.compile(rf"^({_NUMBER})\s*%?$")


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    """One reading of the progress file.

    `percent is None` means the file said nothing usable (empty or malformed); such a
    reading is not reported. `has_checkpoint` tells a checkpoint of JSON `null` from none.
    """

    percent: float | None = None
    message: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    checkpoint: Any = None
    has_checkpoint: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.percent is not None

    def same_report(self, other: ProgressUpdate | None) -> bool:
        """True when reporting `self` after `other` would tell the API server nothing new."""
        return other is not None and (
            self.percent,
            self.message,
            self.fields,
            self.has_checkpoint,
            json.dumps(self.checkpoint, sort_keys=True),
        ) == (
            other.percent,
            other.message,
            other.fields,
            other.has_checkpoint,
            json.dumps(other.checkpoint, sort_keys=True),
        )


def parse_percent(text: str) -> float | None:
    """`N/M`, `P%` or `P` as a percentage in [0, 100]; None when it is none of these."""
    text = text.strip()
    fraction = _FRACTION.match(text)
    if fraction:
        done, total = float(fraction.group(1)), float(fraction.group(2))
        if total <= 0 or done > total:
            return None
        return 100.0 * done / total
    percent = _PERCENT.match(text)
    if percent:
        value = float(percent.group(1))
        if value > 100:
            return None
        return value
    return None


def parse_progress(text: str) -> ProgressUpdate:
    """Parse the progress file's content (see the module docstring for the format)."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        return ProgressUpdate()  # empty: the program has not written anything yet
    percent = parse_percent(lines[0])
    if percent is None:
        return ProgressUpdate(
            warnings=(
                f"progress file ignored: line 1 is {_show(lines[0])}, "
                "expected N/M, P% or P (0-100)",
            )
        )
    message = lines[1] if len(lines) > 1 and lines[1] else None
    fields: dict[str, str] = {}
    checkpoint: Any = None
    has_checkpoint = False
    warnings: list[str] = []
    for number, line in enumerate(lines[2:], start=3):
        if not line:
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            warnings.append(f"progress file line {number} ignored: {_show(line)} is not key=value")
            continue
        if key == CHECKPOINT_KEY:
            try:
                checkpoint = json.loads(value)
            except ValueError as error:
                warnings.append(
                    f"progress file line {number} ignored: checkpoint is not JSON ({error})"
                )
                continue
            has_checkpoint = True
            continue
        fields[key] = value.strip()
    return ProgressUpdate(
        percent=percent,
        message=message,
        fields=fields,
        checkpoint=checkpoint,
        has_checkpoint=has_checkpoint,
        warnings=tuple(warnings),
    )


def parse_progress_bytes(data: bytes) -> ProgressUpdate:
    """Like `parse_progress`, from the raw file: undecodable bytes are replaced, too much
    content is refused."""
    if len(data) > MAX_FILE_BYTES:
        return ProgressUpdate(
            warnings=(f"progress file ignored: larger than {MAX_FILE_BYTES} bytes",)
        )
    return parse_progress(data.decode("utf-8", errors="replace"))


def _show(line: str) -> str:
    return repr(line if len(line) <= 60 else line[:57] + "...")
