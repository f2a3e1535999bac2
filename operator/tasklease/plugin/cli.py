"""`kubectl tasklease`: the everyday questions about Tasks, as a kubectl plugin.

kubectl finds the executable `kubectl-tasklease` on PATH (the Python package installs it)
and runs it with every argument after `tasklease`; kubectl's own flags must come after the
plugin's name (`kubectl tasklease -n jobs get`), and work before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from tasklease.api.durations import parse_go_duration
from tasklease.api.models import GROUP, SINGULAR, Phase
from tasklease.plugin.describe import attempt_timeline, describe
from tasklease.plugin.render import (
    epoch_of,
    holder_of,
    is_final,
    metadata_of,
    phase_of,
    status_line,
    tasks_table,
)
from tasklease.plugin.rerun import rerun_manifest
from tasklease.plugin.session import (
    PluginError,
    Session,
    Target,
    kubectl_binary,
    resolve_target,
)

EPILOG = """\
kubectl's flags go after the plugin's name: kubectl tasklease -n jobs get.
Examples:
  kubectl tasklease get -A
  kubectl tasklease describe nightly-orders
  kubectl tasklease watch nightly-orders && echo done
  kubectl tasklease rerun nightly-orders --name nightly-orders-again
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        code: int = args.run(args)
    except PluginError as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kubectl tasklease get | head`
        sys.stderr.close()
        return 0
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl tasklease",
        description="Inspect and steer tasklease Tasks (tasks.tasklease.io).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_flags(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=description)
        _connection_flags(sub, suppress=True)
        return sub

    get = command(
        "get",
        "list Tasks with progress bars and last-report ages",
        "List the Tasks of the namespace (or one): phase, attempt of the most allowed, "
        "holder, progress, the age of the last report and of the Task, ages on the API "
        "server's clock.",
    )
    get.add_argument("name", nargs="?", metavar="NAME")
    get.add_argument(
        "-A", "--all-namespaces", action="store_true", help="list the Tasks of every namespace"
    )
    get.add_argument(
        "-o", "--output", choices=("json", "yaml", "name"), help="print the objects instead"
    )
    get.set_defaults(run=run_get)

    desc = command(
        "describe",
        "a Task's spec, status, attempt timeline, conditions and Events",
        "Show a Task: its spec in short, its status, every attempt (epoch, holder, start, "
        "end, outcome, message) and the current one, its conditions and recent Events.",
    )
    desc.add_argument("name", metavar="NAME")
    desc.set_defaults(run=run_describe)

    cancel = command(
        "cancel",
        "cancel a Task (spec.cancel: true)",
        "Set spec.cancel on a Task: the runner is told, its pod deleted, the phase becomes "
        "Canceled. A Task that is already final is left as it is.",
    )
    cancel.add_argument("name", metavar="NAME")
    cancel.set_defaults(run=run_cancel)

    rerun = command(
        "rerun",
        "create a new Task from a finished one, its spec kept",
        "Create a new Task with the spec, labels and annotations of a finished one (not its "
        "lease, status or checkpoint), named NAME-rerun-<random> unless --name is given.",
    )
    rerun.add_argument("name", metavar="NAME")
    rerun.add_argument("--name", dest="new_name", metavar="NEW", help="the new Task's name")
    rerun.add_argument(
        "--force",
        action="store_true",
        help="rerun a Task that is not final yet (the two then run side by side)",
    )
    rerun.set_defaults(run=run_rerun)

    logs = command(
        "logs",
        "the logs of the pod holding a Task's lease",
        "Print the logs of the runner pod that holds the Task's lease now (kubectl logs). "
        "A pool task's holder is a pool runner serving many tasks: its pod is named, not "
        "shown.",
    )
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="stream the logs")
    logs.add_argument("-c", "--container", help="the container (default: kubectl's choice)")
    logs.set_defaults(run=run_logs)

    watch = command(
        "watch",
        "follow a Task until it is final; exit 0 if it Succeeded",
        "Print a line each time what a Task shows changes, until it is final (Succeeded, "
        "Failed, Skipped or Canceled). Exit status 0 when it Succeeded, 1 otherwise.",
    )
    watch.add_argument("name", metavar="NAME")
    watch.add_argument(
        "--timeout",
        type=_duration_s,
        help="give up after this long (a Go duration: 30s, 5m); default: never",
    )
    watch.set_defaults(run=run_watch)
    return parser


def _connection_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """kubectl's flags, on the top level and on each command alike. A command's copy
    defaults to absent, so it never overwrites what was given before the command."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default: KUBECONFIG)"
    )
    parser.add_argument("--context", default=default, help="kubeconfig context to use")
    parser.add_argument(
        "-n",
        "--namespace",
        default=default,
        help="namespace (default: the context's, else default)",
    )


def _duration_s(text: str) -> float:
    try:
        return parse_go_duration(text).total_seconds()
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 5m)") from error


def _target(args: argparse.Namespace) -> Target:
    return resolve_target(
        kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace
    )


def _session(args: argparse.Namespace) -> Session:
    return Session.open(_target(args))


def task_ref(name: str) -> str:
    """`task.tasklease.io/NAME`, as kubectl names an object in its messages."""
    return f"{SINGULAR}.{GROUP}/{name}"


# --- get ----------------------------------------------------------------------------------


def run_get(args: argparse.Namespace) -> int:
    if args.all_namespaces and args.name:
        raise PluginError("error: a resource cannot be retrieved by name across all namespaces")
    session = _session(args)
    if args.name:
        reply = session.get_task(args.name)
        tasks = [reply.body]
    else:
        reply = session.list_tasks(all_namespaces=args.all_namespaces)
        tasks = list(reply.body.get("items") or [])
    if args.output:
        listed = None if args.name else {"apiVersion": "v1", "kind": "List", "items": tasks}
        print_objects(tasks, listed, args.output)
        return 0
    if not tasks:
        where = "" if args.all_namespaces else f" in {session.namespace} namespace"
        print(f"No resources found{where}.", file=sys.stderr)
        return 0
    print(tasks_table(tasks, reply.server_now, namespaced=args.all_namespaces))
    return 0


def print_objects(tasks: list[dict[str, Any]], listed: dict[str, Any] | None, output: str) -> None:
    """As `kubectl get -o`: managedFields left out, keys sorted, a List for a listing."""
    for task in tasks:
        metadata_of(task).pop("managedFields", None)
    if output == "name":
        for task in tasks:
            print(task_ref(str(metadata_of(task).get("name", ""))))
        return
    document: dict[str, Any] = (
        {**listed, "metadata": {"resourceVersion": ""}} if listed is not None else tasks[0]
    )
    if output == "json":
        print(json.dumps(document, indent=4, sort_keys=True))
    else:
        import yaml

        print(yaml.safe_dump(document, sort_keys=True).rstrip("\n"))


# --- describe -----------------------------------------------------------------------------


def run_describe(args: argparse.Namespace) -> int:
    session = _session(args)
    reply = session.get_task(args.name)
    events = session.task_events(reply.body)
    print(describe(reply.body, events, session.clock.now()))
    return 0


# --- cancel and rerun ---------------------------------------------------------------------


def run_cancel(args: argparse.Namespace) -> int:
    session = _session(args)
    task = session.get_task(args.name).body
    if is_final(task):
        # Left alone: the spec edit would change nothing, yet raise the Task's generation
        # past what its conditions were written for, and `kubectl wait --for=condition=
        # Complete` would then wait for an operator that does not write final Tasks again.
        print(f"{task_ref(args.name)} unchanged: already {phase_of(task)}")
        return 0
    session.merge_patch_task(args.name, {"spec": {"cancel": True}})
    print(f"{task_ref(args.name)} canceled")
    return 0


