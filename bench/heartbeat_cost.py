"""What a heartbeat costs the API server next to a Lease renewal: `python -m bench.heartbeat_cost`.

Starts the local control plane (profiling on), installs the CRD as the product does
(crds/tasks.tasklease.io.yaml, server-side apply) and, unless `--no-policies`, the chart's
ValidatingAdmissionPolicies (`helm template`, bound to one namespace only). Then one client
keeps `--in-flight` writes in flight, each slot writing its own object (so no write meets a
conflict), `--writes` writes per variant and round, `--rounds` rounds, the variants in
alternating order (forwards, then backwards: a linear drift cancels). Per variant it prints
kube-apiserver + etcd CPU ms per write (utime + stime from /proc, the median of the rounds).

The variants (`--variants` picks some; `lease`, `task_small` and `task` are always run):

- `lease`: a `coordination.k8s.io/v1` Lease renewal, a merge patch of `spec.renewTime`.
- `task`, `task_small`: a heartbeat exactly as the runner SDK sends it (JSON Patch: `test` of
  the epoch and holder annotations, `add /status/progress` with a new reportTime) on a
  realistic Task (a pod template, three attempts, conditions) and on a small one, each as
  the operator's hand-out leaves it: managedFields the operator's and the runner's entries
  (compactManagedFields, the default).
- `task_kept`, `task_small_kept`: the same with every manager's entry kept, the creator's
  (the whole spec) included: a Task applied server-side, or `compactManagedFields: false`.
  The levers below are measured on `task_kept`.
- `*_sa`, `*_sa_policies`: the same as the runner ServiceAccount with a token bound to the
  holder pod (what a runner pod sends), in a namespace the chart's policies do not bind and
  in one they bind. The admin's writes (the rows without `_sa`) never match the policies:
  their matchConditions select service accounts only.
- levers, each on the realistic Task with its entries kept: `task_nocel` (the CRD without
  its CEL rules), `task_schemaless` (the CRD without a schema: preserve-unknown-fields),
  `task_no_attempts` (no attempt history), `task_one_manager` (managedFields emptied before
  the heartbeats, which then hold the runner's entry only; `task_nocel_one_manager` and
  `task_small_one_manager` combine it), `task_merge_rv` (a merge patch of status.progress
  with the resourceVersion the runner last saw as precondition instead of `test`s),
  `task_no_test` (the JSON Patch without its `test`s, not fenced: a reference),
  `task_merge` (merge patch, not fenced), `task_apply` (server-side apply of
  status.progress, not fenced); and the floor of any custom resource,
  `cr_tiny_schemaless`: a schemaless Task holding about what a Lease holds, with the SDK's
  heartbeat.

The last stdout line is one JSON object: `apiserver_cpu_ms_per_heartbeat` (realistic Task),
`apiserver_cpu_ms_per_lease_renewal`, `heartbeat_cost_vs_lease` (their ratio, goal <= 1.5),
the same for the small Task (`..._small`), and `variants`: each variant's CPU ms per write,
its ratio to the Lease and the rounds' figures. With `--profile-dir`, CPU profiles of
kube-apiserver (`/debug/pprof/profile`) are taken while the named variants write
(`--profile-variants`); `go tool pprof -top -cum FILE` reads them.

On a shared machine read the ratios: the absolute figures move from run to run, and a round
in which other processes used the CPU is marked in `others_cores`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

from bench.context import APISERVER, REPO_ROOT, log
from bench.loadgen import (
    JSON_PATCH,
    RUNNER_FIELD_MANAGER,
    Api,
    heartbeat_body,
    heartbeat_prefix,
)
from bench.procstat import MACHINE, find_components, snapshot
from tasklease.api.models import (
    ACQUIRE_TIME_ANNOTATION,
    EPOCH_ANNOTATION,
    GROUP,
    HOLDER_ANNOTATION,
    PLURAL,
    VERSION,
)
from tasklease.api.times import rfc3339_micro
from tasklease.kube.client import FIELD_MANAGER, lease_patch

NAMESPACE: Final = "hb"  # the admin's writes and the runner's without policies; the
# chart's policies bind only NAMESPACE-policy
RUNNER_SA: Final = "tasklease-runner"
HOLDER: Final = "runner-0"  # the pod that holds every Task's lease
EPOCH: Final = 3
MERGE_PATCH: Final = "application/merge-patch+json"
APPLY_PATCH: Final = "application/apply-patch+yaml"
CRD_FILE: Final = REPO_ROOT / "crds" / "tasks.tasklease.io.yaml"
CHART: Final = REPO_ROOT / "charts" / "tasklease"
# CRD variants: the product's CRD under another group, so they live beside it.
NOCEL_GROUP: Final = "nocel.heartbeat-cost.bench"
SCHEMALESS_GROUP: Final = "schemaless.heartbeat-cost.bench"

LEVERS: Final = (
    "task_kept",
    "task_small_kept",
    "task_sa",
    "task_sa_policies",
    "lease_sa",
    "task_nocel",
    "task_schemaless",
    "task_no_attempts",
    "task_one_manager",
    "cr_tiny_schemaless",
    "task_nocel_one_manager",
    "task_small_one_manager",
    "task_merge_rv",
    "task_no_test",
    "task_merge",
    "task_apply",
)
ALWAYS: Final = ("lease", "task_small", "task")
# The figures `summarise` gives, beside the variants (`make bench` reports them too).
FIGURES: Final = (
    "apiserver_cpu_ms_per_heartbeat",
    "apiserver_cpu_ms_per_lease_renewal",
    "heartbeat_cost_vs_lease",
    "apiserver_cpu_ms_per_heartbeat_small",
    "heartbeat_cost_vs_lease_small",
)


# --- objects -------------------------------------------------------------------------------


def _stamp() -> str:
    return rfc3339_micro(datetime.now(UTC))


def task_body(name: str, *, group: str, realistic: bool, attempts: bool = True) -> dict[str, Any]:
    """A Task leased to HOLDER at EPOCH. Realistic: a pod template as users write them
    (command, env, resources, a volume); small: one trivial container."""
    container: dict[str, Any] = {"name": "runner", "image": "busybox", "command": ["sleep", "1"]}
    spec: dict[str, Any] = {
        "ackTimeout": "2m",
        "reportProgressTimeout": "15m",
        "heartbeatInterval": "60s",
    }
    if realistic:
        container = {
            "name": "runner",
            "image": "registry.example/etl:1.4.2",
            "command": ["tasklease", "run", "--grace-period", "30", "--"],
            "args": ["./load-orders.sh", "--day", "2026-11-28", "--region", "eu-west-1"],
            "env": [
                {"name": "LOG_LEVEL", "value": "info"},
                {"name": "WAREHOUSE_URL", "value": "postgres://warehouse.data.svc:5432/orders"},
                {
                    "name": "WAREHOUSE_PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": "warehouse", "key": "password"}},
                },
            ],
            "resources": {
                "requests": {"cpu": "500m", "memory": "512Mi"},
                "limits": {"memory": "1Gi"},
            },
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        }
        spec |= {
            "parameters": {"day": "2026-11-28", "region": "eu-west-1", "table": "orders"},
            "retry": {
                "maxAttempts": 5,
                "backoff": {"initial": "10s", "factor": 2, "max": "5m", "jitter": 0.2},
                "nonRetryableErrors": ["BadInput"],
            },
            "attemptTimeout": "2h",
            "activeDeadline": "6h",
            "lateAfter": "3h",
        }
    template: dict[str, Any] = {"spec": {"containers": [container]}}
    if realistic:
        template["metadata"] = {"labels": {"app": "nightly-orders", "team": "data"}}
        template["spec"] |= {
            "serviceAccountName": RUNNER_SA,
            "restartPolicy": "Never",
            "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "2Gi"}}],
        }
    spec["template"] = template
    return {
        "apiVersion": f"{group}/{VERSION}",
        "kind": "Task",
        "metadata": {
            "name": name,
            "labels": {"app": "nightly-orders"} if realistic else {},
            "annotations": {
                HOLDER_ANNOTATION: HOLDER,
                EPOCH_ANNOTATION: str(EPOCH),
                ACQUIRE_TIME_ANNOTATION: "2026-12-06T10:03:12.123Z",
            },
        },
        "spec": spec,
    }


def operator_status(*, realistic: bool, attempts: bool = True) -> dict[str, Any]:
    """The status as the operator leaves it while a runner heartbeats."""
    status: dict[str, Any] = {
        "phase": "Running",
        "attempt": EPOCH if realistic else 1,
        "epoch": EPOCH,
        "holder": HOLDER,
        "startTime": "2026-12-06T10:00:00Z",
        "observedGeneration": 1,
    }
    if realistic:
        history = [
            {
                "attempt": 1,
                "epoch": 1,
                "holder": "nightly-orders-1-x7k2p",
                "startTime": "2026-12-06T10:00:00Z",
                "endTime": "2026-12-06T10:01:30Z",
                "outcome": "PodFailed",
                "message": "pod nightly-orders-1-x7k2p failed: container runner exited 137 "
                "(OOMKilled) after 90s",
            },
            {
                "attempt": 2,
                "epoch": 2,
                "holder": "nightly-orders-2-q9w4d",
                "startTime": "2026-12-06T10:01:40Z",
                "endTime": "2026-12-06T10:03:10Z",
                "outcome": "ProgressTimeout",
                "message": "no progress report for 15m0s (last report at 2026-12-06T09:48:10Z)",
            },
            {
                "attempt": 3,
                "epoch": 3,
                "holder": HOLDER,
                "startTime": "2026-12-06T10:03:12Z",
            },
        ]
        if attempts:
            status["attempts"] = history
        status["conditions"] = [
            {
                "type": "Leased",
                "status": "True",
                "reason": "Acknowledged",
                "message": f"pod {HOLDER} holds the lease (epoch {EPOCH}) and reports progress",
                "lastTransitionTime": "2026-12-06T10:03:14Z",
                "observedGeneration": 1,
            },
            {
                "type": "Late",
                "status": "False",
                "reason": "OnTime",
                "message": "",
                "lastTransitionTime": "2026-12-06T10:00:00Z",
                "observedGeneration": 1,
            },
        ]
    return status


def crd_variant(group: str, *, schemaless: bool) -> dict[str, Any]:
    """The product's CRD under `group`: without its CEL rules, or without any schema."""
    crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    crd["metadata"] = {"name": f"{PLURAL}.{group}"}
    crd["spec"]["group"] = group
    for version in crd["spec"]["versions"]:
        if schemaless:
            version["schema"] = {
                "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            }
        else:
            _strip_cel(version["schema"])
    return crd


def _strip_cel(node: Any) -> None:
    if isinstance(node, dict):
        node.pop("x-kubernetes-validations", None)
        for value in node.values():
            _strip_cel(value)
    elif isinstance(node, list):
        for value in node:
            _strip_cel(value)


def policy_documents(namespace: str) -> list[dict[str, Any]]:
    """The chart's ValidatingAdmissionPolicies and bindings (`helm template`), bound to
    `namespace` only."""
    from tasklease.controlplane.binaries import obtain_helm

    values = {"watchNamespaces": [namespace], "admissionPolicy": {"warnUnwatchedNamespaces": False}}
    out = subprocess.run(
        [
            *(str(obtain_helm(progress=sys.stderr)), "template", "hb", str(CHART)),
            *("--namespace", namespace, "-f", "/dev/stdin"),
        ],
        input=yaml.safe_dump(values),
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
        | {"HELM_CACHE_HOME": "/tmp/hb-helm", "HELM_CONFIG_HOME": "/tmp/hb-helm"},
    ).stdout
    kinds = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    return [doc for doc in yaml.safe_load_all(out) if doc and doc.get("kind") in kinds]


# --- writers -------------------------------------------------------------------------------


Write = Callable[[int, int], Awaitable[None]]  # (slot, sequence number)


@dataclass(frozen=True)
class Conn:
    """An identity's client and the Accept header of its writes ("" : the client's default,
    JSON; "application/cbor" where the API server serves it)."""

    api: Api
    accept: str = ""

    async def patch(self, url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type}
        if self.accept:
            headers["Accept"] = self.accept
        async with self.api.session.request(
            "PATCH", self.api.server + url, data=body, headers=headers
        ) as response:
            return response.status, await response.read()


@dataclass
class Variant:
    name: str
    write: Write
    paths: list[str]  # each slot's object (GET path), for its size
    fenced: bool = True


def _check(status: int, what: str, data: bytes = b"") -> None:
    if status >= 300:
        raise RuntimeError(f"{what}: HTTP {status} {data[:300]!r}")


def sdk_heartbeat(conn: Conn, paths: list[str], *, fence: bool = True) -> Write:
    """The SDK's write: a JSON Patch testing epoch and holder, then adding status.progress."""
    prefix = heartbeat_prefix(EPOCH, HOLDER)
    if not fence:
        prefix = b'[{"op":"add","path":"/status/progress","value":{"epoch":%d,"percent":' % EPOCH
    urls = [f"{path}/status?fieldManager={RUNNER_FIELD_MANAGER}" for path in paths]

    async def write(slot: int, n: int) -> None:
        body = heartbeat_body(prefix, n % 100, _stamp())
        status, data = await conn.patch(urls[slot], body, JSON_PATCH)
        _check(status, "heartbeat", data)

    return write


def merge_heartbeat(conn: Conn, paths: list[str], *, precondition: bool) -> Write:
    """A merge patch of status.progress; with `precondition`, carrying the resourceVersion of
    the runner's last answer (409 when anything changed since: the runner then reads the
    Task and goes on only if epoch and holder are still its own)."""
    urls = [f"{path}/status?fieldManager={RUNNER_FIELD_MANAGER}" for path in paths]
    versions: dict[int, str] = {}

    async def write(slot: int, n: int) -> None:
        patch: dict[str, Any] = {
            "status": {"progress": {"epoch": EPOCH, "percent": n % 100, "reportTime": _stamp()}}
        }
        if precondition:
            if slot not in versions:
                found = await conn.api.get_json(paths[slot])
                versions[slot] = found["metadata"]["resourceVersion"]
            patch["metadata"] = {"resourceVersion": versions[slot]}
        status, data = await conn.patch(urls[slot], json.dumps(patch).encode(), MERGE_PATCH)
        _check(status, "merge heartbeat", data)
        if precondition:  # the runner reads its answer as the SDK does (epoch, cancel)
            versions[slot] = _answer(data, conn.accept)["metadata"]["resourceVersion"]

    return write


def apply_heartbeat(conn: Conn, paths: list[str], *, group: str) -> Write:
    urls = [f"{path}/status?fieldManager={RUNNER_FIELD_MANAGER}&force=true" for path in paths]

    async def write(slot: int, n: int) -> None:
        body = {
            "apiVersion": f"{group}/{VERSION}",
            "kind": "Task",
            "metadata": {"name": paths[slot].rsplit("/", 1)[1]},
            "status": {"progress": {"epoch": EPOCH, "percent": n % 100, "reportTime": _stamp()}},
        }
        status, data = await conn.patch(urls[slot], json.dumps(body).encode(), APPLY_PATCH)
        _check(status, "apply heartbeat", data)

    return write


def lease_renewal(conn: Conn, paths: list[str]) -> Write:
    urls = [f"{path}?fieldManager={RUNNER_FIELD_MANAGER}" for path in paths]

    async def write(slot: int, n: int) -> None:
        body = b'{"spec":{"renewTime":"%s"}}' % _stamp().encode()
        status, data = await conn.patch(urls[slot], body, MERGE_PATCH)
        _check(status, "lease renewal", data)

    return write


# --- set-up --------------------------------------------------------------------------------


@dataclass
class Cluster:
    plane: Any  # tasklease.controlplane.ControlPlane
    admin: Api
    runners: list[Api] = field(default_factory=list)  # the holder pods' clients, to close


async def post_json(api: Api, path: str, body: dict[str, Any], query: str = "") -> dict[str, Any]:
    status, data = await api.call("POST", path + query, json.dumps(body).encode())
    _check(status, f"POST {path}", data)
    result: dict[str, Any] = json.loads(data)
    return result


async def make_tasks(
    api: Api, *, group: str, namespace: str, prefix: str, count: int, **shape: bool
) -> list[str]:
    paths = []
    realistic = shape.get("realistic", True)
    attempts = shape.get("attempts", True)
    for index in range(count):
        name = f"{prefix}-{index}"
        base = f"/apis/{group}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        body = task_body(name, group=group, realistic=realistic, attempts=attempts)
        status = operator_status(realistic=realistic, attempts=attempts)
        if shape.get("tiny", False):  # a Lease's worth of content (schemaless CRD only)
            body["spec"] = {"holderIdentity": HOLDER, "leaseDurationSeconds": 40}
            status = {"epoch": EPOCH}
        await post_json(api, base, body, "?fieldManager=kubectl-create")
        path = f"{base}/{name}"
        await _operator_status(api, path, status)
        if shape.get("handed_out", False):
            # The operator's hand-out as it writes it (compactManagedFields, the default):
            # the lease annotations, managedFields its own entry for them; then its status
            # write again, as the hand-out's bookkeeping follows.
            patch = lease_patch(
                body["metadata"]["annotations"], compact_managed_fields=True, group=group
            )
            code, data = await api.call(
                "PATCH",
                f"{path}?fieldManager={FIELD_MANAGER}",
                json.dumps(patch).encode(),
                content_type=MERGE_PATCH,
            )
            _check(code, "hand-out", data)
            await _operator_status(api, path, status)
        if shape.get("strip_managed_fields", False):
            # `managedFields: [{}]` empties the list; the heartbeats then add one entry.
            code, data = await api.call(
                "PATCH",
                path,
                b'{"metadata":{"managedFields":[{}]}}',
                content_type=MERGE_PATCH,
            )
            _check(code, "managedFields reset", data)
        paths.append(path)
    return paths


async def _operator_status(api: Api, path: str, status: dict[str, Any]) -> None:
    """The operator's status, as its own field manager writes it."""
    code, data = await api.call(
        "PATCH",
        f"{path}/status?fieldManager={FIELD_MANAGER}",
        json.dumps({"status": status}).encode(),
        content_type=MERGE_PATCH,
    )
    _check(code, "operator status", data)


async def _make_leases(api: Api, namespace: str, prefix: str, count: int) -> list[str]:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    for index in range(count):
        body = {
            "metadata": {"name": f"{prefix}-{index}"},
            "spec": {
                "holderIdentity": HOLDER,
                "leaseDurationSeconds": 40,
                "acquireTime": _stamp(),
                "renewTime": _stamp(),
            },
        }
        await post_json(api, base, body)
    return [f"{base}/{prefix}-{index}" for index in range(count)]


async def _runner_identity(cluster: Cluster, namespace: str) -> Api:
    """The runner ServiceAccount in `namespace` with the chart's runner RBAC (plus Leases,
    for the comparison), the holder pod, and a token bound to it."""
    admin, plane = cluster.admin, cluster.plane
    await post_json(admin, f"/api/v1/namespaces/{namespace}/serviceaccounts", {
        "metadata": {"name": RUNNER_SA}
    })  # fmt: skip
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    rules = [
        {"apiGroups": [GROUP], "resources": ["tasks"], "verbs": ["get", "watch"]},
        {"apiGroups": [GROUP], "resources": ["tasks/status"], "verbs": ["get", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "patch"]},
    ]
    await post_json(admin, f"{rbac}/roles", {"metadata": {"name": "runner"}, "rules": rules})
    await post_json(admin, f"{rbac}/rolebindings", {
        "metadata": {"name": "runner"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "runner"},
        "subjects": [{"kind": "ServiceAccount", "name": RUNNER_SA, "namespace": namespace}],
    })  # fmt: skip
    pod = await post_json(admin, f"/api/v1/namespaces/{namespace}/pods", {
        "metadata": {"name": HOLDER},
        "spec": {
            "serviceAccountName": RUNNER_SA,
            "restartPolicy": "Never",
            "containers": [{"name": "runner", "image": "busybox", "command": ["true"]}],
        },
    })  # fmt: skip
    bound = {"kind": "Pod", "apiVersion": "v1", "name": HOLDER, "uid": pod["metadata"]["uid"]}
    request = {"spec": {"expirationSeconds": 7200, "boundObjectRef": bound}}
    for _ in range(100):  # the ServiceAccount may take a moment to be visible to TokenRequest
        code, data = await admin.call(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{RUNNER_SA}/token",
            json.dumps(request).encode(),
        )
        if code < 300:
            break
        await asyncio.sleep(0.1)
    _check(code, "TokenRequest", data)
    token = json.loads(data)["status"]["token"]
    api = await Api(plane.server, ca=plane.admin_ca, token=token, connections=32).__aenter__()
    cluster.runners.append(api)
    return api


async def _wait_for_policies(runner: Api, path: str) -> None:
    """Until the fencing policy refuses a stale-epoch write (a new policy takes a moment)."""
    body = json.dumps({"status": {"progress": {"epoch": EPOCH + 7}}}).encode()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _ = await runner.call("PATCH", f"{path}/status", body, content_type=MERGE_PATCH)
        if status in (403, 422):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the chart's admission policies never refused a stale-epoch write")


async def build_variants(
    cluster: Cluster,
    wanted: set[str],
    *,
    in_flight: int,
    policies: bool,
    accept: str,
    namespace: str,
) -> list[Variant]:
    plane, admin = cluster.plane, cluster.admin
    policy_namespace = f"{namespace}-policy"
    as_admin = Conn(admin, accept)
    for name in (namespace, policy_namespace):
        await post_json(admin, "/api/v1/namespaces", {"metadata": {"name": name}})
    crds = []
    if wanted & {"task_nocel", "task_nocel_one_manager"}:
        crds.append(crd_variant(NOCEL_GROUP, schemaless=False))
    if wanted & {"task_schemaless", "cr_tiny_schemaless"}:
        crds.append(crd_variant(SCHEMALESS_GROUP, schemaless=True))
    for crd in crds:
        plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(crd))
    if crds:
        plane.wait_crds_established()
    if policies and "task_sa_policies" in wanted:
        for doc in policy_documents(policy_namespace):
            plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(doc))

    def tasks(prefix: str, **shape: Any) -> Awaitable[list[str]]:
        return make_tasks(admin, prefix=prefix, count=in_flight, **shape)

    found: list[Variant] = []
    lease_paths = await _make_leases(admin, namespace, "lease", in_flight)
    found.append(Variant("lease", lease_renewal(as_admin, lease_paths), lease_paths))
    small = await tasks("small", group=GROUP, namespace=namespace, realistic=False, handed_out=True)
    found.append(Variant("task_small", sdk_heartbeat(as_admin, small), small))
    real = await tasks("real", group=GROUP, namespace=namespace, handed_out=True)
    found.append(Variant("task", sdk_heartbeat(as_admin, real), real))
    for name, group, shape in (
        ("task_kept", GROUP, {}),
        ("task_small_kept", GROUP, {"realistic": False}),
        ("task_nocel", NOCEL_GROUP, {}),
        ("task_schemaless", SCHEMALESS_GROUP, {}),
        ("task_no_attempts", GROUP, {"attempts": False}),
        ("task_one_manager", GROUP, {"strip_managed_fields": True}),
        ("cr_tiny_schemaless", SCHEMALESS_GROUP, {"tiny": True}),
        ("task_nocel_one_manager", NOCEL_GROUP, {"strip_managed_fields": True}),
        ("task_small_one_manager", GROUP, {"realistic": False, "strip_managed_fields": True}),
    ):
        if name in wanted:
            paths = await tasks(name.replace("_", "-"), group=group, namespace=namespace, **shape)
            found.append(Variant(name, sdk_heartbeat(as_admin, paths), paths))
    writers: dict[str, Callable[[list[str]], Write]] = {
        "task_merge_rv": lambda p: merge_heartbeat(as_admin, p, precondition=True),
        "task_no_test": lambda p: sdk_heartbeat(as_admin, p, fence=False),
        "task_merge": lambda p: merge_heartbeat(as_admin, p, precondition=False),
        "task_apply": lambda p: apply_heartbeat(as_admin, p, group=GROUP),
    }
    for name, make in writers.items():
        if name in wanted:
            paths = await tasks(name.replace("_", "-"), group=GROUP, namespace=namespace)
            found.append(Variant(name, make(paths), paths, fenced=name == "task_merge_rv"))
    if wanted & {"task_sa", "lease_sa"}:
        runner = Conn(await _runner_identity(cluster, namespace), accept)
        if "task_sa" in wanted:
            paths = await tasks("sa", group=GROUP, namespace=namespace)
            found.append(Variant("task_sa", sdk_heartbeat(runner, paths), paths))
        if "lease_sa" in wanted:
            paths = await _make_leases(admin, namespace, "lease-sa", in_flight)
            found.append(Variant("lease_sa", lease_renewal(runner, paths), paths))
    if "task_sa_policies" in wanted:
        runner = Conn(await _runner_identity(cluster, policy_namespace), accept)
        paths = await tasks("sa-policies", group=GROUP, namespace=policy_namespace)
        if policies:
            await _wait_for_policies(runner.api, paths[0])
        found.append(Variant("task_sa_policies", sdk_heartbeat(runner, paths), paths))
    return found


