"""Phase 0: what one heartbeat costs the API server next to a Lease renewal, on the quiet
control plane before anything else runs (bench/heartbeat_cost.py measures it: the same
client and concurrency for both, the variants in alternating order). The realistic Task
has a pod template and three attempts in its history; the small one a single container.
Both as the operator's hand-out leaves them, and (`*_kept`, in the notes) with every
manager's managedFields entry kept, as a Task applied server-side is."""

from __future__ import annotations

from bench.context import BenchRun, log
from bench.heartbeat_cost import FIGURES, measure, parse_args


async def run(bench: BenchRun) -> None:
    s = bench.settings
    if s.heartbeat_cost_writes <= 0:
        return
    bench.enter("heartbeat cost")
    log(
        f"heartbeat cost: {s.heartbeat_cost_writes} writes x {s.heartbeat_cost_rounds} rounds "
        "of a Lease renewal, a realistic and a small Task heartbeat"
    )
    before = bench.cpu()
    found = await measure(
        bench.plane,
        parse_args(
            [
                *("--writes", str(s.heartbeat_cost_writes)),
                *("--rounds", str(s.heartbeat_cost_rounds)),
                *("--variants", "task_kept,task_small_kept", "--no-policies"),
            ]
        ),
    )
    bench.record_cpu("heartbeat cost", bench.cpu().minus(before))
    for key in FIGURES:
        bench.found.figures[key] = found[key]
    bench.found.notes["heartbeat_cost"] = {
        "variants": found["variants"],
        "object_bytes": found["object_bytes"],
    }
    variants = found["variants"]
    log(
        f"heartbeat cost: {found['heartbeat_cost_vs_lease']:.2f}x a Lease renewal "
        f"({found['heartbeat_cost_vs_lease_small']:.2f}x for the small Task; with every "
        f"managedFields entry kept {variants['task_kept']['vs_lease']:.2f}x and "
        f"{variants['task_small_kept']['vs_lease']:.2f}x)"
    )
