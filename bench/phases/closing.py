"""After the phases: what the operator and the Tasks say about reassignments (`diagnose`,
files beside details.json), and the figures that span phases (`conclude`): false
reassignments, a Task whose runner never stopped losing its lease, counted in Tasks."""

from __future__ import annotations

import json

from bench.context import NAMESPACE, BenchRun, wall
from bench.report import parse_prometheus, ratio
from tasklease.controlplane import scrape

RESTART_PHASES = frozenset({"restart", "after restart"})


async def diagnose(bench: BenchRun) -> None:
    """The operator's metrics, a sample Task, and the attempt history of up to ten Tasks
    whose runner never stopped but lost its lease."""
    gen, api, output_dir = bench.gen, bench.api, bench.settings.output_dir
    text = await bench.operator.metrics_text()
    if text:
        (output_dir / "operator-metrics.txt").write_text(text)
        samples = parse_prometheus(text)
        bench.found.notes["operator_reassignments_since_restart"] = {
            scrape.split_key(key)[1]["reason"]: value
            for key, value in samples.items()
            if key.startswith("tasklease_reassignments_total{")
        }
    status, data = await api.call(
        "GET", f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks/t-000000"
    )
    if status == 200:
        (output_dir / "sample-task.json").write_bytes(data)
    examples = []
    for item in gen.false_reassignments()[:10]:
        status, data = await api.call(
            "GET", f"/apis/tasklease.io/v1alpha1/namespaces/{NAMESPACE}/tasks/{item.task}"
        )
        attempts = []
        if status == 200:
            for attempt in (json.loads(data).get("status") or {}).get("attempts") or []:
                attempts.append(
                    f"epoch {attempt.get('epoch')} {attempt.get('startTime')}.."
                    f"{attempt.get('endTime')} {attempt.get('outcome')}: "
                    f"{attempt.get('message')}"
                )
        runner = gen.by_task.get(item.task)
        examples.append(
            {
                "task": item.task,
                "phase": item.phase,
                "epochs": f"{item.old_epoch}->{item.new_epoch}",
                "seen_at": wall(item.seen),
                "last_ack_before_s": item.last_ack_age,
                "runner_reports": runner.reports if runner else None,
                "attempts": attempts,
            }
        )
    if examples:
        bench.found.notes["false_reassignment_examples"] = examples
        (output_dir / "false-reassignments.json").write_text(json.dumps(examples, indent=2))


def conclude(bench: BenchRun) -> None:
    gen, found = bench.gen, bench.found
    restart = gen.false_reassignments(RESTART_PHASES)
    others = gen.false_reassignments({r.phase for r in gen.reassignments} - RESTART_PHASES)
    # Counted in Tasks: a Task that lost the lease of a runner that never stopped.
    found.figures["false_reassignments"] = len({r.task for r in others})
    found.figures["restart_false_reassignments"] = len({r.task for r in restart})
    by_phase: dict[str, int] = {}
    for item in others + restart:
        by_phase[item.phase] = by_phase.get(item.phase, 0) + 1
    found.notes["false_reassignments_by_phase"] = by_phase
    found.notes["false_reassignments_of_replacement_runners"] = sum(
        1 for item in others + restart if gen.by_task[item.task].victim
    )
    found.notes["refused_reports"] = gen.counters.refused
    found.notes["report_errors"] = gen.counters.errors
    found.notes["pods_found_by_relisting"] = gen.listed_pods
    figures = found.figures
    figures["tasks"] = bench.settings.tasks
    figures["handout_ratio"] = ratio(
        figures.get("handout_per_s"), figures.get("job_controller_pods_per_s")
    )
