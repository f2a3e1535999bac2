"""Worker pools in the chart: the pool runner Deployment, the pool runners' ServiceAccount and
Role, and the admission policies that narrow their Task and Lease writes to the pool runner
protocol (a claim for their own pod, a release of a task their pod holds, their own Lease).

The operator runs under the chart's own RBAC (a real token of its ServiceAccount) and offers
pool Tasks as it does in production; pool runners are played from the test process with
`tasklease.runner.pool.PoolRunner` and the `tasklease run --worker-group` wrapper, each
authenticated with a real token of the pool ServiceAccount bound to a Pod object of its name
(no kubelet runs those pods: the control plane has none). Writes that skip the runner's JSON
Patch `test` fence play a rogue runner: only the policies stand in their way.

The chart is installed once for the module into its own namespace, watching only it, with
its policies bound to it alone; `helm uninstall` removes the cluster-scoped objects.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tasklease.api.models import (
    CLAIMABLE_LABEL,
    EPOCH_ANNOTATION,
    GROUP,
    HOLDER_ANNOTATION,
    PLURAL,
    POOL_RUNNER_ROLE,
    ROLE_LABEL,
    VERSION,
    WORKER_GROUP_LABEL,
)
from tasklease.api.times import rfc3339_micro
from tasklease.controlplane.process import die_with_parent
from tasklease.runner.pool import PoolRunner, claim_patch, release_patch
from tests.integration.chart_support import (
    CHART,
    POOL_RUNNER_SA,
    RUNNER_SA,
    ChartInstaller,
    ChartSetup,
    Helm,
    message,
    patch_status,
    progress,
    runner_pod,
    scoped_values,
    service_account_token,
    token_client,
    write_token_kubeconfig,
)
from tests.integration.support import OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

JSON_PATCH = "application/json-patch+json"
# The worker group of the chart's pool Deployment in this module's release.
DEPLOYED_GROUP = "etl"
# What the Deployment's pods run for each claimed task (with the default command).
PROGRAM = [
    "sh",
    "-c",
    'printf "1/1\\ndone with %s\\n" "$TASKLEASE_TASK" > "$TASKLEASE_PROGRESS_FILE"',
]
# What the operator's log must never say when its RBAC is right (as in test_chart.py).
FORBIDDEN = re.compile(r"(?<![,\d])403(?!\d)|[Ff]orbidden|[Nn]ot enough permissions")


# The pool tasks' timings: long enough for a test to claim, check and release at leisure.
TIMINGS = {"ackTimeout": "30s", "reportProgressTimeout": "60s"}


def pool_values(namespace: str, **pools: Any) -> dict[str, Any]:
    return scoped_values(namespace, pools={"enabled": True, **pools})


# --- rendering ------------------------------------------------------------------------------


def _groups(second: str) -> list[dict[str, Any]]:
    return [
        {"name": "etl", "args": PROGRAM},
        {
            "name": "gpu",
            "namespace": second,
            "replicas": 3,
            "image": "registry.example/embedder:1.4",
            "command": ["/opt/embedder/run-pool"],
            "args": ["--shards", "8"],
            "resources": {"limits": {"memory": "2Gi"}},
            "env": [{"name": "MODEL", "value": "small"}],
            "nodeSelector": {"accelerator": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "podLabels": {"team": "ml", ROLE_LABEL: "not-this"},
            "podAnnotations": {"example.com/owner": "ml"},
            "terminationGracePeriodSeconds": 120,
        },
    ]


def test_pool_deployments_render_and_apply_with_server_side_dry_run(
    helm: Helm, kubectl: Any, namespace: str, second_namespace: str, tmp_path: Path
) -> None:
    values = {
        "watchNamespaces": [namespace, second_namespace],
        "pools": {"enabled": True, "groups": _groups(second_namespace)},
    }
    docs = helm.template("pooled", namespace, values, tmp_path)
    deployments = {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "pool-runner"
    }
    assert set(deployments) == {"pooled-tasklease-pool-etl", "pooled-tasklease-pool-gpu"}

    etl = deployments["pooled-tasklease-pool-etl"]
    assert etl["metadata"]["namespace"] == namespace  # the release namespace by default
    assert etl["spec"]["replicas"] == 1
    template = etl["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert labels[ROLE_LABEL] == POOL_RUNNER_ROLE
    assert labels[WORKER_GROUP_LABEL] == "etl"
    assert etl["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = template["spec"]
    assert pod["serviceAccountName"] == POOL_RUNNER_SA
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == "tasklease:0.1.0"  # the chart's image
    assert container["command"] == ["tasklease", "run", "--worker-group", "etl", "--"]
    assert container["args"] == PROGRAM
    env = {e["name"]: e for e in container["env"]}
    assert env["TASKLEASE_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["TASKLEASE_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert "resources" not in container

    gpu = deployments["pooled-tasklease-pool-gpu"]
    assert gpu["metadata"]["namespace"] == second_namespace
    assert gpu["spec"]["replicas"] == 3
    pod = gpu["spec"]["template"]["spec"]
    labels = gpu["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "ml"
    assert labels[ROLE_LABEL] == POOL_RUNNER_ROLE, "podLabels may not replace the role label"
    assert gpu["spec"]["template"]["metadata"]["annotations"] == {"example.com/owner": "ml"}
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["nodeSelector"] == {"accelerator": "gpu"}
    assert pod["tolerations"][0]["key"] == "gpu"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/embedder:1.4"
    assert container["command"] == ["/opt/embedder/run-pool"]
    assert container["args"] == ["--shards", "8"]
    assert container["resources"] == {"limits": {"memory": "2Gi"}}
    assert [e["name"] for e in container["env"]] == [
        "TASKLEASE_POD_NAME",
        "TASKLEASE_NAMESPACE",
        "MODEL",
    ]

    # The pool ServiceAccount, Role and binding in each runner namespace; two more policies.
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        found = {
            d["metadata"]["namespace"]
            for d in docs
            if d["kind"] == kind
            and d["metadata"]["name"] in (POOL_RUNNER_SA, "pooled-tasklease-pool-runner")
        }
        assert found == {namespace, second_namespace}, kind
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    assert {"pooled-tasklease-pool-claims", "pooled-tasklease-pool-runner-leases"} <= policies

    applied = kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert len(applied.stdout.strip().splitlines()) == len(docs), applied.stdout


def test_pools_are_off_by_default(helm: Helm, tmp_path: Path) -> None:
    docs = helm.template("plain", "ops", {}, tmp_path)
    names = {d["metadata"]["name"] for d in docs}
    assert not {n for n in names if "pool" in n}, names


@pytest.mark.parametrize("pools", [False, True], ids=["without-pools", "with-pools"])
def test_helm_lint_strict(helm: Helm, tmp_path: Path, pools: bool) -> None:
    values = pool_values("team-a", groups=_groups("team-b")) if pools else {}
    if pools:
        values["watchNamespaces"] = ["team-a", "team-b"]
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    linted = helm(
        "lint", "--strict", str(CHART), "--namespace", "team-a", "-f", str(values_file), check=False
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "0 chart(s) failed" in linted.stdout
    # helm lint reports a template's `fail` as a mere [INFO]: render for real too.
    helm("template", "x", str(CHART), "--namespace", "team-a", "-f", str(values_file))


def test_pool_values_are_checked(helm: Helm, tmp_path: Path) -> None:
    group = {"name": "etl", "args": ["true"]}
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "groups without pools": (
            {"pools": {"groups": [group]}},
            "pools.groups needs pools.enabled: true",
        ),
        "the runners' ServiceAccount": (
            {"pools": {"enabled": True, "serviceAccount": {"name": RUNNER_SA}}},
            "pools.serviceAccount.name must differ from runner.serviceAccount.name",
        ),
        "not a runner namespace": (
            {"pools": {"enabled": True, "groups": [{**group, "namespace": "elsewhere"}]}},
            "runs in namespace elsewhere, which is not a runner namespace (ops)",
        ),
        "a group twice": (
            {"pools": {"enabled": True, "groups": [group, group]}},
            "worker group etl is listed twice for namespace ops",
        ),
        "no program": (
            {"pools": {"enabled": True, "groups": [{"name": "etl"}]}},
            "pools.groups[0] (etl): set args",
        ),
        "a bad group name": (
            {"pools": {"enabled": True, "groups": [{**group, "name": "GPU_1"}]}},
            "/pools/groups/0/name",
        ),
        "an unknown group key": (
            {"pools": {"enabled": True, "groups": [{**group, "cmd": ["x"]}]}},
            "additional properties 'cmd' not allowed",
        ),
    }
    for case, (values, expected) in cases.items():
        values_file = tmp_path / "bad.yaml"
        values_file.write_text(yaml.safe_dump(values))
        rendered = helm(
            "template", "x", str(CHART), "--namespace", "ops", "-f", str(values_file), check=False
        )
        assert rendered.returncode != 0, f"{case}: accepted"
        assert expected in rendered.stderr, f"{case}: {rendered.stderr}"


# --- the chart installed, the operator running under it -------------------------------------


@dataclass
class Setup(ChartSetup):
    operator: OperatorProcess = field(init=False)  # under the chart's RBAC
    pods: dict[str, Any] = field(default_factory=dict)  # pool runner pods, by name

    @property
    def deployment(self) -> dict[str, Any]:
        (found,) = (
            d
            for d in self.release.documents
            if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-pool-etl")
        )
        return found

    def pods_for(self, test: str) -> tuple[str, str]:
        """Two pool runner pods of one test's own (a runner's name is its identity to the
        operator, so tests do not share them): a pod of the chart's pool Deployment and a
        hand-made one."""
        first, second = f"{test}-a", f"{test}-b"
        self.pool_pod(first)
        self.other_pool_pod(second)
        return first, second

    def pool_pod(self, name: str) -> Any:
        """A pod of the chart's pool Deployment, as its ReplicaSet would make it (nothing
        runs it: there is no kubelet)."""
        if name not in self.pods:
            template = copy.deepcopy(self.deployment["spec"]["template"])
            template["metadata"]["name"] = name
            self.pods[name] = self.cluster.core.create_namespaced_pod(self.namespace, template)
        return self.pods[name]

    def other_pool_pod(self, name: str) -> Any:
        """A hand-made pool runner pod (the pool ServiceAccount and role label only)."""
        if name not in self.pods:
            self.pods[name] = runner_pod(
                self.cluster.core,
                self.namespace,
                name,
                service_account=POOL_RUNNER_SA,
                labels={ROLE_LABEL: POOL_RUNNER_ROLE},
            )
        return self.pods[name]

    def token(self, pod: str | None) -> str:
        bound = self.pods[pod] if pod is not None else None
        return service_account_token(self.cluster.core, self.namespace, POOL_RUNNER_SA, pod=bound)

    def as_pod(self, pod: str | None) -> client.ApiClient:
        """The pool ServiceAccount with a token bound to `pod` (None: not bound)."""
        return token_client(self.control_plane, self.token(pod))

    def runner(self, pod: str, group: str, **kwargs: Any) -> PoolRunner:
        return PoolRunner(
            group, namespace=self.namespace, pod_name=pod, api_client=self.as_pod(pod), **kwargs
        )

    def create_task(self, name: str, group: str, **spec: Any) -> None:
        self.cluster.create_pool_task(name, group, **{**TIMINGS, **spec})


def patch_task(
    api: client.ApiClient, namespace: str, name: str, body: Any, *, json_patch: bool = True
) -> ApiException | None:
    """A write to the Task itself (not its status); returns the refusal, or None."""
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            body,
            _content_type=JSON_PATCH if json_patch else "application/merge-patch+json",
        )
    except ApiException as error:
        return error
    return None


def unfenced_claim(epoch: int, holder: str) -> list[dict[str, Any]]:
    """What a rogue runner would send to take a task at `epoch`: no `test` ops, and no
    removal of a claimable label that may not be there (which would fail the patch itself)."""
    return [
        {"op": "add", "path": _pointer(HOLDER_ANNOTATION), "value": holder},
        {"op": "replace", "path": _pointer(EPOCH_ANNOTATION), "value": str(epoch + 1)},
    ]


def _pointer(key: str, base: str = "/metadata/annotations/") -> str:
    return base + key.replace("~", "~0").replace("/", "~1")


def _now() -> str:
    return rfc3339_micro(datetime.now(UTC))


def _epoch(task: dict[str, Any]) -> int:
    return int(task["metadata"]["annotations"][EPOCH_ANNOTATION])


@pytest.fixture(scope="module")
def setup(chart_installer: ChartInstaller) -> Iterator[Setup]:
    with chart_installer.install(
        Setup,
        prefix="pools",
        values=lambda ns: pool_values(ns, groups=[{"name": DEPLOYED_GROUP, "args": PROGRAM}]),
    ) as ready:
        assert "Worker pools: pool runners run as ServiceAccount" in ready.release.notes
        sa = ready.release.operator_sa
        token = service_account_token(ready.cluster.core, ready.namespace, sa)
        kubeconfig = write_token_kubeconfig(
            ready.tmp / "operator.kubeconfig", ready.control_plane, token, sa
        )
        ready.operator = operator = OperatorProcess(
            kubeconfig=kubeconfig, namespace=ready.namespace, log_path=ready.tmp / "operator.log"
        ).start()
        try:
            _wait_until_policies_are_active(ready)
            yield ready
        finally:
            alive = operator.alive
            operator.stop()
            if not alive:
                print(f"--- operator log (DEAD) ---\n{operator.log()[-6000:]}")


def _wait_until_policies_are_active(setup: Setup) -> None:
    """New policies take a moment to be enforced: poll until known-bad writes are refused
    (each probe write differs from the last, so none is a no-op)."""
    ns = setup.namespace
    _, intruder_pod = setup.pods_for("probe")
    setup.create_task("probe", "probe")
    setup.cluster.wait_offered("probe")
    intruder = setup.as_pod(intruder_pod)
    count = itertools.count(1)

    def annotation() -> dict[str, Any]:
        return {"metadata": {"annotations": {"example.com/probe": str(next(count))}}}

    wait_for(
        "the pool-claims policy to refuse an annotation write",
        lambda: patch_task(intruder, ns, "probe", annotation(), json_patch=False) is not None,
        timeout=60,
    )
    wait_for(
        "the fencing policy to refuse a status write to an unheld task",
        lambda: (
            patch_status(intruder, ns, "probe", {"progress": progress(next(count))}) is not None
        ),
        timeout=60,
    )
    wait_for(
        "the status-fields policy to refuse an attempt write",
        lambda: patch_status(intruder, ns, "probe", {"attempt": 100 + next(count)}) is not None,
        timeout=60,
    )
    leases = client.CoordinationV1Api(intruder)

    def lease_refused() -> bool:
        body = {"metadata": {"name": "not-mine", "labels": {ROLE_LABEL: POOL_RUNNER_ROLE}}}
        try:
            leases.create_namespaced_lease(ns, body)
        except ApiException as error:
            return bool(error.status == 403)
        client.CoordinationV1Api(setup.admin).delete_namespaced_lease("not-mine", ns)
        return False

    wait_for("the runner-leases policy to refuse another pod's Lease", lease_refused, timeout=60)
    setup.cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "probe")


def _group() -> str:
    """A worker group of one test's own: earlier tests' leftovers are never claimed."""
    return f"g-{secrets.token_hex(3)}"


# --- RBAC -----------------------------------------------------------------------------------


def test_pool_runner_rbac_is_least_privilege(setup: Setup) -> None:
    pool = setup.release.pool_runner_user()
    ns, other = setup.namespace, setup.other_namespace

    allowed = [
        ("get", "tasks.tasklease.io"),
        ("list", "tasks.tasklease.io"),
        ("watch", "tasks.tasklease.io"),
        ("patch", "tasks.tasklease.io"),
        ("patch", "tasks.tasklease.io/status"),
        ("create", "leases.coordination.k8s.io"),
        ("get", "leases.coordination.k8s.io"),
        ("patch", "leases.coordination.k8s.io"),
        ("delete", "leases.coordination.k8s.io"),
    ]
    for verb, resource in allowed:
        assert setup.can_i(pool, verb, resource, ns), f"{verb} {resource}"
        assert not setup.can_i(pool, verb, resource, other), f"{verb} {resource} elsewhere"
    refused = [
        ("create", "tasks.tasklease.io"),
        ("update", "tasks.tasklease.io"),
        ("delete", "tasks.tasklease.io"),
        ("deletecollection", "tasks.tasklease.io"),
        ("update", "tasks.tasklease.io/status"),
        ("list", "leases.coordination.k8s.io"),
        ("watch", "leases.coordination.k8s.io"),
        ("update", "leases.coordination.k8s.io"),
        ("deletecollection", "leases.coordination.k8s.io"),
        ("get", "pods"),
        ("create", "pods"),
        ("delete", "pods"),
        ("create", "pods/exec"),
        ("get", "configmaps"),
        ("get", "secrets"),
        ("create", "events"),
        ("create", "serviceaccounts/token"),
    ]
    for verb, resource in refused:
        assert not setup.can_i(pool, verb, resource, ns), f"{verb} {resource}"
    assert not setup.can_i(pool, "list", "tasks.tasklease.io")  # nothing cluster-wide
    assert not setup.can_i(pool, "list", "namespaces")
    # The pool Role is not the runners': a runner of a pod per attempt still may not patch
    # Tasks or touch Leases.
    runner = setup.release.runner_user()
    assert not setup.can_i(runner, "patch", "tasks.tasklease.io", ns)
    assert not setup.can_i(runner, "create", "leases.coordination.k8s.io", ns)


def test_pool_runner_rbac_holds_for_real_requests(setup: Setup) -> None:
    """With the token a pool runner pod really has: what it needs works, the rest is 403."""
    pod_a, pod_b = setup.pods_for("rbac")
    ns, other = setup.namespace, setup.other_namespace
    group = _group()
    setup.create_task("rbac-real", group)
    offered = setup.cluster.wait_offered("rbac-real")
    api = setup.as_pod(pod_a)
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    leases = client.CoordinationV1Api(api)

    # Allowed: find claimable tasks, read one, claim it, report, keep its own Lease.
    selector = f"{WORKER_GROUP_LABEL}={group},{CLAIMABLE_LABEL}=true"
    listed = custom.list_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, label_selector=selector
    )
    assert [t["metadata"]["name"] for t in listed["items"]] == ["rbac-real"]
    assert custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "rbac-real")
    epoch = _epoch(offered)
    claim = claim_patch(epoch=epoch, holder=pod_a, acquire_time=_now())
    assert patch_task(api, ns, "rbac-real", claim) is None
    assert patch_status(api, ns, "rbac-real", {"progress": progress(epoch + 1)}) is None
    assert patch_task(api, ns, "rbac-real", release_patch(epoch=epoch + 1, holder=pod_a)) is None
    setup.cluster.wait_offered("rbac-real")
    # (The Lease is named after the pod: deleting it tells the operator the runner is gone.)
    lease = {
        "metadata": {"name": pod_a, "labels": {ROLE_LABEL: POOL_RUNNER_ROLE}},
        "spec": {"holderIdentity": pod_a, "leaseDurationSeconds": 15},
    }
    leases.create_namespaced_lease(ns, lease)
    assert leases.read_namespaced_lease(pod_a, ns).spec.holder_identity == pod_a
    leases.patch_namespaced_lease(pod_a, ns, {"spec": {"leaseDurationSeconds": 20}})
    leases.delete_namespaced_lease(pod_a, ns)

    task_body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Task", "metadata": {"name": "x"}}
    refused: dict[str, Any] = {
        "create a task": lambda: custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, task_body
        ),
        "delete a task": lambda: custom.delete_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "rbac-real"
        ),
        "replace a task": lambda: custom.replace_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "rbac-real", setup.cluster.task("rbac-real")
        ),
        "get pods": lambda: core.read_namespaced_pod(pod_a, ns),
        "create pods": lambda: core.create_namespaced_pod(
            ns,
            {"metadata": {"name": "sneaky"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
        ),
        "delete pods": lambda: core.delete_namespaced_pod(pod_b, ns),
        "list configmaps": lambda: core.list_namespaced_config_map(ns),
        "list leases": lambda: leases.list_namespaced_lease(ns),
        "list another namespace's tasks": lambda: custom.list_namespaced_custom_object(
            GROUP, VERSION, other, PLURAL
        ),
        "create a Lease in another namespace": lambda: leases.create_namespaced_lease(other, lease),
    }
    for what, request in refused.items():
        with pytest.raises(ApiException) as caught:
            request()
        assert caught.value.status == 403, f"{what}: {caught.value.status} {caught.value.reason}"


# --- the claims policy ----------------------------------------------------------------------


def test_admission_allows_pool_claim_for_itself_and_release(setup: Setup) -> None:
    """The real pool flow through every policy: the operator offers, PoolRunner claims with
    its pod's token, acknowledges, reports and releases; another runner claims the task at
    the next epoch and carries it to Succeeded."""
    pod_a, pod_b = setup.pods_for("flow")
    group = _group()
    setup.create_task("handed-back", group, parameters={"shard": "3"})
    setup.cluster.wait_offered("handed-back")

    with setup.runner(pod_b, group) as first:
        task = first.poll_for_task(timeout_s=15)
        assert task is not None and task.epoch == 1
        assert task.parameters == {"shard": "3"}
        annotations = setup.cluster.annotations("handed-back")
        assert annotations[HOLDER_ANNOTATION] == pod_b
        assert annotations[EPOCH_ANNOTATION] == "1"
        task.start()  # the acknowledgement: a fenced status patch
        setup.cluster.wait_phase("handed-back", "Running")
        assert task.progress(percent=30, checkpoint={"row": 30})
        assert first.release(task)  # gives it back, through the policy
    back = setup.cluster.wait_offered("handed-back")
    assert back["status"]["attempts"][0]["outcome"] == "Released"
    assert back["status"]["attempts"][0]["holder"] == pod_b

    with setup.runner(pod_a, group) as second:
        task = second.poll_for_task(timeout_s=15)
        assert task is not None and task.epoch == 2
        assert task.checkpoint == {"row": 30}
        with task:
            assert task.progress(percent=100, message="done")
        assert not task.lost, task.cancel_reason
    status = setup.cluster.wait_phase("handed-back", "Succeeded")
    assert [a["holder"] for a in status["attempts"]] == [pod_b, pod_a]
    assert status["result"]["epoch"] == 2


def test_chart_pool_pod_runs_tasks_under_the_policies(setup: Setup) -> None:
    """The Deployment's own container command and environment (the downward API resolved as
    a kubelet would), with its pod's bound token: it claims, runs the program, reports the
    result, and on SIGTERM stops and deletes its runner Lease."""
    pod_a, _ = setup.pods_for("deployed")
    pod = setup.pods[pod_a]
    container = pod.spec.containers[0]
    env = {
        item.name: (
            getattr(pod.metadata, item.value_from.field_ref.field_path.split(".")[1])
            if item.value_from is not None
            else item.value
        )
        for item in container.env
    }
    assert env == {"TASKLEASE_POD_NAME": pod_a, "TASKLEASE_NAMESPACE": setup.namespace}
    argv = [*container.command, *container.args]
    assert argv[:5] == ["tasklease", "run", "--worker-group", DEPLOYED_GROUP, "--"]
    # A short long poll: an idle runner notices SIGTERM only when its poll's watch returns
    # (after up to 30 s with the default --poll-timeout of 90).
    argv[4:4] = ["--poll-timeout", "3"]
    kubeconfig = write_token_kubeconfig(
        setup.tmp / f"{pod_a}.kubeconfig", setup.control_plane, setup.token(pod_a), pod_a
    )
    setup.create_task("wrapped", DEPLOYED_GROUP)
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "tasklease", *argv[1:]],
        env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=die_with_parent(os.getpid()),
    )
    try:
        status = setup.cluster.wait_phase("wrapped", "Succeeded", timeout=60)
        assert status["attempts"][-1]["holder"] == pod_a
        assert status["progress"]["message"] == "done with wrapped"
        leases = client.CoordinationV1Api(setup.admin)
        assert leases.read_namespaced_lease(pod_a, setup.namespace).spec.holder_identity == (pod_a)
        wrapper.send_signal(signal.SIGTERM)  # the pod is being deleted
        output, _ = wrapper.communicate(timeout=30)
        assert wrapper.returncode == 0, output
        assert "Forbidden" not in output, output
        with pytest.raises(ApiException) as gone:
            leases.read_namespaced_lease(pod_a, setup.namespace)
        assert gone.value.status == 404
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            print(wrapper.communicate()[0])


def test_admission_refuses_claim_for_another_pod(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    pod_a, pod_b = setup.pods_for("other")
    group = _group()
    setup.create_task("not-yours", group)
    epoch = _epoch(setup.cluster.wait_offered("not-yours"))
    ns = setup.namespace

    # pool-b claims for pool-a, with the fence (so only the policy refuses it).
    claim = claim_patch(epoch=epoch, holder=pod_a, acquire_time=_now())
    refusal = patch_task(setup.as_pod(pod_b), ns, "not-yours", claim)
    assert refusal is not None and refusal.status == 403
    text = message(refusal)
    assert (
        f"pool runner pod {pod_b} may claim task not-yours only for itself, not for pod "
        f"{pod_a} (rule: claim for itself)"
    ) in text, text
    assert "ValidatingAdmissionPolicy" in text and "-pool-claims" in text

    # A PoolRunner told the wrong pod name (TASKLEASE_POD_NAME not its own) claims nothing:
    # a 403 may pass (an API server restarting), so it is not a crash, but it says why.
    impostor = PoolRunner(
        group, namespace=ns, pod_name=pod_a, api_client=setup.as_pod(pod_b), renew_interval_s=60
    )
    with caplog.at_level(logging.WARNING, logger="tasklease.runner.pool"):
        assert impostor._claim(setup.cluster.task("not-yours")) is None
    assert "may claim task not-yours only for itself" in caplog.text, caplog.text
    assert _epoch(setup.cluster.task("not-yours")) == epoch  # still on offer

    # A token not bound to a pod claims for no one.
    refusal = patch_task(setup.as_pod(None), ns, "not-yours", claim)
    assert refusal is not None and refusal.status == 403
    assert (
        f"{setup.release.pool_runner_user()} (its token is not bound to a pod) may not write "
        "task not-yours"
    ) in message(refusal)

    task = setup.cluster.wait_offered("not-yours")  # still offered, still unheld, same epoch
    assert _epoch(task) == epoch


def test_admission_refuses_claim_of_held_task(setup: Setup) -> None:
    pod_a, pod_b = setup.pods_for("held")
    group = _group()
    setup.create_task("taken", group)
    offered = setup.cluster.wait_offered("taken")
    ns = setup.namespace
    with setup.runner(pod_a, group) as holder:
        task = holder.poll_for_task(timeout_s=15)
        assert task is not None
        with task:
            # An honest runner that saw the same offer loses on the fence, before admission.
            honest = setup.runner(pod_b, group)
            assert honest._claim(offered) is None
            # A rogue one skips the fence: the policy refuses to take the task over...
            rogue = setup.as_pod(pod_b)
            refusal = patch_task(rogue, ns, "taken", unfenced_claim(task.epoch, pod_b))
            assert refusal is not None and refusal.status == 403
            text = message(refusal)
            assert (
                f"task taken is held by pod {pod_a} (epoch {task.epoch}): pool runner pod "
                f"{pod_b} may neither claim a held task nor release a task its pod does not "
                "hold (rule: holder only)"
            ) in text, text
            # ... and to release it on the holder's behalf.
            release = release_patch(epoch=task.epoch, holder=pod_a)
            refusal = patch_task(rogue, ns, "taken", release)
            assert refusal is not None and refusal.status == 403
            assert "(rule: holder only)" in message(refusal)
            # Nor may the holder hand it to another pod.
            handover = [{"op": "replace", "path": _pointer(HOLDER_ANNOTATION), "value": pod_b}]
            refusal = patch_task(setup.as_pod(pod_a), ns, "taken", handover)
            assert refusal is not None and refusal.status == 403
            assert "(rule: release removes the holder)" in message(refusal)
            assert setup.cluster.annotations("taken")[HOLDER_ANNOTATION] == pod_a
            assert task.progress(percent=100)
        assert not task.lost, task.cancel_reason
    status = setup.cluster.wait_phase("taken", "Succeeded")
    assert [a["holder"] for a in status["attempts"]] == [pod_a]


def test_admission_refuses_pool_runner_changing_spec(setup: Setup) -> None:
    pod_a, pod_b = setup.pods_for("spec")
    group = _group()
    ns = setup.namespace
    setup.create_task("fixed-spec", group, priority=1)
    epoch = _epoch(setup.cluster.wait_offered("fixed-spec"))
    api = setup.as_pod(pod_a)

    # A claim that also changes the spec is refused as a whole.
    sneaky = [
        *claim_patch(epoch=epoch, holder=pod_a, acquire_time=_now()),
        {"op": "replace", "path": "/spec/priority", "value": 99},
    ]
    refusal = patch_task(api, ns, "fixed-spec", sneaky)
    assert refusal is not None and refusal.status == 403
    assert (
        f"pool runner pod {pod_a} may not change the spec of task fixed-spec: a pool runner "
        "only claims and releases tasks (rule: spec unchanged)"
    ) in message(refusal)
    assert setup.cluster.wait_offered("fixed-spec")["spec"]["priority"] == 1

    with setup.runner(pod_a, group) as runner:
        task = runner.poll_for_task(timeout_s=15)
        assert task is not None
        with task:
            # Not even the holder may change the spec, another label or annotation, or the
            # claimable label on its own.
            changes: dict[str, tuple[Any, str]] = {
                "spec": ({"spec": {"parameters": {"shard": "9"}}}, "rule: spec unchanged"),
                "cancel": ({"spec": {"cancel": True}}, "rule: spec unchanged"),
                "worker group": (
                    {"metadata": {"labels": {WORKER_GROUP_LABEL: "elsewhere"}}},
                    "rule: labels unchanged",
                ),
                "annotation": (
                    {"metadata": {"annotations": {"example.com/note": "x"}}},
                    "rule: annotations unchanged",
                ),
                "finalizer": (
                    {"metadata": {"finalizers": ["example.com/keep"]}},
                    "rule: metadata unchanged",
                ),
                "epoch": (
                    {"metadata": {"annotations": {EPOCH_ANNOTATION: str(task.epoch + 5)}}},
                    "rule: release removes the holder",
                ),
            }
            for what, (body, rule) in changes.items():
                refusal = patch_task(api, ns, "fixed-spec", body, json_patch=False)
                assert refusal is not None, f"{what} was admitted"
                assert f"({rule})" in message(refusal), (what, message(refusal))
            # A status write may not forge the operator's part of the status either.
            refusal = patch_status(
                api, ns, "fixed-spec", {"progress": progress(task.epoch), "phase": "Succeeded"}
            )
            assert refusal is not None and refusal.status == 403
            assert "may not change status.phase of task fixed-spec" in message(refusal)
            # Nor may another pool runner write its progress.
            refusal = patch_status(
                setup.as_pod(pod_b), ns, "fixed-spec", {"progress": progress(task.epoch)}
            )
            assert refusal is not None and refusal.status == 403
            assert f"pod {pod_b} does not hold the lease on task fixed-spec" in message(refusal)
            assert task.progress(percent=100)
        assert not task.lost, task.cancel_reason
    status = setup.cluster.wait_phase("fixed-spec", "Succeeded")
    assert status["result"]["epoch"] == task.epoch
    current = setup.cluster.task("fixed-spec")
    assert current["spec"]["priority"] == 1 and not current["spec"]["cancel"]
    assert current["metadata"]["labels"][WORKER_GROUP_LABEL] == group
    assert "finalizers" not in current["metadata"]


def test_admission_refuses_malformed_claims_and_releases(setup: Setup) -> None:
    pod_a, _ = setup.pods_for("malformed")
    group = _group()
    ns = setup.namespace
    setup.create_task("by-the-book", group)
    epoch = _epoch(setup.cluster.wait_offered("by-the-book"))
    api = setup.as_pod(pod_a)
    skipped_epoch = [
        {"op": "add", "path": _pointer(HOLDER_ANNOTATION), "value": pod_a},
        {"op": "replace", "path": _pointer(EPOCH_ANNOTATION), "value": str(epoch + 2)},
        {"op": "remove", "path": _pointer(CLAIMABLE_LABEL, "/metadata/labels/")},
    ]
    kept_label = [
        {"op": "add", "path": _pointer(HOLDER_ANNOTATION), "value": pod_a},
        {"op": "replace", "path": _pointer(EPOCH_ANNOTATION), "value": str(epoch + 1)},
    ]
    for body, rule in ((skipped_epoch, "claim epoch"), (kept_label, "claim removes claimable")):
        refusal = patch_task(api, ns, "by-the-book", body)
        assert refusal is not None and refusal.status == 422
        assert f"(rule: {rule})" in message(refusal), message(refusal)

    claim = claim_patch(epoch=epoch, holder=pod_a, acquire_time=_now())
    assert patch_task(api, ns, "by-the-book", claim) is None
    # A release that also puts the task back on offer (the operator's job) is refused.
    relist = [
        *release_patch(epoch=epoch + 1, holder=pod_a),
        {"op": "add", "path": _pointer(CLAIMABLE_LABEL, "/metadata/labels/"), "value": "true"},
    ]
    refusal = patch_task(api, ns, "by-the-book", relist)
    assert refusal is not None and refusal.status == 422
    assert "(rule: release changes nothing else)" in message(refusal)
    assert patch_task(api, ns, "by-the-book", release_patch(epoch=epoch + 1, holder=pod_a)) is None
    # Back on offer (the operator may not even have seen the short-lived claim).
    assert _epoch(setup.cluster.wait_offered("by-the-book")) == epoch + 1

    with setup.runner(pod_a, group) as runner:
        task = runner.poll_for_task(timeout_s=15)
        assert task is not None and task.epoch == epoch + 2
        with task:
            assert task.progress(percent=100)
    setup.cluster.wait_phase("by-the-book", "Succeeded")

    # A finished task is off the pool (no claimable label): nobody may claim it again.
    def off_the_pool() -> dict[str, Any] | None:
        task = setup.cluster.task("by-the-book")
        metadata = task["metadata"]
        off = CLAIMABLE_LABEL not in metadata["labels"]
        return task if off and HOLDER_ANNOTATION not in metadata["annotations"] else None

    done = wait_for("the finished task to be off the pool", off_the_pool)
    refusal = patch_task(api, ns, "by-the-book", unfenced_claim(_epoch(done), pod_a))
    assert refusal is not None and refusal.status == 403
    assert (
        f"task by-the-book is not offered to the pool (no label tasklease.io/claimable=true): "
        f"pool runner pod {pod_a} may not claim it (rule: claim an offered task)"
    ) in message(refusal)


# --- the runner Lease policy ----------------------------------------------------------------


def test_admission_confines_pool_runners_to_their_own_lease(setup: Setup) -> None:
    pod_a, pod_b = setup.pods_for("lease")
    ns = setup.namespace
    body: dict[str, Any] = {
        "metadata": {"name": pod_a, "labels": {ROLE_LABEL: POOL_RUNNER_ROLE}},
        "spec": {"holderIdentity": pod_a, "leaseDurationSeconds": 15},
    }
    own = client.CoordinationV1Api(setup.as_pod(pod_a))
    other = client.CoordinationV1Api(setup.as_pod(pod_b))
    own.create_namespaced_lease(ns, body)
    try:
        refusals: dict[str, Any] = {
            "renew another pod's Lease": lambda: other.patch_namespaced_lease(
                pod_a, ns, {"spec": {"renewTime": "2030-01-01T00:00:00.000000Z"}}
            ),
            "delete another pod's Lease": lambda: other.delete_namespaced_lease(pod_a, ns),
            "create a Lease not named after its pod": lambda: other.create_namespaced_lease(
                ns, {**body, "metadata": {**body["metadata"], "name": "leader-election"}}
            ),
            "drop the pool-runner label": lambda: own.patch_namespaced_lease(
                pod_a, ns, {"metadata": {"labels": {ROLE_LABEL: "something-else"}}}
            ),
            "hold its Lease for another pod": lambda: own.patch_namespaced_lease(
                pod_a, ns, {"spec": {"holderIdentity": pod_b}}
            ),
        }
        for what, request in refusals.items():
            with pytest.raises(ApiException) as caught:
                request()
            assert caught.value.status == 403, what
            text = str(json.loads(caught.value.body)["message"])
            assert "-pool-runner-leases" in text and "(rule: " in text, (what, text)
        # Its own Lease, as PoolRunner keeps it: renewed and deleted.
        own.patch_namespaced_lease(pod_a, ns, {"spec": {"renewTime": _now()}})
    finally:
        own.delete_namespaced_lease(pod_a, ns)


def test_operator_runs_pools_under_its_rbac(setup: Setup) -> None:
    """After everything above: the operator (the chart's ServiceAccount, real token) offered,
    handed out and ended pool tasks and followed pool runners' Leases without a single 403."""
    assert setup.operator.alive, setup.operator.log()[-4000:]
    lines = [line for line in setup.operator.log().splitlines() if FORBIDDEN.search(line)]
    assert not lines, "\n".join(lines)
