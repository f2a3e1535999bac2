"""The kubectl plugin's pure parts, with fake time: progress bars, ages on the API server's
clock, the tables and the watch line, describe's timeline, rerun's manifest, errors in
kubectl's words, and which cluster and namespace the flags choose. The commands themselves
run through the real kubectl in tests/integration/test_kubectl_plugin.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    CLAIMABLE_LABEL,
    EPOCH_ANNOTATION,
    HOLDER_ANNOTATION,
    PREVIOUS_ATTEMPT_ANNOTATION,
    WORKER_GROUP_LABEL,
)
from tasklease.api.times import ServerClock
from tasklease.lease import core
from tasklease.plugin import render
from tasklease.plugin.cli import build_parser, logs_argv, no_holder_message, pool_task_message
from tasklease.plugin.describe import attempt_timeline, current_attempt, describe
from tasklease.plugin.render import (
    human_duration,
    progress_bar,
    status_line,
    task_row,
    tasks_table,
)
from tasklease.plugin.rerun import rerun_manifest
from tasklease.plugin.session import PluginError, Target, api_error, resolve_target

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def stamp(ago: timedelta) -> str:
    return (NOW - ago).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def running_task(**status: Any) -> dict[str, Any]:
    """A Task as the API server returns it: attempt 2 of 3, pod orders-2 reporting."""
    return {
        "apiVersion": "tasklease.io/v1alpha1",
        "kind": "Task",
        "metadata": {
            "name": "orders",
            "namespace": "jobs",
            "uid": "u-1",
            "generation": 1,
            "creationTimestamp": stamp(timedelta(minutes=5)),
            "labels": {"team": "etl"},
            "annotations": {
                HOLDER_ANNOTATION: "orders-2",
                EPOCH_ANNOTATION: "2",
                ACQUIRE_TIME_ANNOTATION: stamp(timedelta(minutes=2)),
            },
        },
        "spec": {
            "template": {"spec": {"containers": [{"name": "runner", "image": "etl:1.4"}]}},
            "retry": {"maxAttempts": 3, "backoff": {"initial": "10s"}},
            "ackTimeout": "2m",
        },
        "status": {
            "phase": "Running",
            "attempt": 2,
            "epoch": 2,
            "holder": "orders-2",
            "progress": {
                "epoch": 2,
                "percent": 42.5,
                "message": "loading partition 7",
                "reportTime": stamp(timedelta(seconds=7)),
            },
            "attempts": [
                {
                    "attempt": 1,
                    "epoch": 1,
                    "holder": "orders-1",
                    "startTime": stamp(timedelta(minutes=4)),
                    "endTime": stamp(timedelta(minutes=2)),
                    "outcome": "ProgressTimeout",
                    "message": "no report for 15m",
                },
                {
                    "attempt": 2,
                    "epoch": 2,
                    "holder": "orders-2",
                    "startTime": stamp(timedelta(minutes=2)),
                },
            ],
            "conditions": [
                {
                    "type": "Leased",
                    "status": "True",
                    "reason": "Running",
                    "message": "pod orders-2 acknowledged lease epoch 2",
                    "lastTransitionTime": stamp(timedelta(minutes=1)),
                    "observedGeneration": 1,
                }
            ],
            **status,
        },
    }


def succeeded_task() -> dict[str, Any]:
    task = running_task(phase="Succeeded", holder=None)
    del task["metadata"]["annotations"][HOLDER_ANNOTATION]
    task["status"]["conditions"].append(
        {
            "type": "Complete",
            "status": "True",
            "reason": "Succeeded",
            "message": "the runner reported FINISHED",
            "lastTransitionTime": stamp(timedelta(seconds=1)),
            "observedGeneration": 1,
        }
    )
    return task


# --- progress bars and ages ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "shown"),
    [
        (0, "[..........] 0%"),
        (50, "[#####.....] 50%"),
        (42.5, "[####......] 42%"),
        (99.9, "[#########.] 99%"),
        (100, "[##########] 100%"),
        (130, "[##########] 100%"),
        (None, "<none>"),
    ],
)
def test_progress_bar_fills_a_tenth_per_ten_percent_and_never_shows_done_early(
    percent: float | None, shown: str
) -> None:
    assert progress_bar(percent) == shown


@pytest.mark.parametrize(
    ("elapsed", "shown"),
    [
        (timedelta(seconds=-5), "<invalid>"),
        (timedelta(seconds=-0.5), "0s"),
        (timedelta(seconds=59), "59s"),
        (timedelta(seconds=119), "119s"),
        (timedelta(minutes=3, seconds=20), "3m20s"),
        (timedelta(minutes=5), "5m"),
        (timedelta(minutes=45, seconds=59), "45m"),
        (timedelta(hours=5, minutes=3), "5h3m"),
        (timedelta(hours=30), "30h"),
        (timedelta(days=3, hours=4), "3d4h"),
        (timedelta(days=40), "40d"),
        (timedelta(days=800), "2y70d"),
        (timedelta(days=3000), "8y"),
    ],
)
def test_ages_read_like_kubectls(elapsed: timedelta, shown: str) -> None:
    assert human_duration(elapsed) == shown


def test_ages_are_measured_on_the_api_servers_clock() -> None:
    """This machine's clock is 10 minutes slow: the last report, written on the API
    server's clock 7 s before its answer, still reads 7 s old, not -9m53s."""
    clock = ServerClock(wall=lambda: NOW - timedelta(minutes=10))
    clock.observe({"Date": "Sat, 28 Nov 2026 12:00:00 GMT"})
    assert clock.now() == NOW + timedelta(seconds=0.5)
    row = task_row(running_task(), clock.now())
    assert row == ["orders", "Running", "2/3", "orders-2", "[####......] 42%", "7s", "5m"]


