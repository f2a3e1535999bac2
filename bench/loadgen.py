"""A light load generator: many tasklease runners played from one asyncio process.

Each runner does exactly what the runner SDK (`tasklease.runner.sdk`) does on the wire: a
JSON Patch on `tasks/status` that first `test`s the lease annotations (epoch and holder) and
then `add`s `/status/progress` with the epoch, a percentage and a new `reportTime` (RFC 3339,
microseconds). The first report of an epoch is the acknowledgement; the following ones are
heartbeats. A refused `test` (422) means the lease was lost, as for the SDK.

To keep its own CPU low the generator talks HTTP/1.1 to the API server with aiohttp and the
admin client certificate, builds request bodies from a pre-encoded prefix, and never parses
responses (only the status code matters). It watches the runner pods (label
`tasklease.io/task`) to learn hand-outs the way a kubelet would, and records when each pod
was first seen: that is the clock for hand-out rates and detection times.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp

from tasklease.api.models import EPOCH_ANNOTATION, EPOCH_LABEL, GROUP, PLURAL, TASK_LABEL, VERSION

# Re-exported (`as`): tests/unit/test_bench_report.py imports it from here.
from tasklease.api.times import rfc3339_micro

logger = logging.getLogger("bench.loadgen")

JSON_PATCH: Final = "application/json-patch+json"
RUNNER_FIELD_MANAGER: Final = "tasklease-runner"  # as the SDK
HOLDER_ANNOTATION_POINTER: Final = "tasklease.io~1holder"
EPOCH_ANNOTATION_POINTER: Final = EPOCH_ANNOTATION.replace("~", "~0").replace("/", "~1")
# Statuses that mean "this runner no longer holds the lease" (as in the SDK).
LOST_STATUSES: Final = frozenset({403, 404, 409, 422})
RETRY_AFTER_ERROR_S: Final = 1.0
# During a bulk hand-out a runner acknowledges when every pod is out, or at the latest this
# share of the ack timeout after its pod appeared (so that no lease is lost to AckTimeout).
ACK_HOLD_FRACTION: Final = 0.8


def heartbeat_prefix(epoch: int, holder: str) -> bytes:
    """The JSON Patch of a report up to the percentage, pre-encoded once per epoch."""
    fence = [
        {
            "op": "test",
            "path": f"/metadata/annotations/{EPOCH_ANNOTATION_POINTER}",
            "value": str(epoch),
        },
        {
            "op": "test",
            "path": f"/metadata/annotations/{HOLDER_ANNOTATION_POINTER}",
            "value": holder,
        },
    ]
    head = json.dumps(fence, separators=(",", ":"))[:-1]  # drop the closing ']'
    return (
        head
        + ',{"op":"add","path":"/status/progress","value":{"epoch":'
        + str(epoch)
        + ',"percent":'
    ).encode()


def heartbeat_body(prefix: bytes, percent: int, stamp: str) -> bytes:
    """A complete report: the prefix, a percentage and a reportTime."""
    return prefix + b'%d,"reportTime":"%s"}}]' % (percent, stamp.encode())


def task_manifest(
    name: str,
    *,
    heartbeat_s: float,
    timeout_s: float,
    ack_timeout_s: float,
    max_attempts: int = 20,
) -> dict[str, Any]:
    """A Task whose runner pod is a trivial container (nothing runs it: no kubelet)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Task",
        "metadata": {"name": name},
        "spec": {
            "template": {"spec": {"containers": [_CONTAINER]}},
            "ackTimeout": _go_duration(ack_timeout_s),
            "reportProgressTimeout": _go_duration(timeout_s),
            "heartbeatInterval": _go_duration(heartbeat_s),
            "retry": {"maxAttempts": max_attempts, "backoff": {"initial": "0s"}},
        },
    }


