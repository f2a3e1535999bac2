"""The benchmark's pure parts: percentiles, goals, tables, the JSON line, profiles, and
the runner reports the load generator sends (bench/report.py, bench/flame.py,
bench/loadgen.py)."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from bench.flame import frame_key, parse_collapsed, render, short_path, summarize
from bench.loadgen import (
    Generator,
    heartbeat_body,
    heartbeat_prefix,
    task_manifest,
)
from bench.report import (
    OPERATOR_REQUESTS,
    RESULT_KEYS,
    figures_table,
    format_table,
    metric_sum,
    missed_goals,
    parse_prometheus,
    per_thousand,
    percentile,
    ratio,
    request_latency_by_kind,
    result_json,
    round_figure,
    verdict,
)
from tasklease.api.times import rfc3339_micro
from tasklease.controlplane.scrape import sample_key, split_key, total


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 99, 1.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 50, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([5.0, 1.0, 4.0, 2.0, 3.0], 0, 1.0),
        ([5.0, 1.0, 4.0, 2.0, 3.0], 100, 5.0),
        # numpy.percentile(range(1, 101), 99) == 99.01
        ([float(v) for v in range(1, 101)], 99, 99.01),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None


def test_percentile_outside_0_100_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_ratio_and_per_thousand_handle_missing_values() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 4.0) is None
    assert ratio(1.0, 0.0) is None
    assert per_thousand(2.0, 4000) == 0.5
    assert per_thousand(2.0, 0) is None


def test_verdicts_follow_the_goals() -> None:
    assert verdict("cpu_ratio", 0.2) == "met"
    assert verdict("cpu_ratio", 0.3) == "MISSED"
    assert verdict("headroom_ratio", 0.9) == "met"
    assert verdict("false_reassignments", 1) == "MISSED"
    assert verdict("detection_p99_s", None) == "n/a"
    assert verdict("tasks", 1000) == ""
    assert missed_goals({"cpu_ratio": 0.5, "handout_ratio": 2.0}) == ["cpu_ratio"]


def test_the_json_line_has_exactly_the_keys_in_order() -> None:
    line = result_json({"tasks": 1000, "cpu_ratio": 0.123456, "false_reassignments": 0})
    parsed = json.loads(line)
    assert list(parsed) == list(RESULT_KEYS)
    assert parsed["tasks"] == 1000
    assert parsed["cpu_ratio"] == 0.123
    assert parsed["false_reassignments"] == 0
    assert parsed["detection_p99_s"] is None
    assert "\n" not in line


def test_the_json_line_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="RESULT_KEYS"):
        result_json({"tasks": 1, "speed": 2})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1234.5678, 1235.0), (0.012345, 0.0123), (3, 3), (0.0, 0.0), (float("nan"), None)],
)
def test_figures_keep_three_significant_digits(value: float, expected: float | None) -> None:
    assert round_figure(value) == expected


def test_tables_align_columns() -> None:
    text = format_table([["a", "1"], ["long name", "22"]], header=["name", "n"])
    assert text.splitlines() == [
        "name       n",
        "---------  --",
        "a          1",
        "long name  22",
    ]


def test_the_figures_table_shows_goals_and_verdicts() -> None:
    text = figures_table({"tasks": 10, "cpu_ratio": 0.5}, {"cpu_ratio": "CPU ratio"})
    row = next(line for line in text.splitlines() if line.startswith("CPU ratio"))
    assert "0.5" in row
    assert "<= 0.25" in row
    assert "MISSED" in row


def test_prometheus_text_is_parsed_and_summed_over_labels() -> None:
    text = (
        "# HELP tasklease_tasks Tasks\n"
        "# TYPE tasklease_tasks gauge\n"
        'tasklease_tasks{phase="Running"} 998.0\n'
        'tasklease_tasks{phase="Assigned"} 2.0\n'
        "tasklease_tasks_other 5.0\n"
        "tasklease_handouts_total 1000.0\n"
    )
    samples = parse_prometheus(text)
    assert samples['tasklease_tasks{phase="Running"}'] == 998.0
    assert metric_sum(samples, "tasklease_tasks") == 1000.0


def test_only_the_families_named_are_parsed() -> None:
    text = (
        "# HELP m_seconds A histogram\n"
        "# TYPE m_seconds histogram\n"
        'm_seconds_bucket{verb="GET",le="+Inf"} 3\n'
        'm_seconds_sum{verb="GET"} 1.5\n'
        'm_seconds_count{verb="GET"} 3\n'
        "# HELP m A counter whose name begins the histogram's\n"
        "# TYPE m counter\n"
        "m_total 7\n"
        "# TYPE other gauge\n"
        "other 1\n"
    )
    everything = parse_prometheus(text)
    histogram = parse_prometheus(text, families=("m_seconds",))
    assert histogram == {k: v for k, v in everything.items() if k.startswith("m_seconds_")}
    assert len(histogram) == 3
    assert parse_prometheus(text, families=("other", "m_seconds")) == {
        k: v for k, v in everything.items() if not k.startswith("m_total")
    }


def test_samples_are_found_by_name_and_labels_whatever_their_order() -> None:
    # client_golang writes a bucket's `le` last; prometheus_client sorts every label.
    golang = 'm_bucket{verb="GET",code="200",le="+Inf"} 3\nm_count{verb="GET",code="200"} 3\n'
    python = 'm_bucket{code="200",le="+Inf",verb="GET"} 3\nm_count{code="200",verb="GET"} 3\n'
    samples = parse_prometheus(golang)
    assert samples == parse_prometheus(python)
    assert samples[sample_key("m_count", verb="GET", code="200")] == 3.0
    assert samples[sample_key("m_bucket", le="+Inf", code="200", verb="GET")] == 3.0
    assert total(samples, "m_count", verb="GET") == 3.0
    assert total(samples, "m_count", verb="PUT") == 0.0


def test_a_sample_key_escapes_its_label_values_and_splits_back() -> None:
    key = sample_key("m", path='a "b" \\c\n')
    assert split_key(key) == ("m", {"path": 'a "b" \\c\n'})
    assert parse_prometheus(f"{key} 1\n") == {key: 1.0}


def test_collapsed_stacks_are_summarized() -> None:
    lines = [
        "<module> (tasklease/__main__.py);run (kopf/_core/reactor/running.py);"
        "loads (/usr/lib/python3.11/json/__init__.py) 30\n",
        "<module> (tasklease/__main__.py);run (kopf/_core/reactor/running.py);"
        "model_validate (site-packages/pydantic/main.py:600) 70\n",
        "\n",
    ]
    profile = summarize(parse_collapsed(lines))
    assert profile.total == 100
    assert profile.self_counts["model_validate (pydantic/main.py)"] == 70
    assert profile.inclusive_counts["run (kopf/_core/reactor/running.py)"] == 100
    assert profile.package_counts["pydantic"] == 70
    assert profile.package_counts["json"] == 30
    text = render(profile, top=5)
    assert "70.0%" in text


def test_frames_lose_line_numbers_and_site_packages() -> None:
    frame = "handle (/x/.venv/lib/python3.11/site-packages/kopf/_core/a.py:12)"
    assert frame_key(frame) == "handle (kopf/_core/a.py)"
    assert short_path("/work/main/operator/tasklease/lease/core.py") == "tasklease/lease/core.py"


def test_a_report_is_the_sdks_fenced_json_patch() -> None:
    prefix = heartbeat_prefix(3, "t-000001-3")
    body = heartbeat_body(prefix, 42, "2025-01-02T03:04:05.000006Z")
    assert json.loads(body) == [
        {"op": "test", "path": "/metadata/annotations/tasklease.io~1epoch", "value": "3"},
        {"op": "test", "path": "/metadata/annotations/tasklease.io~1holder", "value": "t-000001-3"},
        {
            "op": "add",
            "path": "/status/progress",
            "value": {"epoch": 3, "percent": 42, "reportTime": "2025-01-02T03:04:05.000006Z"},
        },
    ]


def test_report_times_are_rfc3339_with_microseconds() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert rfc3339_micro(when) == "2025-01-02T03:04:05.000006Z"


def test_bench_tasks_satisfy_the_models() -> None:
    from tasklease.api.models import Task

    manifest = task_manifest("t-000001", heartbeat_s=5, timeout_s=60, ack_timeout_s=60)
    manifest["metadata"].update(namespace="bench", uid="u", generation=1)
    task = Task.model_validate(manifest)
    assert task.spec.report_progress_timeout.total_seconds() == 60
    assert task.spec.heartbeat_interval.total_seconds() == 5


def test_request_latency_by_kind_is_the_difference_of_two_scrapes() -> None:
    def sample(part: str, verb: str, resource: str, subresource: str = "") -> str:
        return (
            f'apiserver_request_duration_seconds_{part}{{component="apiserver",'
            f'group="",resource="{resource}",scope="namespace",subresource="{subresource}",'
            f'verb="{verb}",version="v1"}}'
        )

    before = {
        sample("count", "POST", "pods"): 1000.0,
        sample("sum", "POST", "pods"): 20.0,
        sample("count", "PATCH", "tasks", "status"): 10.0,
        sample("sum", "PATCH", "tasks", "status"): 0.1,
    }
    after = {
        **before,
        sample("count", "POST", "pods"): 1050.0,
        sample("sum", "POST", "pods"): 25.0,  # 50 more, 5 s between them: 100 ms each
        sample("count", "PATCH", "tasks", "status"): 110.0,
        sample("sum", "PATCH", "tasks", "status"): 0.6,
        sample("count", "GET", "tasks"): 7.0,  # first seen in the second scrape
        sample("sum", "GET", "tasks"): 0.07,
        sample("count", "WATCH", "pods"): 1.0,  # a watch that ended: not a request's latency
        sample("sum", "WATCH", "pods"): 300.0,
    }
    found = request_latency_by_kind(before, after)
    assert found == {
        "PATCH tasks/status": {"count": 100.0, "mean_ms": 5.0},
        "POST pods": {"count": 50.0, "mean_ms": 100.0},
        "GET tasks": {"count": 7.0, "mean_ms": 10.0},
    }
    assert list(found) == ["PATCH tasks/status", "POST pods", "GET tasks"]  # busiest first


def test_request_latency_by_kind_reads_labels_in_any_order() -> None:
    text = (
        'apiserver_request_duration_seconds_count{verb="POST",resource="pods",subresource="",'
        'group="",version="v1",component="apiserver",scope="namespace"} 4\n'
        'apiserver_request_duration_seconds_sum{verb="POST",resource="pods",subresource="",'
        'group="",version="v1",component="apiserver",scope="namespace"} 0.2\n'
    )
    assert request_latency_by_kind({}, parse_prometheus(text)) == {
        "POST pods": {"count": 4.0, "mean_ms": 50.0}
    }


def test_the_operators_requests_are_told_apart_by_status_code_when_refused() -> None:
    def sample(part: str, verb: str, resource: str, code: str) -> str:
        return (
            f'tasklease_api_request_duration_seconds_{part}{{code="{code}",'
            f'resource="{resource}",verb="{verb}"}}'
        )

    before = {
        sample("count", "PATCH", "tasks", "200"): 5.0,
        sample("sum", "PATCH", "tasks", "200"): 1.0,
    }
    after = {
        sample("count", "PATCH", "tasks", "200"): 9.0,
        sample("sum", "PATCH", "tasks", "200"): 1.4,
        sample("count", "PATCH", "tasks", "409"): 2.0,
        sample("sum", "PATCH", "tasks", "409"): 0.5,
        sample("count", "POST", "pods", "201"): 4.0,
        sample("sum", "POST", "pods", "201"): 0.2,
    }
    assert request_latency_by_kind(before, after, metric=OPERATOR_REQUESTS) == {
        "PATCH tasks": {"count": 4.0, "mean_ms": 100.0},
        "POST pods": {"count": 4.0, "mean_ms": 50.0},
        "PATCH tasks 409": {"count": 2.0, "mean_ms": 250.0},
    }


def _generator(*, heartbeat_s: float, timeout_s: float) -> Generator:
    return Generator(
        None,  # type: ignore[arg-type]  # scheduling sends nothing
        "bench",
        heartbeat_s=heartbeat_s,
        timeout_s=timeout_s,
        ack_timeout_s=timeout_s,
        concurrency=1,
        seed=3,
    )


def test_rephase_spreads_a_pushs_clumps_and_the_overdue_instead_of_bunching_them() -> None:
    """After a push, the API server's answers came in clumps (64 runners at the same
    instant), and the runners it did not reach may be overdue. A runner's next heartbeat is
    due at most one interval after its last report, or, overdue, within the first half of
    what is left of its lease; within that it is drawn at random, so no clump survives into
    the schedule (nor, 240 s later, into the stopped runners' deadlines)."""
    heartbeat_s, timeout_s = 100.0, 240.0
    generator = _generator(heartbeat_s=heartbeat_s, timeout_s=timeout_s)
    pushed_at = time.monotonic() - 33.0
    for index in range(6400):
        runner = generator.add_runner(f"pushed-{index}")
        runner.epoch, runner.acked = 1, True
        runner.last_ack = pushed_at + (index // 64) * 0.33  # answered 64 at a time
    for index in range(1000):  # not reached by the push, and their beat is past
        runner = generator.add_runner(f"overdue-{index}")
        runner.epoch, runner.acked = 1, True
        runner.last_ack = pushed_at - heartbeat_s
    before = time.monotonic()
    generator.rephase()
    due = {index: when for when, _, index, _ in generator._heap}
    for runner in generator.runners:
        assert runner.last_ack is not None
        latest = max(runner.last_ack + heartbeat_s, (before + runner.last_ack + timeout_s) / 2)
        assert before <= due[runner.index] <= latest + 0.01
    # At random, 7,400 times in 100 s share a millisecond by twos and threes; clipped to
    # their limits, up to 27 of a clump of 64 did, and the overdue went all at once.
    same_millisecond = Counter(round(when, 3) for when in due.values())
    assert max(same_millisecond.values()) <= 6


def test_a_push_reaches_the_runners_with_the_oldest_reports_first() -> None:
    generator = _generator(heartbeat_s=100.0, timeout_s=240.0)
    for index, last_ack in enumerate((50.0, 10.0, 30.0, 20.0)):
        runner = generator.add_runner(f"task-{index}")
        runner.epoch, runner.acked, runner.last_ack = 1, True, last_ack
    generator.runners[2].stopped = True
    assert [r.task for r in generator.push_order()] == ["task-1", "task-3", "task-0"]
