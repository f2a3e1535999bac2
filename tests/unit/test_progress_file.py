"""The progress file format of `tasklease run` (tasklease.runner.progress_file)."""

from __future__ import annotations

import pytest

from tasklease.runner.progress_file import (
    MAX_FILE_BYTES,
    ProgressUpdate,
    parse_percent,
    parse_progress,
    parse_progress_bytes,
)


@pytest.mark.parametrize(
    ("text", "percent"),
    [
        ("3/10", 30.0),
        ("0/10", 0.0),
        ("10/10", 100.0),
        ("1/3", 100.0 / 3),
        (" 7 / 8 ", 87.5),
        ("2.5/10", 25.0),
        ("42%", 42.0),
        ("42.5 %", 42.5),
        ("0%", 0.0),
        ("100%", 100.0),
        ("42", 42.0),
        ("0", 0.0),
        ("100", 100.0),
        ("99.9", 99.9),
        (".5", 0.5),
    ],
)
def test_progress_values(text: str, percent: float) -> None:
    assert parse_percent(text) == pytest.approx(percent)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "11/10",
        "3/0",
        "0/0",
        "-1",
        "-5%",
        "101",
        "100.1%",
        "1e2",
        "3/10/20",
        "3 of 10",
        "%",
        "/10",
        "3/",
        "nan",
        "inf",
        "30%%",
        "0x10",
    ],
)
def test_malformed_progress_values(text: str) -> None:
    assert parse_percent(text) is None


def test_progress_alone() -> None:
    update = parse_progress("3/10\n")
    assert update == ProgressUpdate(percent=30.0)
    assert update.usable and not update.warnings


def test_full_file() -> None:
    update = parse_progress(
        "3/10\n"
        "loading partition 2026-11-28\n"
        "rows=30000\n"
        "table = orders \n"
        'checkpoint={"row": 30000, "files": ["a", "b"]}\n'
    )
    assert update.percent == 30.0
    assert update.message == "loading partition 2026-11-28"
    assert update.fields == {"rows": "30000", "table": "orders"}
    assert update.has_checkpoint
    assert update.checkpoint == {"row": 30000, "files": ["a", "b"]}
    assert update.warnings == ()


def test_leading_blank_lines_and_crlf() -> None:
    update = parse_progress("\n  \r\n50%\r\nhalf way\r\nk=v\r\n")
    assert (update.percent, update.message, update.fields) == (50.0, "half way", {"k": "v"})


def test_blank_second_line_means_no_message() -> None:
    update = parse_progress("1/2\n\nrows=5\n")
    assert update.message is None
    assert update.fields == {"rows": "5"}


def test_second_line_is_always_the_message() -> None:
    # Even when it looks like a field: the format has no guessing.
    update = parse_progress("1/2\nrows=5 of 10\n")
    assert update.message == "rows=5 of 10"
    assert update.fields == {}


def test_field_values_keep_inner_text_and_later_keys_win() -> None:
    update = parse_progress("1/2\n\nurl=http://x/?a=b\nk=first\nk=second\nempty=\n")
    assert update.fields == {"url": "http://x/?a=b", "k": "second", "empty": ""}


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("checkpoint=null", None),
        ("checkpoint=0", 0),
        ('checkpoint="s"', "s"),
        ("checkpoint= [1, 2] ", [1, 2]),
    ],
)
def test_checkpoint_json_values(line: str, value: object) -> None:
    update = parse_progress(f"10%\n\n{line}\n")
    assert update.has_checkpoint
    assert update.checkpoint == value
    assert "checkpoint" not in update.fields


def test_no_checkpoint_line_keeps_none() -> None:
    update = parse_progress("10%\n")
    assert not update.has_checkpoint and update.checkpoint is None


def test_empty_file_is_silently_nothing() -> None:
    for text in ("", "\n\n", "   \n"):
        update = parse_progress(text)
        assert not update.usable
        assert update.warnings == ()


@pytest.mark.parametrize("first", ["working...", "3 of 10", "110%", "rows=5", '{"p": 3}'])
def test_malformed_first_line_ignores_the_whole_file(first: str) -> None:
    update = parse_progress(f"{first}\nmessage\nrows=5\ncheckpoint=1\n")
    assert not update.usable
    assert update.fields == {} and not update.has_checkpoint
    assert len(update.warnings) == 1
    assert "line 1" in update.warnings[0]


def test_malformed_field_lines_are_skipped_with_a_warning() -> None:
    update = parse_progress("5/10\nmsg\njust words\n=value\nok=1\n")
    assert update.usable
    assert update.fields == {"ok": "1"}
    assert len(update.warnings) == 2
    assert "line 3" in update.warnings[0] and "line 4" in update.warnings[1]


def test_malformed_checkpoint_is_skipped_with_a_warning() -> None:
    update = parse_progress("5/10\n\ncheckpoint={not json\nrows=1\n")
    assert update.usable
    assert not update.has_checkpoint
    assert update.fields == {"rows": "1"}
    assert "checkpoint is not JSON" in update.warnings[0]


def test_half_written_file_is_ignored_or_reads_as_less() -> None:
    # A writer caught mid-write: `3/1` of `3/10` is refused rather than reported as 300 %.
    assert not parse_progress("3/1").usable
    assert parse_progress("3/10\nloading part").message == "loading part"


def test_bytes_are_decoded_leniently_and_size_is_bounded() -> None:
    update = parse_progress_bytes(b"50%\ncaf\xe9\n")
    assert update.percent == 50.0 and update.message == "caf\ufffd"
    big = parse_progress_bytes(b"50%\n" + b"x" * MAX_FILE_BYTES)
    assert not big.usable and "larger than" in big.warnings[0]


def test_same_report() -> None:
    a = parse_progress('1/2\nm\nk=v\ncheckpoint={"a": 1, "b": 2}\n')
    b = parse_progress('1/2\nm\nk=v\ncheckpoint={"b": 2, "a": 1}\n')
    c = parse_progress("1/2\nm\nk=v\n")
    assert a.same_report(b)
    assert not a.same_report(c)
    assert not a.same_report(None)
    assert not a.same_report(parse_progress('1/2\nother\nk=v\ncheckpoint={"a": 1, "b": 2}\n'))
