"""resourceVersions compared as Kubernetes allows since 1.35 (KEP-5504), and only then."""

from __future__ import annotations

from typing import Any

import pytest

from tasklease.operator.cache import comparable_version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("123456789012345678901234", 123456789012345678901234),  # no length limit
        ("0", 0),  # a special value, never a live version
        ("012", 0),  # leading zeros: not the format, so not comparable
        ("", 0),
        ("12a", 0),
        ("-3", 0),
        ("\u0661\u0662", 0),  # digits, but not ASCII ones
        (None, 0),
        (17, 0),
    ],
)
def test_only_canonical_positive_integers_compare(text: Any, expected: int) -> None:
    assert comparable_version(text) == expected