def _answer(data: bytes, accept: str) -> dict[str, Any]:
    if accept == "application/cbor":
        import cbor2  # type: ignore[import-not-found, unused-ignore]

        decoded: dict[str, Any] = cbor2.loads(data)
        return decoded
    result: dict[str, Any] = json.loads(data)
    return result


# --- measurement ---------------------------------------------------------------------------


async def drive(variant: Variant, writes: int, in_flight: int, start: int) -> None:
    """`writes` writes, `in_flight` at a time, each slot on its own object."""
    counter = iter(range(start, start + writes))

    async def slot(index: int) -> None:
        for n in counter:
            await variant.write(index % len(variant.paths), n)

    await asyncio.gather(*(slot(index) for index in range(in_flight)))


@dataclass
class Round:
    cpu_ms_per_write: float
    apiserver_ms: float
    etcd_ms: float
    wall_s: float
    others_cores: float


async def measure_round(
    variant: Variant, pids: dict[str, int], writes: int, in_flight: int, start: int
) -> Round:
    before = snapshot({**pids, "client": os.getpid()}, now=time.monotonic())
    await drive(variant, writes, in_flight, start)
    delta = snapshot({**pids, "client": os.getpid()}, now=time.monotonic()).minus(before)
    apiserver, etcd = (delta.cpu_s[name] for name in APISERVER)
    ours = sum(delta.cpu_s[name] for name in delta.cpu_s if name != MACHINE)
    return Round(
        cpu_ms_per_write=(apiserver + etcd) / writes * 1000,
        apiserver_ms=apiserver / writes * 1000,
        etcd_ms=etcd / writes * 1000,
        wall_s=delta.seconds,
        others_cores=max(delta.cpu_s[MACHINE] - ours, 0.0) / delta.seconds,
    )


