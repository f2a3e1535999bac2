"""What one heartbeat costs the operator's own code: `python -m bench.event_path`.

`make bench` measures the operator's CPU per heartbeat as a whole process: the socket, TLS,
aiohttp's HTTP parser and asyncio included, on a machine whose speed changes from day to
day. This measures only the path that is ours, in one process and without a network: a
watch event's line decoded by the informer, handed to the reconciler, parsed and decided on
by a worker (no action: the runner is alive), its deadline moved. The Tasks and their runner
pods look like the benchmark's (a Running Task, its lease acknowledged, a progress report);
each event carries a newer resourceVersion and report time, as heartbeats do.

It prints microseconds of CPU per event, the median of `--repeats` passes. Compare two
builds by running both in the same minute (the figure is only meaningful as a ratio).
The writer refuses every call: a steady heartbeat must not need one, and a call fails the run.
A unit test runs a small pass, so that the benchmark cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    EPOCH_ANNOTATION,
    EPOCH_LABEL,
    HOLDER_ANNOTATION,
    ROLE_LABEL,
    RUNNER_ROLE,
    TASK_LABEL,
)
from tasklease.api.times import rfc3339_micro
from tasklease.kube.informer import TASKS, Informer
from tasklease.kube.informer import _decode as decode_event
from tasklease.operator.reconciler import Reconciler

NAMESPACE = "bench"


class RefusingWriter:
    """A writer for a run in which nothing should be written: it notes every call (the
    reconciler would log the refusal and retry, so the run checks the notes)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def congested(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        async def refuse(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            raise RuntimeError(f"the steady event path called the writer: {name}")

        return refuse


def task_body(index: int, *, version: int, report_time: datetime, started: datetime) -> Any:
    """A bench Task as the API server sends it (managedFields included: the informer drops
    them), its runner acknowledged and reporting."""
    name = f"t-{index:06d}"
    holder = f"{name}-1"
    started_at = rfc3339_micro(started)
    return {
        "apiVersion": "tasklease.io/v1alpha1",
        "kind": "Task",
        "metadata": {
            "annotations": {
                ACQUIRE_TIME_ANNOTATION: started_at,
                EPOCH_ANNOTATION: "1",
                HOLDER_ANNOTATION: holder,
            },
            "creationTimestamp": started_at[:19] + "Z",
            "generation": 1,
            "managedFields": _MANAGED_FIELDS,
            "name": name,
            "namespace": NAMESPACE,
            "resourceVersion": str(version),
            "uid": f"00000000-0000-0000-0000-{index:012d}",
        },
        "spec": {
            "ackTimeout": "60s",
            "cancel": False,
            "heartbeatInterval": "5s",
            "priority": 0,
            "reportProgressTimeout": "60s",
            "retry": {
                "backoff": {"factor": 2, "initial": "0s", "jitter": 0.2, "max": "5m"},
                "maxAttempts": 20,
            },
            "template": {
                "spec": {
                    "containers": [
                        {
                            "command": ["sh", "-c", "sleep 3600"],
                            "image": "busybox",
                            "name": "runner",
                        }
                    ]
                }
            },
        },
        "status": {
            "attempt": 1,
            "attempts": [{"attempt": 1, "epoch": 1, "holder": holder, "startTime": started_at}],
            "conditions": [
                {
                    "lastTransitionTime": started_at,
                    "message": f"pod {holder} acknowledged lease epoch 1",
                    "observedGeneration": 1,
                    "reason": "Running",
                    "status": "True",
                    "type": "Leased",
                }
            ],
            "epoch": 1,
            "holder": holder,
            "observedGeneration": 1,
            "phase": "Running",
            "progress": {"epoch": 1, "percent": 74, "reportTime": rfc3339_micro(report_time)},
            "startTime": started_at,
        },
    }


# The four managers of a bench Task (creator, lease, operator status, runner): 55% of its JSON.
_MANAGED_FIELDS: Any = [
    {
        "manager": manager,
        "operation": "Update",
        "apiVersion": "tasklease.io/v1alpha1",
        "time": "2026-12-04T14:11:42Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
        **({"subresource": "status"} if status else {}),
    }
    for manager, status, fields in (
        ("tasklease-bench", False, {"f:spec": {".": {}, "f:ackTimeout": {}, "f:cancel": {}}}),
        ("tasklease-operator", False, {"f:metadata": {"f:annotations": {".": {}}}}),
        ("tasklease-operator", True, {"f:status": {"f:attempt": {}, "f:conditions": {}}}),
        ("tasklease-runner", True, {"f:status": {"f:progress": {".": {}, "f:epoch": {}}}}),
    )
]


def pod_body(index: int) -> dict[str, Any]:
    name = f"t-{index:06d}"
    return {
        "metadata": {
            "name": f"{name}-1",
            "namespace": NAMESPACE,
            "labels": {TASK_LABEL: name, EPOCH_LABEL: "1", ROLE_LABEL: RUNNER_ROLE},
            "ownerReferences": [{"kind": "Task", "name": name, "controller": True}],
        },
        "status": {"phase": "Running"},
    }


async def _drain(reconciler: Reconciler) -> None:
    """Until no key waits or is being reconciled (the queue has no event for that: a
    benchmark looks inside)."""
    queue = reconciler._queue
    while len(queue) or queue._processing:  # noqa: ASYNC110
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def _running_reconciler(tasks: int, *, workers: int, doing: str) -> AsyncIterator[Reconciler]:
    """A started reconciler that knows every Task's runner pod; stopped afterwards, and the
    run fails if it asked for a write (`doing` says what made it)."""
    writer = RefusingWriter()
    reconciler = Reconciler(writer, workers=workers)
    reconciler.start()
    try:
        for index in range(tasks):
            reconciler.pod_seen("ADDED", pod_body(index))
        yield reconciler
    finally:
        await reconciler.stop()
    if writer.calls:
        raise RuntimeError(f"{doing} made the reconciler write: {writer.calls[:5]}")


async def one_pass(tasks: int, rounds: int, *, workers: int) -> float:
    """CPU microseconds per event over `rounds` heartbeats of each of `tasks` Tasks."""

    async with _running_reconciler(
        tasks, workers=workers, doing="a steady heartbeat"
    ) as reconciler:
        # Never started: the benchmark feeds it the events itself.
        informer = Informer(None, reconciler.task_seen, watched=TASKS, namespace=NAMESPACE)
        started = datetime.now(UTC) - timedelta(seconds=10)
        version = 1000
        # Lines made before the clock starts: the API server's work, not ours.
        batches: list[list[bytes]] = []
        for round_index in range(rounds + 1):
            lines = []
            for index in range(tasks):
                version += 1
                report = datetime.now(UTC) + timedelta(milliseconds=round_index)
                body = task_body(index, version=version, report_time=report, started=started)
                event = {"type": "ADDED" if round_index == 0 else "MODIFIED", "object": body}
                lines.append(json.dumps(event, separators=(",", ":")).encode() + b"\n")
            batches.append(lines)
        # Round 0 makes the entries (first sightings); it is not measured.
        for line in batches[0]:
            informer._apply(decode_event(line))
        await _drain(reconciler)
        begin = time.process_time()
        for lines in batches[1:]:
            for line in lines:
                informer._apply(decode_event(line))
                # One event per turn of the loop, as a busy watch delivers them.
                await asyncio.sleep(0)
        await _drain(reconciler)
        spent = time.process_time() - begin
    return spent / (tasks * rounds) * 1e6


async def listing_pass(tasks: int, *, workers: int) -> float:
    """CPU seconds from a restart's first page to every Task parsed and decided on: one
    page of `tasks` bodies decoded and handed on as the informer's listing does (a turn of
    the loop every 50 items), with every runner pod already known."""
    async with _running_reconciler(
        tasks, workers=workers, doing="a listing of live leases"
    ) as reconciler:
        started = datetime.now(UTC) - timedelta(seconds=10)
        now = datetime.now(UTC)
        bodies = [
            task_body(index, version=1000 + index, report_time=now, started=started)
            for index in range(tasks)
        ]
        page = json.dumps({"items": bodies}).encode()
        begin = time.process_time()
        for index, item in enumerate(decode_event(page)["items"]):
            item["metadata"].pop("managedFields", None)
            reconciler.task_seen("ADDED", item)
            if index % 50 == 49:
                await asyncio.sleep(0)
        await _drain(reconciler)
        spent = time.process_time() - begin
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.event_path", description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10, help="heartbeats per Task per pass")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the median is printed")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--listing",
        action="store_true",
        help="instead: CPU seconds to take in a restart's listing of --tasks Tasks",
    )
    args = parser.parse_args()
    if args.listing:
        seconds = [
            asyncio.run(listing_pass(args.tasks, workers=args.workers)) for _ in range(args.repeats)
        ]
        print(
            json.dumps(
                {
                    "listing_cpu_s": round(statistics.median(seconds), 3),
                    "passes_s": [round(s, 3) for s in seconds],
                }
            )
        )
        return
    figures = [
        asyncio.run(one_pass(args.tasks, args.rounds, workers=args.workers))
        for _ in range(args.repeats)
    ]
    print(
        json.dumps(
            {
                "event_path_us_per_event": round(statistics.median(figures), 1),
                "passes_us": [round(f, 1) for f in figures],
            }
        )
    )


if __name__ == "__main__":
    main()