def run_rerun(args: argparse.Namespace) -> int:
    session = _session(args)
    task = session.get_task(args.name).body
    if not is_final(task) and not args.force:
        raise PluginError(
            f'error: task "{args.name}" is {phase_of(task)}, not final: a rerun would run '
            "beside it (wait for it, cancel it, or pass --force)"
        )
    created = session.create_task(rerun_manifest(task, name=args.new_name)).body
    print(f"{task_ref(str(metadata_of(created).get('name', '')))} created")
    return 0


# --- logs ---------------------------------------------------------------------------------


def run_logs(args: argparse.Namespace) -> int:
    session = _session(args)
    task = session.get_task(args.name).body
    holder = holder_of(task)
    namespace = session.namespace
    if holder is None:
        raise PluginError(no_holder_message(task, namespace))
    if (task.get("spec") or {}).get("workerGroup"):
        raise PluginError(
            pool_task_message(task, holder, namespace, pod_exists=session.pod_exists(holder))
        )
    argv = logs_argv(
        kubectl_binary(),
        pod=holder,
        target=session.target,
        follow=args.follow,
        container=args.container,
    )
    # On stderr, as kubectl's own "Defaulted container ..." note: stdout is the logs alone.
    print(
        f"pod/{holder} holds task {args.name} (epoch {epoch_of(task)})",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    # kubectl itself from here on (its output, its errors, its exit status, Ctrl-C), as
    # kubectl runs its plugins.
    os.execv(argv[0], argv)


def no_holder_message(task: dict[str, Any], namespace: str) -> str:
    """No pod holds the lease now; name the pod of the last attempt, which may still be
    there (a finished attempt's pod is kept)."""
    name = metadata_of(task).get("name", "")
    text = f'error: task "{name}" has no holder ({phase_of(task)}): no runner pod holds its lease'
    attempts = attempt_timeline(task)
    if attempts and attempts[-1].get("holder"):
        last = attempts[-1]["holder"]
        text += f"; its last attempt ran in pod {last}: kubectl logs {last} -n {namespace}"
    return text


def pool_task_message(
    task: dict[str, Any], holder: str, namespace: str, *, pod_exists: bool
) -> str:
    """A pool runner's logs are those of every task it claimed: name it, do not show it."""
    name = metadata_of(task).get("name", "")
    group = (task.get("spec") or {}).get("workerGroup")
    where = (
        f"pod {holder}: kubectl logs {holder} -n {namespace}"
        if pod_exists
        else f"{holder} (no pod of that name in namespace {namespace})"
    )
    return (
        f'error: task "{name}" is a pool task held by pool runner {where}; that runner '
        f"serves every task of worker group {group}, so its logs are not this task's alone"
    )


def logs_argv(
    kubectl: str, *, pod: str, target: Target, follow: bool, container: str | None
) -> list[str]:
    """`kubectl logs` of `pod` with the plugin's kubeconfig, context and namespace."""
    argv = [kubectl, "logs", pod, "--namespace", target.namespace]
    if target.kubeconfig:
        argv.append(f"--kubeconfig={target.kubeconfig}")
    if target.context:
        argv.append(f"--context={target.context}")
    if follow:
        argv.append("--follow")
    if container:
        argv.append(f"--container={container}")
    return argv


# --- watch --------------------------------------------------------------------------------


def run_watch(args: argparse.Namespace) -> int:
    session = _session(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    reply = session.get_task(args.name)
    task = reply.body
    last_line = [""]

    def show(task: dict[str, Any]) -> None:
        # Each change of what is shown: heartbeats that change nothing visible add no line.
        line = status_line(task, session.clock.now())
        if line != last_line[0]:
            last_line[0] = line
            print(line, flush=True)

    show(task)
    if not is_final(task):
        version = str(metadata_of(task).get("resourceVersion", ""))
        for kind, task in session.watch_task(args.name, version, deadline=deadline):
            if kind == "DELETED":
                raise PluginError(f'error: task "{args.name}" was deleted before it was final')
            show(task)
            if is_final(task):
                break
        else:
            raise PluginError(
                f"error: timed out waiting for {task_ref(args.name)} to be final "
                f"(it is {phase_of(task)})"
            )
    return 0 if phase_of(task) == Phase.SUCCEEDED else 1