def orders(names: list[str], rounds: int) -> Iterator[list[str]]:
    """Forwards, backwards, forwards ...: a drift within the run cancels over a pair."""
    for index in range(rounds):
        yield names if index % 2 == 0 else names[::-1]


async def object_sizes(api: Api, variants: list[Variant]) -> dict[str, int]:
    """JSON bytes of each variant's first object as a GET returns it (managedFields
    included): about what the API server decodes, encodes and etcd stores per write."""
    sizes = {}
    for variant in variants:
        status, data = await api.call("GET", variant.paths[0])
        _check(status, "GET", data)
        sizes[variant.name] = len(data)
    return sizes


async def take_profile(
    plane: Any, variant: Variant, seconds: int, in_flight: int, target: Path
) -> None:
    """A CPU profile of kube-apiserver while `variant` writes without pause."""
    stop = asyncio.Event()

    async def load() -> None:
        n = 10_000_000
        while not stop.is_set():
            await drive(variant, in_flight * 20, in_flight, n)
            n += in_flight * 20

    loader = asyncio.create_task(load())
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_admin_context(plane))
            ) as session,
            session.get(
                f"{plane.server}/debug/pprof/profile?seconds={seconds}",
                timeout=aiohttp.ClientTimeout(total=seconds + 60),
            ) as response,
        ):
            data = await response.read()
            _check(response.status, "pprof", data)
        await asyncio.to_thread(target.write_bytes, data)
    finally:
        stop.set()
        await loader


