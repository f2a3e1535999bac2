"""`python -m tasklease.executor`: run the local pod executor in the foreground.

    python -m tasklease.controlplane up &        # prints `export KUBECONFIG=...`
    python -m tasklease.executor --kubeconfig "$KUBECONFIG" --state-dir .tasklease/executor

It stops on Ctrl-C, SIGTERM or SIGHUP: every pod's process is stopped (SIGTERM, a short
grace, SIGKILL) and its pod marked Failed. It never daemonises, for the same reason as the
control plane's `up`: a background executor is one nobody remembers to stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from tasklease.executor.executor import DEFAULT_NODE_NAME, ExecutorError, LocalExecutor

DEFAULT_STATE_DIR = Path(".tasklease/executor")


def _say(message: str) -> None:
    print(f"tasklease executor: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tasklease.executor",
        description="Run pods bound to one node as local processes (a stand-in kubelet; "
        "container images are ignored).",
    )
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None,
        help="the executor's own credentials (default: $KUBECONFIG)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"logs and per-pod kubeconfigs (default: {DEFAULT_STATE_DIR})",
    )
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME, help="the Node to register")
    parser.add_argument(
        "--all-pods",
        action="store_true",
        help="bind every unscheduled pod, not only those labelled tasklease.io/task",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.kubeconfig is None:
        parser.error("--kubeconfig is required when KUBECONFIG is not set")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            _say(f"{signal.Signals(signum).name}: stopping")
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)

    executor = LocalExecutor(
        args.kubeconfig, args.state_dir, node_name=args.node_name, all_pods=args.all_pods
    )
    try:
        executor.start()
    except ExecutorError as error:
        _say(str(error))
        return 1
    _say(f"node {executor.node_name} is up; pod logs in {executor.logs_dir}")
    try:
        while not stop.wait(1.0):
            if not executor.running:
                _say("the executor's worker died")
                return 1
    finally:
        executor.stop()
    return 0
