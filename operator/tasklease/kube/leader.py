"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Replaces kopf peering, which pauses only kopf's own watchers: it would pause neither our Task
informer nor the reconciler's deadline queue, so a standby would keep deciding on stale data.
With an election, a standby starts nothing until it leads.

- Acquire: create the Lease, or take over one whose holder let it expire (or released it),
  by an update carrying the resourceVersion we read: compare-and-swap, so of two candidates
  one wins and the other gets 409 Conflict.
- Expiry is judged on our own monotonic clock from the moment we *saw* the record change
  (client-go's observedTime), never by comparing the holder's renewTime with our wall clock:
  the clocks of two nodes need not agree.
- The leader renews every `renew_every_s`, retrying every `retry_s` when a renewal fails.
  When it has not renewed for `renew_deadline_s` (less than the lease duration, so that it
  stops before any standby can see the Lease expire), it stops leading for good: the caller
  stops its work and exits non-zero so Kubernetes restarts it (client-go's
  OnStoppedLeading). It never tries to lead again in the same process: its in-memory state
  may be from before another leader's writes.
- A clean shutdown releases the Lease (holder cleared; `stop()`, stop the work, then
  `release()`) so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client as k8s

from tasklease.api.times import rfc3339_micro
from tasklease.kube.client import FIELD_MANAGER, json_body
from tasklease.kube.errors import ApiError, Conflict, Gone
from tasklease.kube.informer import SightListener, Unwatched

logger = logging.getLogger(__name__)

LEASE_DURATION_S: Final = 15
RENEW_EVERY_S: Final = 5.0
RETRY_S: Final = 2.0
# client-go's default margin: give up 5 s before the lease runs out, so the old leader's
# work has stopped before a standby can observe the expiry and start its own.
RENEW_DEADLINE_S: Final = 10.0
_REQUEST_TIMEOUT_S: Final = 5.0
_RELEASE_TIMEOUT_S: Final = 5.0
_SIGHT_SOURCE: Final = "the leader election's Lease"


def candidate_identity() -> str:
    """The pod's name (HOSTNAME in a pod) and a random suffix: a restarted container of the
    same pod is a new candidate, never mistaken for the holder it replaced."""
    host = os.environ.get("HOSTNAME") or socket.gethostname() or "tasklease"
    return f"{host}_{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The spec of a coordination.k8s.io/v1 Lease, as leader election reads and writes it."""

    holder: str | None
    duration_s: int
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> LeaseRecord:
        spec = spec or {}
        return cls(
            holder=spec.get("holderIdentity") or None,
            duration_s=int(spec.get("leaseDurationSeconds") or LEASE_DURATION_S),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


class Election:
    """Whether we may hold the Lease, and the record to write for it; no I/O (fake time in
    tests)."""

    def __init__(
        self,
        identity: str,
        *,
        lease_duration_s: int = LEASE_DURATION_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self._duration_s = lease_duration_s
        self._clock = clock
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0

    def observe(self, record: LeaseRecord) -> None:
        """Note the record as read; its expiry counts from when it last changed."""
        if record != self._observed:
            self._observed = record
            self._observed_at = self._clock()

    def held_by_another(self, record: LeaseRecord) -> bool:
        """Someone else holds it and, as far as we have seen, keeps renewing it."""
        if record.holder is None or record.holder == self.identity:
            return False
        return self._clock() < self._observed_at + record.duration_s

    def claim(self, record: LeaseRecord | None, *, now: datetime) -> LeaseRecord | None:
        """The record that makes us the holder (a renewal if we are already), or None when
        another holder's lease is still valid. `record` None: there is no Lease yet."""
        stamp = rfc3339_micro(now)
        if record is None:
            return LeaseRecord(self.identity, self._duration_s, stamp, stamp, 0)
        self.observe(record)
        if self.held_by_another(record):
            return None
        if record.holder == self.identity:
            return dataclasses.replace(record, duration_s=self._duration_s, renew_time=stamp)
        return LeaseRecord(self.identity, self._duration_s, stamp, stamp, record.transitions + 1)

    def release(self, record: LeaseRecord, *, now: datetime) -> LeaseRecord:
        """The record that gives the Lease up (client-go's release): no holder, and a
        duration of one second for candidates that judge by the record alone."""
        stamp = rfc3339_micro(now)
        return dataclasses.replace(
            record, holder=None, duration_s=1, acquire_time=stamp, renew_time=stamp
        )


class RenewalClock:
    """When the leader must give up: `renew_deadline_s` after the start of its last
    successful renewal (the start, not the answer: the API server may have written it at any
    moment in between, and the standbys count from the write)."""

    def __init__(
        self, *, renew_deadline_s: float = RENEW_DEADLINE_S, clock: Callable[[], float]
    ) -> None:
        self._deadline_s = renew_deadline_s
        self._clock = clock
        self._renewed_at: float | None = None

    def renewed(self, attempt_started_at: float) -> None:
        self._renewed_at = attempt_started_at

    def remaining_s(self) -> float:
        """Seconds left to renew in; zero or less: leadership is lost."""
        if self._renewed_at is None:
            return 0.0
        return self._renewed_at + self._deadline_s - self._clock()


class LeaderElector:
    """Campaigns for the Lease `namespace/name` in the background; `on_started_leading` runs
    once it leads, `on_stopped_leading` once it could not renew in time (then nothing more
    happens: the process is expected to exit)."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        on_started_leading: Callable[[], Coroutine[Any, Any, None]],
        on_stopped_leading: Callable[[], Coroutine[Any, Any, None]],
        lease_duration_s: int = LEASE_DURATION_S,
        renew_every_s: float = RENEW_EVERY_S,
        retry_s: float = RETRY_S,
        renew_deadline_s: float = RENEW_DEADLINE_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        sight: SightListener | None = None,
    ) -> None:
        if not renew_every_s < renew_deadline_s < lease_duration_s:
            raise ValueError("need renew_every_s < renew_deadline_s < lease_duration_s")
        self._coordination = k8s.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        self._renew_every_s = renew_every_s
        self._retry_s = retry_s
        self._clock = clock
        self._wall = wall
        self._election = Election(identity, lease_duration_s=lease_duration_s, clock=clock)
        self._renewals = RenewalClock(renew_deadline_s=renew_deadline_s, clock=clock)
        self._held: tuple[LeaseRecord, str] | None = None  # what we wrote, and its version
        self._leading = False
        self._failing = False
        # Told, while standing by, when the Lease cannot be reached and since when (the last
        # answer), and when it can again: a standby's sight of the API server
        # (operator/sight.py).
        self._sight: SightListener = sight or Unwatched()
        self._last_answer: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self._leading

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        """Stop campaigning and renewing (and cancel a start of the work still under way).
        A leader still holds the Lease until `release()`: stop the work in between."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def release(self) -> None:
        """Give the Lease up, so that a standby takes over at once rather than when it
        expires; only once the work it guarded has stopped."""
        if self._leading:
            self._leading = False
            await self._release()

    # --- the campaign ---------------------------------------------------------------------

    async def _run(self) -> None:
        logger.info("%s: waiting to lead (Lease %s/%s)", self.identity, self.namespace, self.name)
        while True:
            if await self._try_hold():
                break
            await asyncio.sleep(self._retry_s)
        self._leading = True
        logger.info("%s: leading (Lease %s/%s)", self.identity, self.namespace, self.name)
        # Started beside the renewals, not before them (as client-go does): starting the
        # work may take longer than the lease lasts.
        starting = asyncio.create_task(self._on_started_leading(), name="started-leading")
        try:
            await self._keep_renewing()
            logger.error(
                "%s: stopped leading: the Lease %s/%s was not renewed in time",
                self.identity,
                self.namespace,
                self.name,
            )
        except Exception:
            logger.exception("%s: stopped leading: leader election failed", self.identity)
        finally:
            # Runs on cancellation too (stop()), so a start still under way never outlives
            # the leadership it was started for.
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        self._leading = False
        await self._on_stopped_leading()

    async def _keep_renewing(self) -> None:
        """Renew until a renewal deadline passes."""
        while True:
            await asyncio.sleep(self._renew_every_s)
            while True:
                remaining_s = self._renewals.remaining_s()
                if remaining_s <= 0:
                    return
                try:
                    async with asyncio.timeout(remaining_s):
                        renewed = await self._try_hold()
                except TimeoutError:
                    return
                if renewed:
                    break
                await asyncio.sleep(min(self._retry_s, max(self._renewals.remaining_s(), 0)))

    async def _try_hold(self) -> bool:
        """One round of client-go's tryAcquireOrRenew: read, decide, compare-and-swap."""
        started_at = self._clock()
        try:
            body = await self._read()
            record = LeaseRecord.from_spec(body["spec"]) if body is not None else None
            wanted = self._election.claim(record, now=self._wall())
            if wanted is None:
                self._log_recovery()
                return False
            if body is None:
                written = await self._create(wanted)
            else:
                written = await self._replace(wanted, body["metadata"]["resourceVersion"])
        except Conflict:
            self._log_recovery()
            return False  # another candidate wrote first
        except (aiohttp.ClientError, TimeoutError, OSError, ApiError) as error:
            if not self._leading:
                # A standby sees the API server through this poll alone; a leader's watches
                # and writes tell its sight (a failed renewal must not stop its lease clocks
                # back to the renewal before).
                self._sight.lost(_SIGHT_SOURCE, since=self._last_answer)
            if not self._failing:
                self._failing = True
                logger.warning(
                    "%s: could not read or write the Lease %s/%s: %s",
                    self.identity,
                    self.namespace,
                    self.name,
                    str(error) or type(error).__name__,
                )
            return False
        self._log_recovery()
        self._election.observe(wanted)
        self._held = (wanted, written["metadata"]["resourceVersion"])
        self._renewals.renewed(started_at)
        return True

    def _log_recovery(self) -> None:
        """The API server answered (whatever the election's outcome)."""
        self._last_answer = self._clock()
        self._sight.regained(_SIGHT_SOURCE)
        if self._failing:
            self._failing = False
            logger.info(
                "%s: reaching the Lease %s/%s again", self.identity, self.namespace, self.name
            )

    async def _release(self) -> None:
        if self._held is None:
            return
        record, version = self._held
        self._held = None
        try:
            async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                await self._replace(self._election.release(record, now=self._wall()), version)
        except Conflict:
            return  # someone else holds it by now: nothing of ours to release
        except (aiohttp.ClientError, TimeoutError, OSError, ApiError) as error:
            # The standby takes over when the lease expires instead of at once.
            logger.warning("%s: could not release the Lease: %s", self.identity, error)
            return
        logger.info("%s: released the Lease %s/%s", self.identity, self.namespace, self.name)

    # --- requests -------------------------------------------------------------------------

    async def _read(self) -> dict[str, Any] | None:
        response = await self._coordination.read_namespaced_lease(
            self.name,
            self.namespace,
            _preload_content=False,
            _request_timeout=_REQUEST_TIMEOUT_S,
        )
        try:
            return await json_body(response)
        except Gone:
            return None

    def _manifest(self, record: LeaseRecord, version: str | None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if version is not None:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": record.spec(),
        }

    async def _create(self, record: LeaseRecord) -> dict[str, Any]:
        response = await self._coordination.create_namespaced_lease(
            self.namespace,
            self._manifest(record, None),
            field_manager=FIELD_MANAGER,
            _preload_content=False,
            _request_timeout=_REQUEST_TIMEOUT_S,
        )
        return await json_body(response)

    async def _replace(self, record: LeaseRecord, version: str) -> dict[str, Any]:
        """An update that fails with 409 Conflict unless the Lease is still at `version`."""
        response = await self._coordination.replace_namespaced_lease(
            self.name,
            self.namespace,
            self._manifest(record, version),
            field_manager=FIELD_MANAGER,
            _preload_content=False,
            _request_timeout=_REQUEST_TIMEOUT_S,
        )
        return await json_body(response)