def _admin_context(plane: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(plane.admin_ca))
    context.load_cert_chain(str(plane.admin_cert), str(plane.admin_key))
    return context


def summarise(results: dict[str, list[Round]]) -> dict[str, Any]:
    lease = statistics.median(r.cpu_ms_per_write for r in results["lease"])
    variants: dict[str, Any] = {}
    for name, rounds in results.items():
        cpu = statistics.median(r.cpu_ms_per_write for r in rounds)
        variants[name] = {
            "cpu_ms_per_write": round(cpu, 3),
            "vs_lease": round(cpu / lease, 2),
            "apiserver_ms": round(statistics.median(r.apiserver_ms for r in rounds), 3),
            "etcd_ms": round(statistics.median(r.etcd_ms for r in rounds), 3),
            "rounds": [round(r.cpu_ms_per_write, 3) for r in rounds],
            "others_cores": [round(r.others_cores, 2) for r in rounds],
        }
    return {
        "apiserver_cpu_ms_per_heartbeat": variants["task"]["cpu_ms_per_write"],
        "apiserver_cpu_ms_per_lease_renewal": variants["lease"]["cpu_ms_per_write"],
        "heartbeat_cost_vs_lease": variants["task"]["vs_lease"],
        "apiserver_cpu_ms_per_heartbeat_small": variants["task_small"]["cpu_ms_per_write"],
        "heartbeat_cost_vs_lease_small": variants["task_small"]["vs_lease"],
        "variants": variants,
    }