def test_without_a_date_header_the_clock_is_kept() -> None:
    wall = [NOW]
    clock = ServerClock(wall=lambda: wall[0])
    clock.observe({"Date": "Sat, 28 Nov 2026 12:00:30 GMT"})
    wall[0] = NOW + timedelta(seconds=10)
    clock.observe({})
    clock.observe({"Date": "not a date"})
    assert clock.now() == NOW + timedelta(seconds=40.5)


# --- get and watch ------------------------------------------------------------------------


def test_get_lists_in_kubectls_columns_with_the_namespace_first_across_namespaces() -> None:
    pending: dict[str, Any] = {
        "metadata": {"name": "new", "namespace": "other", "creationTimestamp": stamp(timedelta(0))},
        "spec": {"workerGroup": "gpu"},
    }
    shown = tasks_table([running_task(), pending], NOW, namespaced=True).splitlines()
    assert [line.split() for line in shown] == [
        ["NAMESPACE", "NAME", "PHASE", "ATTEMPT", "HOLDER", "PROGRESS", "LAST", "REPORT", "AGE"],
        ["jobs", "orders", "Running", "2/3", "orders-2", "[####......]", "42%", "7s", "5m"],
        ["other", "new", "Pending", "0", "<none>", "<none>", "<none>", "0s"],
    ]
    # Aligned as kubectl aligns: every column starts where its header does.
    assert shown[1].index("orders-2") == shown[0].index("HOLDER")
    assert shown[2].index("0s") == shown[0].index("AGE")


def test_the_lease_annotation_names_the_holder_before_the_status_does() -> None:
    """Right after a hand-out the lease is written and the status follows."""
    task = running_task(holder=None)
    assert task_row(task, NOW)[3] == "orders-2"


def test_a_final_task_has_no_holder_while_its_lease_annotation_is_being_released() -> None:
    task = succeeded_task()
    task["metadata"]["annotations"][HOLDER_ANNOTATION] = "orders-2"
    assert task_row(task, NOW)[3] == "<none>"


def test_the_watch_line_says_what_the_runner_does_then_how_the_task_ended() -> None:
    assert status_line(running_task(), NOW) == (
        "orders  Running  attempt 2/3  holder orders-2  [####......] 42%  "
        "last report 7s  loading partition 7"
    )
    line = status_line(succeeded_task(), NOW)
    assert line.startswith("orders  Succeeded  attempt 2/3  holder <none>")
    assert line.endswith("the runner reported FINISHED")


def test_the_complete_condition_is_the_operators() -> None:
    assert render.CONDITION_COMPLETE == core.CONDITION_COMPLETE


# --- describe -----------------------------------------------------------------------------


