"""The event-path benchmark still runs, and still measures a path without writes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench import event_path

task_body = event_path.task_body


def test_a_small_pass_measures_events_without_a_write() -> None:
    microseconds = asyncio.run(event_path.one_pass(tasks=20, rounds=3, workers=4))

    assert microseconds > 0


def test_a_pass_whose_heartbeats_need_a_write_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every Task canceled: the decision is to take the lease back, a write.
    def canceled(index: int, **kwargs: Any) -> Any:
        body = task_body(index, **kwargs)
        body["spec"]["cancel"] = True
        return body

    monkeypatch.setattr(event_path, "task_body", canceled)

    with pytest.raises(RuntimeError, match="write"):
        asyncio.run(event_path.one_pass(tasks=5, rounds=1, workers=2))


def test_a_small_listing_is_taken_in_without_a_write() -> None:
    seconds = asyncio.run(event_path.listing_pass(tasks=30, workers=4))

    assert seconds > 0
