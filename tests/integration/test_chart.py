"""The Helm chart: lint, schema, rendering, a server-side dry run of everything it renders, and
the operator running under the chart's own RBAC (a real ServiceAccount token, not the admin).

helm comes from the per-user cache (`obtain_helm`: `go install`ed once, like the control-plane
binaries). Every release here watches only its test namespace, so it never touches other
tests' Tasks; `helm uninstall` removes its cluster-scoped objects.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tasklease.runner import TaskLease
from tests.integration.chart_support import (
    CHART,
    REPO_ROOT,
    RUNNER_SA,
    Helm,
    installed,
    scoped_values,
    service_account_token,
    token_client,
    write_token_kubeconfig,
)
from tests.integration.support import Cluster, OperatorProcess, identity_from_pod, wait_for

pytestmark = pytest.mark.cluster

# What the operator's log must never say when its RBAC is right. (The `,403` of a log
# timestamp's milliseconds is not a status code.)
FORBIDDEN = re.compile(r"(?<![,\d])403(?!\d)|[Ff]orbidden|[Nn]ot enough permissions")

# Every documented option set to something other than its default.
ALL_OPTIONS: dict[str, Any] = {
    # The Prometheus operator's CRDs are not on the test control plane, so the dry run would
    # refuse its objects: test_monitoring_chart.py renders them.
    "monitoring": {
        "serviceMonitor": {
            "enabled": False,
            "interval": "15s",
            "scrapeTimeout": "10s",
            "labels": {"release": "kps"},
        },
        "prometheusRule": {"enabled": False, "labels": {"release": "kps"}},
        "dashboard": {
            "enabled": True,
            "namespace": "",
            "labels": {"grafana_dashboard": "1"},
            "annotations": {"grafana_folder": "Operators"},
        },
    },
    "image": {
        "repository": "registry.example/tasklease",
        "tag": "0.1.0-test",
        "digest": "sha256:" + "a" * 64,
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "nameOverride": "tl",
    "fullnameOverride": "",
    "operator": {
        "replicas": 2,
        "workers": 32,
        "apiQps": 80,
        "apiBurst": 160,
        "logLevel": "DEBUG",
        "healthPort": 9081,
        "ttlAfterFinished": "168h",
        "compactManagedFields": False,
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "extraEnv": [{"name": "PYTHONFAULTHANDLER", "value": "1"}],
        "podLabels": {"team": "batch"},
        "podAnnotations": {"example.com/owner": "batch"},
        "priorityClassName": "",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {
                            "matchExpressions": [
                                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                            ]
                        },
                    }
                ]
            }
        },
    },
    "serviceAccount": {
        "create": True,
        "name": "tasklease-operator-all",
        "annotations": {"example.com/role": "operator"},
    },
    "rbac": {"create": True},
    "runner": {
        "namespaces": [],  # filled in per test: the test namespaces
        "serviceAccount": {
            "create": True,
            "name": RUNNER_SA,
            "annotations": {"example.com/role": "runner"},
        },
    },
    "pools": {
        "enabled": True,
        "serviceAccount": {
            "create": True,
            "name": "tasklease-pool-runner",
            "annotations": {"example.com/role": "pool-runner"},
        },
        "terminationGracePeriodSeconds": 45,
        "groups": [
            {
                "name": "gpu",
                "namespace": "",  # filled in per test: the last test namespace
                "replicas": 2,
                "image": "registry.example/embedder:1.4",
                "command": ["tasklease", "run", "--worker-group", "gpu", "--poll-timeout", "30"],
                "args": ["--", "python", "-m", "embedder"],
                "resources": {"limits": {"memory": "2Gi"}},
                "env": [{"name": "MODEL", "value": "small"}],
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {
                    "podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 1,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {
                                        "matchLabels": {"tasklease.io/worker-group": "gpu"}
                                    },
                                },
                            }
                        ]
                    }
                },
                "podLabels": {"team": "ml"},
                "podAnnotations": {"example.com/owner": "ml"},
                "terminationGracePeriodSeconds": 60,
            }
        ],
    },
    "leaderElection": {"enabled": True, "leaseName": "tasklease-all"},
    "admissionPolicy": {
        "enabled": True,
        "namespaceSelector": None,  # filled in per test
        "validationActions": ["Warn", "Audit"],
        "failurePolicy": "Ignore",
        "warnUnwatchedNamespaces": False,
    },
    "metrics": {
        "port": 9080,
        "service": {
            "enabled": True,
            "type": "ClusterIP",
            "port": 9080,
            "annotations": {"prometheus.io/scrape": "true"},
        },
    },
}


def all_options(namespaces: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = copy.deepcopy(ALL_OPTIONS)
    values["watchNamespaces"] = namespaces
    values["runner"]["namespaces"] = namespaces
    values["pools"]["groups"][0]["namespace"] = namespaces[-1]
    values["admissionPolicy"]["namespaceSelector"] = {
        "matchLabels": {"kubernetes.io/metadata.name": namespaces[0]}
    }
    return values


def _leaves(values: Any, prefix: str = "") -> set[str]:
    if isinstance(values, dict) and values:
        return {leaf for k, v in values.items() for leaf in _leaves(v, f"{prefix}{k}.")}
    return {prefix.rstrip(".")}


def test_all_options_covers_every_documented_value() -> None:
    documented = yaml.safe_load((CHART / "values.yaml").read_text())
    # `resources`, `affinity` and the like are free-form: their own keys are examples.
    covered = _leaves(all_options(["a"]))
    missing = {
        leaf
        for leaf in _leaves(documented)
        if not any(
            leaf == c or c.startswith(leaf + ".") or leaf.startswith(c + ".") for c in covered
        )
    }
    assert not missing, f"ALL_OPTIONS does not set: {sorted(missing)}"


@pytest.mark.parametrize("options", ["default", "all-options"])
def test_helm_lint_strict(helm: Helm, tmp_path: Path, options: str) -> None:
    values = {} if options == "default" else all_options(["team-a", "team-b"])
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = helm("lint", "--strict", str(CHART), "-f", str(values_file), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_values_schema_refuses_bad_values(helm: Helm, tmp_path: Path) -> None:
    cases = {
        "operator.replicas=2": "value must be one of 0, 1",
        "watchNamespaces={Bad_Namespace}": "watchNamespaces",
        "admissionPolicy.validationActions={Block}": "validationActions",
        "unknownKey=1": "additional properties 'unknownKey' not allowed",
        "leaderElection.leaseName=Not_A_Name": "leaseName",
    }
    for setting, expected in cases.items():
        result = helm("template", "x", str(CHART), "--set", setting, check=False)
        assert result.returncode != 0, f"--set {setting} was accepted"
        assert expected in result.stderr, f"--set {setting}: {result.stderr}"


def test_chart_crds_are_the_generated_ones(helm: Helm) -> None:
    """The chart ships the Task CRD from charts/tasklease/crds/ (written by
    `python -m tasklease.api.crd`), identical to crds/."""
    out = helm("show", "crds", str(CHART)).stdout
    shipped = [doc for doc in yaml.safe_load_all(out) if doc]
    generated = [
        yaml.safe_load(path.read_text()) for path in sorted((REPO_ROOT / "crds").glob("*.yaml"))
    ]
    assert shipped == generated


def test_default_rendering(helm: Helm, tmp_path: Path) -> None:
    docs = helm.template("tl", "tasklease-system", {}, tmp_path)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (deployment,) = by_kind["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == "tasklease:0.1.0"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "TASKLEASE_NAMESPACES" not in env, "watching every namespace by default"
    assert "TASKLEASE_LEADER_ELECTION" not in env, "no election unless asked for"
    assert env["TASKLEASE_METRICS_PORT"] == "8080"
    assert env["TASKLEASE_COMPACT_MANAGED_FIELDS"] == "true"
    (service,) = by_kind["Service"]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    # Clusterwide: one ClusterRole carries the operator's rules; no Role for it.
    assert [r["metadata"]["name"] for r in by_kind["ClusterRole"]] == ["tl-tasklease-operator"]
    assert [r["metadata"]["name"] for r in by_kind["Role"]] == ["tl-tasklease-runner"]
    assert by_kind["Role"][0]["metadata"]["namespace"] == "tasklease-system"
    assert by_kind["ValidatingAdmissionPolicy"] and by_kind["ValidatingAdmissionPolicyBinding"]
    # Watching every namespace, no namespace is unwatched: nothing to warn about.
    policies = [p["metadata"]["name"] for p in by_kind["ValidatingAdmissionPolicy"]]
    assert "tl-tasklease-unwatched-namespace" not in policies
    assert "CustomResourceDefinition" not in by_kind, "the Task CRD comes from crds/"


def test_watch_namespaces_rendering(helm: Helm, tmp_path: Path) -> None:
    docs = helm.template("tl", "ops", {"watchNamespaces": ["a", "b"]}, tmp_path)
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in docs
        if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
    }
    for namespace in ("a", "b"):
        for kind in ("Role", "RoleBinding"):
            assert (kind, namespace, "tl-tasklease-operator") in roles
            assert (kind, namespace, "tl-tasklease-runner") in roles
    # Nothing cluster-wide for the operator (kopf follows neither CRDs nor namespaces).
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TASKLEASE_NAMESPACES"] == "a,b"
    runner_sas = {
        d["metadata"]["namespace"]
        for d in docs
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == RUNNER_SA
    }
    assert runner_sas == {"a", "b"}
    # Tasks elsewhere are warned about, except in namespaces labelled as watched (shards).
    (binding,) = [
        d
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicyBinding"
        and d["metadata"]["name"] == "tl-tasklease-unwatched-namespace"
    ]
    assert binding["spec"]["validationActions"] == ["Warn"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["a", "b"]},
        {"key": "tasklease.io/watched", "operator": "DoesNotExist"},
    ]


@pytest.mark.parametrize("options", ["default", "all-options"])
def test_rendered_chart_applies_with_server_side_dry_run(
    helm: Helm,
    kubectl: Any,
    namespace: str,
    second_namespace: str,
    tmp_path: Path,
    options: str,
) -> None:
    values = {} if options == "default" else all_options([namespace, second_namespace])
    docs = helm.template("dry", namespace, values, tmp_path)
    if options == "all-options":
        deployments = {
            doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc
            for doc in docs
            if doc["kind"] == "Deployment"
        }
        assert set(deployments) == {"operator", "pool-runner"}  # pools.groups
        operator = deployments["operator"]["spec"]
        assert operator["replicas"] == 2  # one leads, one stands by
        assert operator["strategy"]["type"] == "RollingUpdate"
        (election_role,) = [
            doc
            for doc in docs
            if doc["kind"] == "Role" and doc["metadata"]["name"].endswith("-leader-election")
        ]
        assert election_role["metadata"]["namespace"] == namespace
        assert election_role["rules"][0]["resourceNames"] == ["tasklease-all"]
    result = kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == len(docs), result.stdout


def _operator_kubeconfig(
    control_plane: Any, core: client.CoreV1Api, namespace: str, service_account: str, path: Path
) -> Path:
    token = service_account_token(core, namespace, service_account)
    return write_token_kubeconfig(path, control_plane, token, service_account)


def _forbidden_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if FORBIDDEN.search(line)]


def test_chart_installs_and_operator_runs_under_its_rbac(
    helm: Helm,
    control_plane: Any,
    kube_config: Any,
    kubectl: Any,
    namespace: str,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(kube_config)
    with installed(helm, namespace, tmp_path, scoped_values(namespace)) as release:
        # The example Task NOTES.txt suggests is one the API server accepts.
        example = yaml.safe_load(release.example_task())
        assert example["spec"]["template"]["spec"]["serviceAccountName"] == RUNNER_SA
        kubectl(
            "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(example)
        )
        kubeconfig = _operator_kubeconfig(
            control_plane, core, namespace, release.operator_sa, tmp_path / "operator.kubeconfig"
        )
        operator = OperatorProcess(
            kubeconfig=kubeconfig, namespace=namespace, log_path=tmp_path / "operator.log"
        ).start()
        try:
            cluster = Cluster(kube_config, namespace)
            cluster.create_task(
                "charted",
                template={
                    "spec": {
                        "serviceAccountName": RUNNER_SA,
                        "containers": [{"name": "runner", "image": "tasklease:0.1.0"}],
                    }
                },
            )
            cluster.wait_epoch("charted", 1)
            (pod,) = cluster.pods("charted")
            assert pod.spec.service_account_name == RUNNER_SA
            # The runner, as its pod's own projected token would make it: the runner
            # ServiceAccount, bound to that pod (so the admission policy sees its name).
            token = service_account_token(core, namespace, RUNNER_SA, pod=pod)
            runner_api = token_client(control_plane, token)
            with TaskLease(identity_from_pod(pod), api_client=runner_api) as lease:
                assert lease.progress(percent=50, message="half way")
            assert not lease.lost, lease.cancel_reason
            cluster.wait_phase("charted", "Succeeded")
            # A runner that never acknowledges: the operator ends the attempt and deletes its
            # pod, then the Task once its ttl passed: the verbs (pods and tasks delete) the
            # happy path above does not use.
            cluster.create_task(
                "abandoned",
                ackTimeout="1s",
                ttlAfterFinished="5s",
                retry={"maxAttempts": 1},
                template={
                    "spec": {
                        "serviceAccountName": RUNNER_SA,
                        "containers": [{"name": "runner", "image": "tasklease:0.1.0"}],
                    }
                },
            )
            cluster.wait_phase("abandoned", "Failed")
            wait_for(
                "the abandoned runner pod to be deleted",
                lambda: cluster.live_pod("abandoned-1") is None,
            )
            wait_for(
                "the abandoned Task to be deleted after its ttl",
                lambda: not [t for t in cluster.tasks() if t["metadata"]["name"] == "abandoned"],
            )
            assert operator.alive, operator.log()[-4000:]
        finally:
            operator.stop()
        log = operator.log()
        assert "Succeeded" in str(cluster.status("charted"))
        assert not _forbidden_lines(log), "\n".join(_forbidden_lines(log))


def test_leader_election_standby_runs_under_its_rbac(
    helm: Helm,
    control_plane: Any,
    kube_config: Any,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Replicas as the chart runs them with `leaderElection.enabled` (its TASKLEASE_LEADER_*
    variables, under its RBAC): one leads, a standby reconciles nothing, and takes over when
    the leader is killed (once the Lease expires) or stopped (at once: the Lease is released).
    """
    coordination = client.CoordinationV1Api(kube_config)
    values = scoped_values(namespace, operator={"replicas": 2}, leaderElection={"enabled": True})
    with installed(helm, namespace, tmp_path, values) as release:
        (deployment,) = [d for d in release.documents if d["kind"] == "Deployment"]
        assert deployment["spec"]["replicas"] == 2
        election_env = {
            e["name"]: e["value"]
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"].startswith("TASKLEASE_LEADER_ELECTION")
        }
        assert election_env == {
            "TASKLEASE_LEADER_ELECTION": "true",
            "TASKLEASE_LEADER_ELECTION_NAMESPACE": namespace,
            "TASKLEASE_LEADER_ELECTION_NAME": f"{release.fullname}-operator",
        }
        lease_name = election_env["TASKLEASE_LEADER_ELECTION_NAME"]
        kubeconfig = _operator_kubeconfig(
            control_plane,
            client.CoreV1Api(kube_config),
            namespace,
            release.operator_sa,
            tmp_path / "operator.kubeconfig",
        )
        replicas: dict[str, OperatorProcess] = {}

        def start(pod_name: str) -> OperatorProcess:
            replicas[pod_name] = OperatorProcess(
                kubeconfig=kubeconfig,
                namespace=namespace,
                log_path=tmp_path / f"{pod_name}.log",
                extra_env={**election_env, "HOSTNAME": pod_name},
            ).start()
            return replicas[pod_name]

        def leading(replica: OperatorProcess) -> bool:
            return "leading (Lease" in replica.log()

        def standing_by(replica: OperatorProcess) -> bool:
            return "waiting to lead" in replica.log()

        def holder() -> str:
            lease = coordination.read_namespaced_lease(lease_name, namespace)
            return str(lease.spec.holder_identity or "")

        template = {
            "spec": {
                "serviceAccountName": RUNNER_SA,
                "containers": [{"name": "runner", "image": "tasklease:0.1.0"}],
            }
        }
        cluster = Cluster(kube_config, namespace)
        try:
            first = start("operator-a")
            wait_for("operator-a to lead", lambda: leading(first), timeout=60)
            second = start("operator-b")
            wait_for("operator-b to stand by", lambda: standing_by(second), timeout=60)
            cluster.create_task("elected", template=template)
            cluster.wait_epoch("elected", 1)
            assert holder().startswith("operator-a_")
            # The standby started nothing: no decision, no Task listed.
            assert not leading(second)
            assert "elected" not in second.log() and "watching" not in second.log()

            # A crash: the standby takes over once the Lease expires on its own clock.
            first.kill()
            killed = time.monotonic()
            wait_for("operator-b to take over", lambda: leading(second), timeout=60)
            took = time.monotonic() - killed
            # 15 s lease from the standby's last sight of a renewal (renewed every 5 s): not
            # before it could have expired (the upper bound is wait_for's timeout).
            assert took >= 9, f"took over {took:.1f}s after the crash, before the lease expired"
            assert holder().startswith("operator-b_")
            wait_for("operator-b to list the Task", lambda: "watching 1 Tasks" in second.log())
            cluster.create_task("after-crash", template=template)
            cluster.wait_epoch("after-crash", 1)

            # A clean stop (a rollout, a drained node): the Lease is released on the way out,
            # and a standby takes over at once, long before the lease would have expired.
            third = start("operator-c")
            wait_for("operator-c to stand by", lambda: standing_by(third), timeout=60)
            stopping = time.monotonic()
            second.stop()
            wait_for("operator-c to take over", lambda: leading(third), timeout=30)
            took = time.monotonic() - stopping
            # Without the release it would have waited for the 15 s lease to expire.
            assert took < 15, f"took over {took:.1f}s after a clean stop: the lease expired"
            assert "released the Lease" in second.log()
            cluster.create_task("after-release", template=template)
            cluster.wait_epoch("after-release", 1)
            assert holder().startswith("operator-c_")
        finally:
            for replica in replicas.values():
                replica.stop()
        for name, replica in replicas.items():
            lines = _forbidden_lines(replica.log())
            assert not lines, f"{name}:\n" + "\n".join(lines)