def test_describe_shows_the_spec_status_timeline_conditions_and_events() -> None:
    events = [
        {
            "metadata": {"resourceVersion": "12"},
            "type": "Warning",
            "reason": "ProgressTimeout",
            "message": "attempt 1 ended: no report for 15m",
            "lastTimestamp": stamp(timedelta(minutes=2)),
            "firstTimestamp": stamp(timedelta(minutes=2)),
            "count": 1,
            "source": {"component": "tasklease-operator"},
        },
        {
            "metadata": {"resourceVersion": "10"},
            "type": "Normal",
            "reason": "HandedOut",
            "message": "attempt 2/3: lease epoch 2 handed to pod orders-2",
            "lastTimestamp": stamp(timedelta(minutes=2)),
            "firstTimestamp": stamp(timedelta(minutes=4)),
            "count": 2,
            "source": {"component": "tasklease-operator"},
        },
    ]
    text = describe(running_task(), events, NOW)
    assert "Runner:                  a pod per attempt: container runner, image etl:1.4" in text
    assert "  Progress:            [####......] 42%  loading partition 7 (epoch 2)" in text
    assert "  Last Report:         2026-11-28T11:59:53Z (7s ago)" in text
    assert "epoch 2, holder orders-2, since 2026-11-28T11:58:00Z (2m ago), acknowledged" in text
    timeline = text.split("Attempts:\n")[1].split("Conditions:")[0].splitlines()
    assert [line.split()[:6] for line in timeline] == [
        ["ATTEMPT", "EPOCH", "HOLDER", "START", "END", "OUTCOME"],
        ["1", "1", "orders-1", "2026-11-28T11:56:00Z", "2026-11-28T11:58:00Z", "ProgressTimeout"],
        ["2", "2", "orders-2", "2026-11-28T11:58:00Z", "-", "-"],
    ]
    assert "Leased   True     Running   60s     1            pod orders-2 acknowledged" in text
    # Events as kubectl describe lists them: oldest first, stored order within a second.
    listed = text.split("Events:\n")[1].splitlines()
    assert [line.split()[1] for line in listed[2:]] == ["HandedOut", "ProgressTimeout"]
    assert "2m (x2 over 4m)" in listed[2]


def test_the_timeline_includes_an_ended_attempt_the_status_has_not_recorded_yet() -> None:
    """A reassignment writes how the old attempt ended with the new lease; the status write
    that records it comes after. describe shows it already."""
    task = running_task()
    ended = {**task["status"]["attempts"][1], "endTime": stamp(timedelta(0))}
    ended |= {"outcome": "PodLost", "message": "pod gone"}
    task["metadata"]["annotations"] |= {
        PREVIOUS_ATTEMPT_ANNOTATION: json.dumps(ended),
        EPOCH_ANNOTATION: "3",
        HOLDER_ANNOTATION: "orders-3",
    }
    assert [(a["epoch"], a.get("outcome")) for a in attempt_timeline(task)] == [
        (1, "ProgressTimeout"),
        (2, "PodLost"),
    ]
    assert current_attempt(task, NOW).startswith("epoch 3, holder orders-3")
    assert current_attempt(task, NOW).endswith("not acknowledged yet")


def test_a_final_task_has_no_current_attempt() -> None:
    assert current_attempt(succeeded_task(), NOW) == "<none> (the task is Succeeded)"


def test_describe_shows_a_task_the_models_refuse() -> None:
    """The schema admits it, the models do not (a reserved variable in the template): the
    operator leaves it with an Invalid condition, and describe must still show it."""
    env = [{"name": "TASKLEASE_EPOCH", "value": "9"}]
    task = running_task(
        phase="Pending",
        conditions=[
            {
                "type": "Invalid",
                "status": "True",
                "reason": "InvalidSpec",
                "message": "TASKLEASE_* variables are reserved",
                "lastTransitionTime": stamp(timedelta(seconds=3)),
                "observedGeneration": 1,
            }
        ],
    )
    task["spec"]["template"]["spec"]["containers"][0]["env"] = env
    assert "Invalid   True     InvalidSpec   3s      1            TASKLEASE_*" in describe(
        task, [], NOW
    )


# --- rerun --------------------------------------------------------------------------------


def test_rerun_keeps_the_spec_and_leaves_the_lease_and_status_behind() -> None:
    task = succeeded_task()
    task["spec"]["cancel"] = True
    task["metadata"]["labels"] |= {CLAIMABLE_LABEL: "true", WORKER_GROUP_LABEL: "gpu"}
    task["metadata"]["annotations"] |= {
        PREVIOUS_ATTEMPT_ANNOTATION: "{}",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
        "owner": "data-team",
    }
    task["metadata"]["ownerReferences"] = [{"kind": "Workflow", "name": "w"}]
    manifest = rerun_manifest(task)
    assert manifest == {
        "apiVersion": "tasklease.io/v1alpha1",
        "kind": "Task",
        "metadata": {
            "generateName": "orders-rerun-",
            "labels": {"team": "etl"},
            "annotations": {"owner": "data-team"},
        },
        "spec": {key: value for key, value in task["spec"].items() if key != "cancel"},
    }
    assert rerun_manifest(task, name="again")["metadata"]["name"] == "again"


