"""What one API request costs the operator's process: `python -m bench.request_path`.

Starts the local control plane and makes `--requests` calls through the operator's own
client and writer (`tasklease.kube.client.api_client`, `KubeWriter`), `--in-flight` at a
time: deletions of a pod that does not exist, answered 404 at once, so that the API
server's work is as small as a request's can be and what is left is ours (building the
request, the client library, aiohttp, TLS, reading the answer). It prints CPU microseconds
of this process per request (threads included) and wall microseconds per request, the
median of `--repeats` passes, as one JSON line.

`--compare-trust-env` alternates passes with aiohttp's `trust_env` on, as kubernetes_asyncio
leaves it: aiohttp then looks up ~/.netrc and the proxy environment variables in a thread for
every request (docs/results/2026-12-04-client-trust-env.md). Run both in the same minute; only
the ratio means anything on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tasklease.kube.client import KubeWriter, api_client


async def one_pass(
    kubeconfig: Path, *, requests: int, in_flight: int, trust_env: bool
) -> tuple[float, float]:
    """(CPU us, wall us) per request of one pass, after a warm-up that opens the connections."""
    api = await api_client(qps_hint=in_flight, kubeconfig=kubeconfig)
    api.rest_client.pool_manager._trust_env = trust_env
    writer = KubeWriter(api)
    slots = asyncio.Semaphore(in_flight)

    async def delete_absent() -> None:
        async with slots:
            if await writer.delete_pod("default", "no-such-pod"):
                raise RuntimeError("a pod that should not exist was deleted")

    try:
        await asyncio.gather(*(delete_absent() for _ in range(in_flight * 4)))
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.gather(*(delete_absent() for _ in range(requests)))
        return (
            (time.process_time() - cpu) / requests * 1e6,
            (time.monotonic() - wall) / requests * 1e6,
        )
    finally:
        await writer.close()


async def measure(
    kubeconfig: Path, *, requests: int, in_flight: int, repeats: int, compare: bool
) -> dict[str, Any]:
    variants = [False, True] if compare else [False]
    passes: dict[bool, list[tuple[float, float]]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for trust_env in variants:
            passes[trust_env].append(
                await one_pass(
                    kubeconfig, requests=requests, in_flight=in_flight, trust_env=trust_env
                )
            )
    found: dict[str, Any] = {}
    for trust_env, results in passes.items():
        prefix = "trust_env_" if trust_env else ""
        found[f"{prefix}cpu_us_per_request"] = round(statistics.median(c for c, _ in results), 1)
        found[f"{prefix}wall_us_per_request"] = round(statistics.median(w for _, w in results), 1)
    if compare:
        found["cpu_ratio"] = round(
            found["cpu_us_per_request"] / found["trust_env_cpu_us_per_request"], 3
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=16, help="as the operator's workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-trust-env", action="store_true")
    args = parser.parse_args(argv)

    from tasklease.controlplane import ControlPlane, obtain_binaries

    with ControlPlane.start(binaries=obtain_binaries(progress=sys.stderr)) as plane:
        found = asyncio.run(
            measure(
                plane.kubeconfig,
                requests=args.requests,
                in_flight=args.in_flight,
                repeats=args.repeats,
                compare=args.compare_trust_env,
            )
        )
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