def _applied(kubectl: Any, namespace: str, name: str, **spec: Any) -> str:
    """`kubectl apply` a Task; its stderr, where kubectl prints admission warnings."""
    body = {
        "apiVersion": "tasklease.io/v1alpha1",
        "kind": "Task",
        "metadata": {"name": name},
        "spec": {"workerGroup": "etl", **spec},
    }
    result = kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    kubectl("get", "task", name, "-n", namespace)  # created, warned or not
    return str(result.stderr)


def test_task_in_an_unwatched_namespace_is_flagged(
    helm: Helm,
    kubectl: Any,
    kube_config: Any,
    namespace: str,
    second_namespace: str,
    tmp_path: Path,
) -> None:
    """A release watching `namespace` warns whoever creates a Task in `second_namespace`
    (the Task is still created, and stays Pending: nothing watches it), not in its own
    namespace, nor in one labelled as watched by another release (a shard)."""
    core = client.CoreV1Api(kube_config)
    sharded = f"{namespace}-c"
    core.create_namespace(
        {"metadata": {"name": sharded, "labels": {"tasklease.io/watched": "true"}}}
    )
    values = scoped_values(namespace, admissionPolicy={"warnUnwatchedNamespaces": True})
    try:
        with installed(helm, namespace, tmp_path, values) as release:
            expected = (
                f"no tasklease operator watches namespace {second_namespace}: this Task "
                f"stays Pending until one does (release {release.name} watches {namespace}; "
                f"if another release watches {second_namespace}, label that namespace "
                "tasklease.io/watched=true)"
            )
            probe = {
                "apiVersion": "tasklease.io/v1alpha1",
                "kind": "Task",
                "metadata": {"name": "probe"},
                "spec": {"workerGroup": "etl"},
            }
            # A new policy takes a moment to be enforced: dry runs until it warns.
            wait_for(
                "the unwatched-namespace policy to warn",
                lambda: (
                    expected
                    in kubectl(
                        "create",
                        "--dry-run=server",
                        "-n",
                        second_namespace,
                        "-f",
                        "-",
                        input=yaml.safe_dump(probe),
                    ).stderr
                ),
                timeout=60,
            )

            stderr = _applied(kubectl, second_namespace, "stranded")
            assert "Warning: Validation failed for ValidatingAdmissionPolicy" in stderr, stderr
            assert expected in stderr, stderr
            # Changing its spec warns again; a write of its metadata only (what another
            # release's operator writes: the lease annotations) does not.
            assert expected in _applied(kubectl, second_namespace, "stranded", priority=5)
            annotated = kubectl(
                "annotate", "task", "stranded", "-n", second_namespace, "example.com/note=x"
            )
            assert "Warning" not in annotated.stderr, annotated.stderr

            assert "Warning" not in _applied(kubectl, namespace, "watched")
            assert "Warning" not in _applied(kubectl, sharded, "elsewhere")
    finally:
        core.delete_namespace(sharded, propagation_policy="Background")