def test_a_generated_rerun_name_fits_in_a_label_value() -> None:
    task = succeeded_task()
    task["metadata"]["name"] = "n" * 63
    prefix = rerun_manifest(task)["metadata"]["generateName"]
    assert prefix.endswith("-rerun-") and len(prefix) + 5 == 63


# --- logs ---------------------------------------------------------------------------------


def test_logs_runs_kubectl_with_the_plugins_cluster_and_namespace() -> None:
    target = Target(kubeconfig="/k", context="prod", namespace="jobs", namespace_given=False)
    argv = logs_argv("/bin/kubectl", pod="orders-2", target=target, follow=True, container="c")
    assert argv == [
        "/bin/kubectl",
        "logs",
        "orders-2",
        "--namespace",
        "jobs",
        "--kubeconfig=/k",
        "--context=prod",
        "--follow",
        "--container=c",
    ]
    plain = Target(kubeconfig=None, context=None, namespace="default", namespace_given=False)
    assert logs_argv("k", pod="p", target=plain, follow=False, container=None) == [
        "k",
        "logs",
        "p",
        "--namespace",
        "default",
    ]


def test_without_a_holder_logs_names_the_last_attempts_pod() -> None:
    message = no_holder_message(succeeded_task(), "jobs")
    assert message.startswith('error: task "orders" has no holder (Succeeded)')
    assert message.endswith("its last attempt ran in pod orders-2: kubectl logs orders-2 -n jobs")


def test_logs_of_a_pool_task_names_its_pool_runner_instead() -> None:
    task = running_task()
    task["spec"] = {"workerGroup": "gpu"}
    assert pool_task_message(task, "warm-a", "jobs", pod_exists=False) == (
        'error: task "orders" is a pool task held by pool runner warm-a (no pod of that name '
        "in namespace jobs); that runner serves every task of worker group gpu, so its logs "
        "are not this task's alone"
    )
    with_pod = pool_task_message(task, "warm-a", "jobs", pod_exists=True)
    assert "held by pool runner pod warm-a: kubectl logs warm-a -n jobs; " in with_pod


# --- errors and flags ---------------------------------------------------------------------


def test_api_errors_read_as_kubectls() -> None:
    body = {
        "kind": "Status",
        "status": "Failure",
        "reason": "NotFound",
        "message": 'tasks.tasklease.io "x" not found',
        "code": 404,
    }
    refused = api_error(ApiException(status=404, reason="Not Found", body=json.dumps(body)))
    assert str(refused) == 'Error from server (NotFound): tasks.tasklease.io "x" not found'
    unanswered = api_error(ApiException(status=0, reason="SSLError"))
    assert str(unanswered) == "Unable to connect to the server: SSLError"
    assert isinstance(api_error(OSError("connection refused")), PluginError)


def _kubeconfig(path: Path, *, namespace: str | None) -> Path:
    context: dict[str, Any] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "main", "context": context},
            {"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "ops"}},
        ],
        "current-context": "main",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_namespace_is_the_flags_else_the_contexts_else_default(tmp_path: Path) -> None:
    with_ns = str(_kubeconfig(tmp_path / "a", namespace="jobs"))
    without = str(_kubeconfig(tmp_path / "b", namespace=None))

    def namespace(kubeconfig: str, context: str | None, given: str | None) -> str:
        target = resolve_target(kubeconfig=kubeconfig, context=context, namespace=given, environ={})
        return target.namespace

    assert namespace(with_ns, None, "mine") == "mine"
    assert namespace(with_ns, None, None) == "jobs"
    assert namespace(with_ns, "other", None) == "ops"
    assert namespace(without, None, None) == "default"
    with pytest.raises(PluginError, match='error: context "nope" does not exist'):
        namespace(with_ns, "nope", None)


@pytest.mark.parametrize(
    "argv",
    [
        ["-n", "jobs", "--context", "prod", "get", "orders"],
        ["get", "orders", "-n", "jobs", "--context", "prod"],
        ["--context", "prod", "get", "--namespace=jobs", "orders"],
    ],
)
def test_kubectls_flags_work_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.name, args.namespace, args.context) == (
        "get",
        "orders",
        "jobs",
        "prod",
    )
    assert args.kubeconfig is None
