"""The operator as the bench drives it: the shared `OperatorProcess` of the tests and the soak
(tasklease.controlplane.process), plus what only the bench reads of it: its /metrics."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from bench.loadgen import wait_for
from bench.report import metric_sum, parse_prometheus
from tasklease.controlplane.process import OperatorProcess


class BenchOperator(OperatorProcess):
    """The shared operator process, with the bench's readers of its /metrics."""

    # --- its /metrics -----------------------------------------------------------------

    async def metrics_text(self) -> str | None:
        """The exposition as text; None when the operator does not answer (yet)."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response,
            ):
                if response.status != 200:
                    return None
                return await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def metrics(self, *families: str) -> dict[str, float] | None:
        """Its samples (of `families` only, when named: the restart phase polls often)."""
        text = await self.metrics_text()
        return None if text is None else parse_prometheus(text, families=families)

    async def tracked(self) -> float | None:
        """How many Tasks it tracks; None before it has counted any phase."""
        samples = await self.metrics("tasklease_tasks")
        if samples is None or not any(k.startswith("tasklease_tasks{") for k in samples):
            return None
        return metric_sum(samples, "tasklease_tasks")

    async def tracks(self, test: Callable[[float], bool]) -> bool:
        tracked = await self.tracked()
        return tracked is not None and test(tracked)

    async def running(self) -> float:
        samples = await self.metrics("tasklease_tasks") or {}
        return samples.get('tasklease_tasks{phase="Running"}', 0.0)

    async def running_at_least(self, count: int) -> bool:
        return await self.running() >= count

    async def all_synced(self) -> bool:
        """Every informer (Tasks, runner pods, pool runners' Leases) has listed: until then a
        restarted operator is still catching up, whatever it tracks."""
        samples = await self.metrics("tasklease_informer_synced") or {}
        synced = [v for k, v in samples.items() if k.startswith("tasklease_informer_synced{")]
        return bool(synced) and all(v == 1 for v in synced)

    async def wait_tracking(self, tasks: int, *, interval: float) -> float:
        """Until the (re)started operator tracks `tasks` Tasks; then (monotonic)."""
        return await wait_for(
            f"the restarted operator to track {tasks} Tasks",
            lambda: self.tracks(lambda n: n >= tasks),
            within=max(120.0, tasks / 100),
            interval=interval,
            check=self.check,
        )

    async def wait_listed(self, tasks: int, *, interval: float) -> float:
        """Until the (re)started operator has listed everything it watches; then (monotonic)."""
        return await wait_for(
            "the restarted operator to list everything it watches",
            self.all_synced,
            within=max(120.0, tasks / 100),
            interval=interval,
            check=self.check,
        )