def job_manifest(name: str) -> dict[str, Any]:
    """A batch/v1 Job with one pod of the same trivial container."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [_CONTAINER]}},
        },
    }


_CONTAINER: Final = {"name": "runner", "image": "busybox", "command": ["sh", "-c", "sleep 3600"]}


def _go_duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class Api:
    """The API server as the admin (client certificate in system:masters), over HTTP/1.1.

    One connection pool for requests (as many connections as requests in flight) and one
    for long-running watches, so a watch never waits for a request slot.
    """

    def __init__(
        self,
        server: str,
        *,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        token: str | None = None,
        connections: int,
    ) -> None:
        """With `token`, a bearer token (a runner pod's bound token) instead of the client
        certificate (the API server would authenticate the certificate first)."""
        context = ssl.create_default_context(cafile=str(ca))
        if token is None:
            assert cert is not None and key is not None, "a client certificate or a token"
            context.load_cert_chain(str(cert), str(key))
        self._token = token
        self.server = server.rstrip("/")
        self._context = context
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=self._context, limit=self._connections, limit_per_host=self._connections
            ),
            timeout=aiohttp.ClientTimeout(total=120),
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "tasklease-bench"}
            | ({"Authorization": f"Bearer {self._token}"} if self._token else {}),
        )
        self._watch_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._context, limit=32),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
            read_bufsize=1 << 20,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Api as an async context manager"
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type} if body is not None else None
        async with self.session.request(
            method, self.server + path, data=body, headers=headers
        ) as response:
            return response.status, await response.read()

    async def status_only(self, method: str, path: str, body: bytes, content_type: str) -> int:
        """A request whose answer is only its status code (the body is drained, not parsed)."""
        async with self.session.request(
            method, self.server + path, data=body, headers={"Content-Type": content_type}
        ) as response:
            await response.read()
            return response.status

    async def get_json(self, path: str) -> dict[str, Any]:
        status, data = await self.call("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {data[:300]!r}")
        result: dict[str, Any] = json.loads(data)
        return result

    async def watch(
        self,
        path: str,
        *,
        label_selector: str,
        on_event: Callable[[str, dict[str, Any], float], None],
        listed: asyncio.Event | None = None,
    ) -> None:
        """List, then watch `path` forever, calling `on_event(type, object, monotonic_seen)`.

        Listed objects arrive as type "LISTED" (their time is the listing's, not their
        creation's). Watches that end are resumed from the last resourceVersion; an expired
        one (410) is listed again.
        """
        assert self._watch_session is not None
        resource_version = await self._list(path, label_selector, on_event)
        if listed is not None:
            listed.set()
        while True:
            params = {
                "watch": "true",
                "allowWatchBookmarks": "true",
                "labelSelector": label_selector,
                "resourceVersion": resource_version,
                "timeoutSeconds": "3600",
            }
            try:
                async with self._watch_session.get(self.server + path, params=params) as response:
                    if response.status != 200:
                        body = await response.read()
                        raise RuntimeError(f"watch {path}: HTTP {response.status}: {body[:300]!r}")
                    async for line in response.content:
                        seen = time.monotonic()
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                logger.warning("watch %s expired; listing again", path)
                                resource_version = await self._list(path, label_selector, on_event)
                                break
                            raise RuntimeError(f"watch {path}: {obj}")
                        resource_version = obj["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK":
                            on_event(kind, obj, seen)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
                logger.warning("watch %s interrupted (%s); resuming", path, error)
                await asyncio.sleep(0.2)

    async def start_watch(
        self,
        path: str,
        *,
        label_selector: str,
        on_event: Callable[[str, dict[str, Any], float], None],
    ) -> asyncio.Task[None]:
        """`watch` in a task of its own, returned once the listing went to `on_event`; the
        caller cancels it."""
        listed = asyncio.Event()
        task = asyncio.create_task(
            self.watch(path, label_selector=label_selector, on_event=on_event, listed=listed)
        )
        await listed.wait()
        return task

    async def _list(
        self,
        path: str,
        label_selector: str,
        on_event: Callable[[str, dict[str, Any], float], None],
    ) -> str:
        token = ""
        while True:
            query = f"?labelSelector={label_selector}&limit=500"
            if token:
                query += f"&continue={token}"
            page = await self.get_json(path + query)
            seen = time.monotonic()
            for item in page.get("items") or []:
                on_event("LISTED", item, seen)
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                resource_version: str = page["metadata"]["resourceVersion"]
                return resource_version


@dataclass(frozen=True, slots=True)
class BulkResult:
    started: float
    finished: float
    created: int
    failed: int


async def create_all(
    api: Api, path: str, bodies: Iterable[bytes], *, concurrency: int
) -> BulkResult:
    """POST every body with `concurrency` requests in flight (retrying throttling and server
    errors); returns when the last one was answered."""
    items: Iterator[bytes] = iter(bodies)
    created = failed = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal created, failed
        for body in items:
            for attempt in range(10):
                status, data = await api.call("POST", path, body)
                if status in (200, 201):
                    created += 1
                    break
                if status == 409:  # already exists: an earlier try made it
                    created += 1
                    break
                if status == 429 or status >= 500:
                    await asyncio.sleep(0.1 * (attempt + 1))
                    continue
                failed += 1
                logger.error("POST %s: HTTP %s: %s", path, status, data[:300])
                break
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return BulkResult(started=started, finished=time.monotonic(), created=created, failed=failed)


@dataclass(slots=True)
class Runner:
    """One task's runner as the generator plays it."""

    index: int
    task: str
    status_path: str
    counted: bool = True  # one of the N bench tasks (not the warm-up)
    epoch: int = 0
    pod: str = ""
    prefix: bytes = b""
    acked: bool = False
    victim: bool = False  # chosen for the detection phase
    stopped: bool = False  # its heartbeats are stopped (until a new pod replaces it)
    lost: bool = False  # a fenced write of the current epoch was refused
    in_flight: bool = False
    last_ack: float | None = None  # monotonic: the API server acknowledged its last report
    first_pod_seen: float | None = None
    reports: int = 0
    generation: int = 0  # invalidates stale heap entries


@dataclass(frozen=True, slots=True)
class Reassignment:
    task: str
    old_epoch: int
    new_epoch: int
    seen: float
    phase: str
    victim: bool
    deadline: float | None  # last acknowledged report + reportProgressTimeout
    last_ack_age: float | None  # seconds since the API server stored its last report


@dataclass
class Counters:
    reports_acked: int = 0
    acks: int = 0  # first reports of an epoch
    refused: int = 0
    errors: int = 0
    acks_during_handout: int = 0
    lag_s: list[float] = field(default_factory=list)  # ack time minus due time (heartbeats)


class Generator:
    """Runners for Tasks in one namespace; heartbeats on a schedule, or as fast as possible.

    Heartbeats are phased uniformly over the interval. `push()` suspends the schedule and
    sends fenced reports round-robin over all live runners with a fixed number in flight.
    """

    def __init__(
        self,
        api: Api,
        namespace: str,
        *,
        heartbeat_s: float,
        timeout_s: float,
        ack_timeout_s: float,
        concurrency: int,
        seed: int = 1,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.concurrency = concurrency
        self.random = random.Random(seed)
        self.runners: list[Runner] = []
        self.by_task: dict[str, Runner] = {}
        self.counters = Counters()
        self.phase = "setup"
        self.reassignments: list[Reassignment] = []
        self.pods_seen: dict[tuple[str, int], float] = {}
        self.listed_pods = 0
        # Hand-out: acks are held until every pod is out (or ACK_HOLD_FRACTION of the ack
        # timeout passed for a pod).
        self.hold_acks = False
        self.handout_target = 0
        self.handed_out = 0
        self.handout_done = asyncio.Event()
        self.handout_last_seen: float | None = None
        self._heap: list[tuple[float, int, int, int]] = []
        self._sequence = itertools.count()
        self._ready: asyncio.Queue[tuple[Runner, float]] = asyncio.Queue()
        self._paused = False
        self._tasks: list[asyncio.Task[None]] = []
        self._replacements: dict[str, asyncio.Event] = {}
        self.recording_lag = False

    # --- runners ----------------------------------------------------------------------

    def add_runner(self, task: str, *, counted: bool = True) -> Runner:
        runner = Runner(
            index=len(self.runners),
            task=task,
            status_path=(
                f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{task}/status"
                f"?fieldManager={RUNNER_FIELD_MANAGER}"
            ),
            counted=counted,
        )
        self.runners.append(runner)
        self.by_task[task] = runner
        return runner

    def forget(self, task: str) -> None:
        runner = self.by_task.pop(task, None)
        if runner is not None:
            runner.stopped = True
            runner.generation += 1

    @property
    def counted(self) -> list[Runner]:
        return [r for r in self.runners if r.counted and r.task in self.by_task]

    # --- the pod watch ----------------------------------------------------------------

    def on_pod(self, kind: str, pod: dict[str, Any], seen: float) -> None:
        if kind not in ("ADDED", "LISTED"):
            return
        metadata = pod["metadata"]
        labels = metadata.get("labels") or {}
        epoch_text = labels.get(EPOCH_LABEL, "")
        task = labels.get(TASK_LABEL)
        if task is None or not epoch_text.isdigit():
            return
        epoch = int(epoch_text)
        key = (task, epoch)
        if key in self.pods_seen:
            return
        self.pods_seen[key] = seen
        if kind == "LISTED":
            self.listed_pods += 1
        runner = self.by_task.get(task)
        if runner is None or epoch <= runner.epoch:
            return
        if runner.epoch == 0:
            runner.first_pod_seen = seen
            if runner.counted:
                self.handed_out += 1
                if self.handed_out == self.handout_target:
                    self.handout_last_seen = seen
                    self.handout_done.set()
        else:
            deadline = (
                runner.last_ack + self.timeout_s
                if runner.stopped and runner.last_ack is not None
                else None
            )
            self.reassignments.append(
                Reassignment(
                    task=task,
                    old_epoch=runner.epoch,
                    new_epoch=epoch,
                    seen=seen,
                    phase=self.phase,
                    victim=runner.stopped,
                    deadline=deadline,
                    last_ack_age=None if runner.last_ack is None else seen - runner.last_ack,
                )
            )
            replaced = self._replacements.pop(task, None)
            if replaced is not None:
                replaced.set()
        self._adopt(runner, epoch, metadata["name"], seen)

    def _adopt(self, runner: Runner, epoch: int, pod: str, seen: float) -> None:
        """Play the runner of the new pod: acknowledge (now, or held during a hand-out)."""
        runner.epoch = epoch
        runner.pod = pod
        runner.prefix = heartbeat_prefix(epoch, pod)
        runner.acked = False
        runner.stopped = False
        runner.lost = False
        due = seen
        if self.hold_acks and epoch == 1:
            due = seen + self.ack_timeout_s * ACK_HOLD_FRACTION
        self._schedule(runner, due)

    def release_acks(self) -> None:
        """The hand-out is over: every held acknowledgement goes now."""
        self.hold_acks = False
        now = time.monotonic()
        for runner in self.runners:
            if runner.epoch > 0 and not runner.acked and not runner.stopped:
                self._schedule(runner, now)

    # --- scheduling ---------------------------------------------------------------------

    def _schedule(self, runner: Runner, due: float) -> None:
        runner.generation += 1
        heapq.heappush(self._heap, (due, next(self._sequence), runner.index, runner.generation))

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._dispatch(), name="dispatch"))
        for index in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._send_loop(), name=f"send-{index}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _eligible(self, runner: Runner) -> bool:
        return (
            runner.epoch > 0
            and not runner.stopped
            and not runner.lost
            and not runner.in_flight
            and runner.task in self.by_task
        )

    async def _dispatch(self) -> None:
        heap = self._heap
        while True:
            now = time.monotonic()
            if not self._paused:
                while heap and heap[0][0] <= now:
                    due, _, index, generation = heapq.heappop(heap)
                    runner = self.runners[index]
                    if generation != runner.generation or not self._eligible(runner):
                        continue
                    runner.in_flight = True
                    self._ready.put_nowait((runner, due))
            delay = heap[0][0] - now if heap and not self._paused else 0.05
            await asyncio.sleep(min(max(delay, 0.002), 0.05))

    async def _send_loop(self) -> None:
        while True:
            runner, due = await self._ready.get()
            try:
                await self._report(runner, due=due, reschedule=True)
            finally:
                runner.in_flight = False

    async def _report(self, runner: Runner, *, due: float | None, reschedule: bool) -> bool:
        """Send one fenced report; True when the API server stored it."""
        epoch = runner.epoch
        first = not runner.acked
        runner.reports += 1
        stamp = rfc3339_micro(datetime.now(UTC))
        body = heartbeat_body(runner.prefix, runner.reports % 101, stamp)
        try:
            status = await self.api.status_only("PATCH", runner.status_path, body, JSON_PATCH)
        except (aiohttp.ClientError, TimeoutError) as error:
            logger.debug("report of %s not delivered: %s", runner.task, error)
            status = 0
        answered = time.monotonic()
        if runner.epoch != epoch:
            return False  # a new pod took over meanwhile; this report is history
        counters = self.counters
        if status == 200:
            runner.last_ack = answered
            counters.reports_acked += 1
            if first:
                runner.acked = True
                counters.acks += 1
                if self.hold_acks:
                    counters.acks_during_handout += 1
            elif self.recording_lag and due is not None:
                counters.lag_s.append(answered - due)
            if reschedule and not runner.stopped:
                if first:
                    next_due = answered + self.random.uniform(0.0, self.heartbeat_s)
                else:
                    next_due = max((due or answered) + self.heartbeat_s, answered)
                self._schedule(runner, next_due)
            return True
        if status in LOST_STATUSES:
            runner.lost = True
            counters.refused += 1
            return False
        counters.errors += 1
        if reschedule and not runner.stopped:
            self._schedule(runner, answered + RETRY_AFTER_ERROR_S)
        return False

    # --- modes ----------------------------------------------------------------------------

    async def push(self, seconds: float, *, concurrency: int) -> int:
        """Fenced reports round-robin over all live runners, `concurrency` in flight, for
        `seconds`; the schedule is suspended meanwhile and re-phased afterwards. Returns
        the number of reports the API server stored."""
        self._paused = True
        live = self.push_order()
        stored = 0
        ring = itertools.cycle(live)
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal stored
            misses = 0
            while time.monotonic() < end:
                runner = next(ring)
                if not self._eligible(runner):
                    misses += 1
                    if misses > len(live):
                        await asyncio.sleep(0.001)
                        misses = 0
                    continue
                runner.in_flight = True
                try:
                    if await self._report(runner, due=None, reschedule=False):
                        stored += 1
                finally:
                    runner.in_flight = False

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.rephase()
        self._paused = False
        return stored

    def push_order(self) -> list[Runner]:
        """The live runners, the one whose last report is oldest first: a push that reaches
        only some of them (the API server stores a few hundred a second) reaches those
        that need a report most. Always starting from the first runner left the others
        without a report through every push, and a burst of them overdue after each."""
        live = [r for r in self.counted if r.acked and not r.stopped]
        live.sort(key=lambda r: -1.0 if r.last_ack is None else r.last_ack)
        return live

    def rephase(self) -> None:
        """Spread every live runner's next heartbeat at random over one interval from now,
        or over less: never later than one interval after its last stored report (a push
        reaches only some runners; the others must not skip a beat).

        A runner's shorter span is drawn from, not clipped to: clipping would send every
        runner whose draw passed its limit at exactly its limit, i.e. in the order and at the
        pace of the push's round robin. And a runner already overdue (its limit passed during
        the push) is spread over the first half of what is left of its lease instead of sent
        now: sent all at once, they make a burst that stalls the API server (a runner whose
        report is stored late is seen late by the operator too), and since each heartbeat is
        due one interval after the last, the burst comes back every interval
        (docs/results/2026-12-06-load-generator-burst.md)."""
        now = time.monotonic()
        for runner in self.runners:
            if runner.epoch > 0 and not runner.stopped and not runner.lost:
                if runner.acked:
                    latest = now + self.heartbeat_s
                    if runner.last_ack is not None:
                        due_by = runner.last_ack + self.heartbeat_s
                        if due_by <= now:
                            due_by = now + (runner.last_ack + self.timeout_s - now) / 2
                        latest = max(min(latest, due_by), now)
                    self._schedule(runner, self.random.uniform(now, latest))
                else:
                    self._schedule(runner, now)

    def stop_heartbeats(self, runners: Iterable[Runner]) -> dict[str, asyncio.Event]:
        """Stop these runners (as if hung); returns an event per task, set when a new pod
        for it is seen."""
        events = {}
        for runner in runners:
            runner.victim = True
            runner.stopped = True
            runner.generation += 1
            events[runner.task] = self._replacements.setdefault(runner.task, asyncio.Event())
        return events

    # --- figures ----------------------------------------------------------------------

    def false_reassignments(self, phases: Iterable[str] | None = None) -> list[Reassignment]:
        wanted = set(phases) if phases is not None else None
        return [
            r
            for r in self.reassignments
            if not r.victim
            and self.by_task.get(r.task) is not None
            and self.by_task[r.task].counted
            and (wanted is None or r.phase in wanted)
        ]

    def detection_delays(self) -> list[float]:
        return [r.seen - r.deadline for r in self.reassignments if r.victim and r.deadline]


async def wait_for(
    what: str,
    probe: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    within: float,
    interval: float = 0.2,
    check: Callable[[], None] | None = None,
) -> float:
    """Poll until `probe` is true; returns the monotonic time it became so."""
    deadline = time.monotonic() + within
    while True:
        if check is not None:
            check()
        outcome = probe()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


PROBE_ANNOTATION: Final = "bench.tasklease.io/probe"
PROBE_LABEL: Final = "bench.tasklease.io/probe"


class WatchLagProbe:
    """How late the API server's watch delivers a change of a Task: a probe Task in a
    namespace of its own (the operator does not watch it) gets an annotation patched every
    `interval`; the lag is from the PATCH's answer to the watch event carrying the value.
    Tasks share one watch cache in the API server, so this is the delay every Task watcher
    (the operator's included) sees for heartbeats."""

    def __init__(self, api: Api, namespace: str, *, interval: float = 1.0) -> None:
        self.api = api
        self.namespace = namespace
        self.interval = interval
        self.samples: list[tuple[str, float]] = []
        self._acked: dict[str, tuple[float, str]] = {}
        self._seen: dict[str, float] = {}
        self._path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"

    async def create(self) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Task",
            "metadata": {"name": "probe", "labels": {PROBE_LABEL: "1"}},
            "spec": {"workerGroup": "probe"},
        }
        status, data = await self.api.call("POST", self._path, json.dumps(body).encode())
        if status not in (200, 201, 409):
            raise RuntimeError(f"probe Task: HTTP {status}: {data[:300]!r}")

    def _on_event(self, kind: str, obj: dict[str, Any], seen: float) -> None:
        value = (obj["metadata"].get("annotations") or {}).get(PROBE_ANNOTATION)
        if value is None:
            return
        acked = self._acked.pop(value, None)
        if acked is None:
            self._seen[value] = seen  # the event beat the PATCH's answer
            return
        at, phase = acked
        self.samples.append((phase, max(seen - at, 0.0)))

    async def run(self, phase: Callable[[], str]) -> None:
        listed = asyncio.Event()
        watch = asyncio.create_task(
            self.api.watch(
                self._path,
                label_selector=f"{PROBE_LABEL}=1",
                on_event=self._on_event,
                listed=listed,
            )
        )
        await listed.wait()
        try:
            for sequence in itertools.count(1):
                value = str(sequence)
                body = json.dumps({"metadata": {"annotations": {PROBE_ANNOTATION: value}}})
                try:
                    status, _ = await self.api.call(
                        "PATCH",
                        f"{self._path}/probe",
                        body.encode(),
                        content_type="application/merge-patch+json",
                    )
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                answered = time.monotonic()
                if status == 200:
                    seen = self._seen.pop(value, None)
                    if seen is not None:
                        self.samples.append((phase(), 0.0))
                    else:
                        self._acked[value] = (answered, phase())
                await asyncio.sleep(self.interval)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    def by_phase(self) -> dict[str, list[float]]:
        result: dict[str, list[float]] = {}
        for phase, lag in self.samples:
            result.setdefault(phase, []).append(lag)
        return result
