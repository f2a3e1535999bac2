"""The `tasklease` command the image ships: the operator, and the runner wrapper.

The local development tools are not part of it: they are not in the wheel (nor the image),
and run from the repository as `python -m tasklease.controlplane ...` (a local control
plane) and `python -m tasklease.demo` (`make demo`).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="tasklease",
        description="A heartbeat-lease operator for Kubernetes batch work.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("operator", help="run the operator (settings from TASKLEASE_* variables)")
    sub.add_parser(
        "run",
        help="run a program as a Task's runner: tasklease run [OPTIONS] -- PROGRAM [ARGS...]",
        add_help=False,
    )
    if args and args[0] == "run":
        from tasklease.runner.wrapper import main as run_main

        return run_main(args[1:])
    parsed = parser.parse_args(args)
    if parsed.command == "operator":
        from tasklease.operator.main import run

        run()
        return 0
    parser.error(f"unknown command {parsed.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
