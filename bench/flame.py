"""Summaries of py-spy profiles in collapsed-stack form (`py-spy record --format raw`).

Each line is `frame;frame;...;leaf COUNT`, root first, a frame reading
`function (path/to/file.py)` (`--nolineno`) or `function (path/to/file.py:LINE)`.
`python -m bench.flame PROFILE.txt` prints the hottest frames by self time (where the CPU
was spent) and by inclusive time (what it was spent for), and self time by package.
speedscope.app opens the same files.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.report import format_table

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True, slots=True)
class Profile:
    total: int
    self_counts: Counter[str]
    inclusive_counts: Counter[str]
    package_counts: Counter[str]


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def frame_key(frame: str) -> str:
    """`function (file)` without the line number, with the path shortened to its package."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({short_path(match['file'])})"


def short_path(path: str) -> str:
    """site-packages/kopf/_core/x.py -> kopf/_core/x.py; /usr/lib/python3.11/json/x.py ->
    json/x.py; .../operator/tasklease/x.py -> tasklease/x.py."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if "/operator/tasklease/" in path:
        return "tasklease/" + path.split("/operator/tasklease/", 1)[1]
    match = re.search(r"/python3\.\d+/(.*)$", path)
    if match:
        return match[1]
    return path


def package_of(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = short_path(match["file"])
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if head else path


def summarize(stacks: Iterable[tuple[list[str], int]]) -> Profile:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_counts[frame_key(leaf)] += count
        packages[package_of(leaf)] += count
        for key in {frame_key(frame) for frame in frames}:
            inclusive[key] += count
    return Profile(total, self_counts, inclusive, packages)


def render(profile: Profile, *, top: int = 25) -> str:
    if profile.total == 0:
        return "(no samples)"

    def rows(counter: Counter[str]) -> list[list[str]]:
        return [
            [f"{count / profile.total * 100:5.1f}%", str(count), key]
            for key, count in counter.most_common(top)
        ]

    header = ["share", "samples", "frame"]
    return "\n\n".join(
        [
            f"{profile.total} samples",
            "self time (where the CPU went):\n"
            + format_table(rows(profile.self_counts), header=header),
            "inclusive time (what it went for):\n"
            + format_table(rows(profile.inclusive_counts), header=header),
            "self time by package:\n"
            + format_table(rows(profile.package_counts), header=["share", "samples", "package"]),
        ]
    )


def summarize_file(path: Path, *, top: int = 25) -> str:
    with path.open() as lines:
        return render(summarize(parse_collapsed(lines)), top=top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flame", description=__doc__.split("\n")[0]
    )
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for path in args.profiles:
        print(f"== {path}")
        print(summarize_file(path, top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
