"""The README's code blocks, as the tests that run them read them: the first block of a
language after a marker comment, so that what a user copies is what a test runs."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def readme_block(marker: str, language: str = "sh") -> str:
    """The first ```<language> block after `marker` in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    after = text.split(marker, 1)
    assert len(after) == 2, f"README.md lacks the marker {marker!r}"
    block = re.search(rf"```{language}\n(.*?)```", after[1], re.S)
    assert block is not None, f"no ```{language} block after the README marker {marker!r}"
    return block.group(1)


def readme_lines(marker: str) -> list[str]:
    """The non-empty lines of the first ```sh block after `marker`."""
    return [line for line in readme_block(marker).splitlines() if line.strip()]