async def measure(plane: Any, args: argparse.Namespace) -> dict[str, Any]:
    pids = find_components(plane.state_dir, APISERVER)
    if set(pids) != set(APISERVER):
        raise RuntimeError(f"control-plane processes not found in /proc: {pids}")
    wanted = set(ALWAYS) | set(args.variants)
    async with Api(
        plane.server,
        ca=plane.admin_ca,
        cert=plane.admin_cert,
        key=plane.admin_key,
        connections=args.in_flight,
    ) as admin:
        cluster = Cluster(plane=plane, admin=admin)
        try:
            variants = await build_variants(
                cluster,
                wanted,
                in_flight=args.in_flight,
                policies=not args.no_policies,
                accept=args.accept,
                namespace=args.namespace,
            )
            by_name = {variant.name: variant for variant in variants}
            sizes = await object_sizes(admin, variants)
            log(f"variants: {', '.join(by_name)}; warming up")
            for variant in variants:
                await drive(variant, max(args.in_flight * 4, args.writes // 10), args.in_flight, 0)
            results: dict[str, list[Round]] = {name: [] for name in by_name}
            splits: dict[str, dict[str, float]] = {}
            sequence = 1_000_000
            for index, order in enumerate(orders(list(by_name), args.rounds)):
                for name in order:
                    found = await measure_round(
                        by_name[name], pids, args.writes, args.in_flight, sequence
                    )
                    sequence += args.writes
                    results[name].append(found)
                    log(
                        f"round {index + 1} {name}: {found.cpu_ms_per_write:.2f} ms/write "
                        f"(others {found.others_cores:.2f} cores)"
                    )
            if args.profile_dir is not None:
                args.profile_dir.mkdir(parents=True, exist_ok=True)
                for name in args.profile_variants:
                    target = args.profile_dir / f"apiserver-{name}.pb.gz"
                    log(f"profiling {name} for {args.profile_seconds}s -> {target}")
                    await take_profile(
                        plane, by_name[name], args.profile_seconds, args.in_flight, target
                    )
                    splits[name] = await asyncio.to_thread(split_profile, target)
        finally:
            for runner in cluster.runners:
                await runner.__aexit__(None, None, None)
    summary = summarise(results)
    summary["object_bytes"] = sizes
    if splits:
        summary["profile_split"] = splits
    summary["policies_installed"] = "task_sa_policies" in by_name and not args.no_policies
    summary["settings"] = {
        "writes": args.writes,
        "rounds": args.rounds,
        "in_flight": args.in_flight,
        "feature_gates": args.feature_gates,
        "accept": args.accept,
    }
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.heartbeat_cost", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--writes", type=int, default=1500, help="writes per variant and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument(
        "--variants",
        default=",".join(LEVERS),
        help=f"levers to measure besides {', '.join(ALWAYS)} (comma-separated; '' for none)",
    )
    parser.add_argument("--no-policies", action="store_true", help="leave the chart's out")
    parser.add_argument("--namespace", default=NAMESPACE, help="and NAMESPACE-policy (new)")
    parser.add_argument("--feature-gates", default="", help="kube-apiserver --feature-gates")
    parser.add_argument("--accept", default="", help="Accept header of every write")
    parser.add_argument("--profile-dir", type=Path, default=None)
    parser.add_argument("--profile-variants", default="task,lease")
    parser.add_argument("--profile-seconds", type=int, default=20)
    parser.add_argument(
        "--split",
        type=Path,
        nargs="+",
        default=None,
        metavar="PROFILE",
        help="only print where the CPU of these kube-apiserver profiles went, and exit",
    )
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(LEVERS)
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    args.profile_variants = [v for v in args.profile_variants.split(",") if v]
    return args


# --- where a profile's CPU went ------------------------------------------------------------

# (share, regular expression on a frame's function name). A sample goes to the first share
# whose expression matches a frame of its stack; the list runs from the most nested step of a
# write to the most general (CEL run by an admission policy is the policy's, a decode in the
# etcd watch is the watch's, what is left of the storage update is "etcd client, encode").
SHARES: Final = (
    ("garbage collection (background)", r"^runtime\.(gcBgMarkWorker|bgsweep|bgscavenge)"),
    ("etcd watch -> watch cache (decode)", r"etcd3\.\(\*watchChan\)"),
    (
        "watch cache, watchers",
        r"cacher\.\(\*(Cacher|watchCache|cacheWatcher|cachingObject)\)|handlers\.handleWatch"
        r"|\(\*WatchServer\)",
    ),
    ("admission policies", r"admission/plugin/policy|admission/plugin/cel"),
    ("CRD CEL rules", r"apiserver/schema/cel\.|cel-go|k8s\.io/apiserver/pkg/cel"),
    (
        "CRD schema validation",
        r"apiextensions-apiserver/pkg/apiserver/validation|kube-openapi/pkg/validation"
        r"|customResourceValidator",
    ),
    ("decode from etcd (schema coercion)", r"etcd3\.decodeObj|schemaCoercingDecoder"),
    ("managed fields", r"managedfields|fieldmanager"),
    ("patch application (JSON Patch and its tests, merge patch)", r"jsonPatcher|json-patch"),
    ("apply, strategic merge patch", r"smpPatcher|applyPatcher|strategicpatch"),
    ("response encoding", r"responsewriters"),
    (
        "storage encode (schema coercion, JSON)",
        r"schemaCoercingConverter|versioning\.\(\*codec\)\.(Encode|doEncode|encode)",
    ),
    (
        "other update steps (deep copies, PrepareForUpdate, metadata checks, etcd put)",
        r"rest\.BeforeUpdate|statusStrategy|registry\.\(\*Store\)",
    ),
    ("etcd client (put, gRPC)", r"storage/etcd3|go\.etcd\.io|google\.golang\.org/grpc"),
    ("admission (other plugins)", r"k8s\.io/apiserver/pkg/admission"),
    ("authentication, authorization", r"authentication|authorization|rbac"),
    ("audit, metrics, priority and fairness", r"/audit|metrics|flowcontrol|otel"),
    ("TLS, HTTP", r"^crypto/|^net/http|golang\.org/x/net/http2|^net\.|^internal/poll|^syscall"),
)


def parse_traces(text: str) -> Iterator[tuple[float, list[str]]]:
    """(seconds, frames leaf first) of each sample stack in `go tool pprof -traces` output:
    stacks between lines of dashes, the first line of each led by the sample's value."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
    value: float | None = None
    frames: list[str] = []
    for line in text.splitlines():
        if line.startswith("-----------+"):
            if value is not None:
                yield value, frames
            value, frames = None, []
            continue
        parts = line.split()
        number = re.fullmatch(r"([0-9.]+)(ns|us|µs|ms|s)", parts[0]) if parts else None
        if number and len(parts) > 1:
            value = float(number.group(1)) * units[number.group(2)]
            frames = [parts[1]]
        elif value is not None and parts and ":" not in parts[0].split(".")[0]:
            frames.append(parts[0])
    if value is not None:
        yield value, frames


_PATTERNS: Final = [(name, re.compile(expression)) for name, expression in SHARES]


def classify(frames: list[str]) -> str:
    """The share (SHARES) a sample with these frames is charged to; "other" if none."""
    for name, pattern in _PATTERNS:
        if any(pattern.search(frame) for frame in frames):
            return name
    return "other"


def split_profile(path: Path) -> dict[str, float]:
    """Share of a CPU profile's samples per phase of a write (SHARES), from 0 to 1."""
    text = subprocess.run(
        ["go", "tool", "pprof", "-traces", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    totals: dict[str, float] = {}
    for seconds, frames in parse_traces(text):
        share = classify(frames)
        totals[share] = totals.get(share, 0.0) + seconds
    everything = sum(totals.values()) or 1.0
    return {
        name: round(seconds / everything, 3)
        for name, seconds in sorted(totals.items(), key=lambda item: -item[1])
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.split:
        print(json.dumps({str(path): split_profile(path) for path in args.split}))
        return 0
    from tasklease.controlplane import ControlPlane, obtain_binaries

    apiserver_args = ["--profiling=true"]  # the control plane turns it off; last flag wins
    if args.feature_gates:
        apiserver_args.append(f"--feature-gates={args.feature_gates}")
    with ControlPlane.start(
        binaries=obtain_binaries(progress=sys.stderr),
        extra_args={"kube-apiserver": apiserver_args},
    ) as plane:
        plane.apply_crds(CRD_FILE)
        found = asyncio.run(measure(plane, args))
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
