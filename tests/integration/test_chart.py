"""The Helm chart: lint, schema, rendering, a server-side dry run of everything it renders, and
the operator running under the chart's own RBAC (a real ServiceAccount token, not the admin).

helm comes from the per-user cache (`obtain_helm`: `go install`ed once, like the control-plane
binaries). Every release here watches only its test namespace, so it never touches other
tests' Tasks; `helm uninstall` removes its cluster-scoped objects.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tasklease.controlplane.binaries import obtain_helm
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
    uncaptured,
    write_token_kubeconfig,
)
from tests.integration.support import Cluster, OperatorProcess, identity_from_pod, wait_for

pytestmark = pytest.mark.cluster

# What the operator's log must never say when its RBAC is right. (The `,403` of a log
# timestamp's milliseconds is not a status code.)
RESUMING = "Resuming operations after the pause"
FORBIDDEN = re.compile(r"(?<![,\d])403(?!\d)|[Ff]orbidden|[Nn]ot enough permissions")

# Every documented option set to something other than its default.
ALL_OPTIONS: dict[str, Any] = {
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
        "replicas": 1,
        "workers": 32,
        "apiQps": 80,
        "apiBurst": 160,
        "logLevel": "DEBUG",
        "healthPort": 9081,
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
    "peering": {
        "enabled": True,
        "name": "tasklease-all",
        "installCRDs": True,
        "priority": 200,
        "standby": {"priority": 100},
    },
    "admissionPolicy": {
        "enabled": True,
        "namespaceSelector": None,  # filled in per test
        "validationActions": ["Warn", "Audit"],
        "failurePolicy": "Ignore",
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


@pytest.fixture(scope="module")
def helm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, control_plane: Any
) -> Helm:
    with uncaptured(request):
        binary = obtain_helm()
    return Helm(binary, kubeconfig=control_plane.kubeconfig, home=tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def peering_crds(
    helm: Helm, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """kopf's peering CRDs, as the chart renders them, installed for this module's tests and
    removed afterwards (no other test uses peering)."""
    tmp = tmp_path_factory.mktemp("peering")
    docs = helm.template("crds", "default", {"peering": {"enabled": True}}, tmp)
    crds = [doc for doc in docs if doc["kind"] == "CustomResourceDefinition"]
    assert {crd["metadata"]["name"] for crd in crds} == {
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(crds))
    for crd in crds:
        kubectl("wait", "--for=condition=established", f"crd/{crd['metadata']['name']}")
    yield
    for crd in crds:
        kubectl("delete", "crd", crd["metadata"]["name"], "--ignore-not-found", "--wait=false")


@pytest.fixture
def second_namespace(kube_config: Any, namespace: str) -> Iterator[str]:
    core = client.CoreV1Api(kube_config)
    name = f"{namespace}-b"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name, propagation_policy="Background")


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
        "peering.enabled=true,peering.standby.priority=100": "must be lower than peering.priority",
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
    assert "TASKLEASE_PEERING" not in env
    assert env["TASKLEASE_METRICS_PORT"] == "8080"
    (service,) = by_kind["Service"]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    # Clusterwide: one ClusterRole carries the operator's rules; no Role for it.
    assert [r["metadata"]["name"] for r in by_kind["ClusterRole"]] == ["tl-tasklease-operator"]
    assert [r["metadata"]["name"] for r in by_kind["Role"]] == ["tl-tasklease-runner"]
    assert by_kind["Role"][0]["metadata"]["namespace"] == "tasklease-system"
    assert by_kind["ValidatingAdmissionPolicy"] and by_kind["ValidatingAdmissionPolicyBinding"]
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
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {"customresourcedefinitions", "namespaces"}
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


@pytest.mark.parametrize("options", ["default", "all-options"])
def test_rendered_chart_applies_with_server_side_dry_run(
    helm: Helm,
    kubectl: Any,
    namespace: str,
    second_namespace: str,
    peering_crds: None,
    tmp_path: Path,
    options: str,
) -> None:
    values = {} if options == "default" else all_options([namespace, second_namespace])
    docs = helm.template("dry", namespace, values, tmp_path)
    kinds = {doc["kind"] for doc in docs}
    if options == "all-options":
        assert {"KopfPeering", "CustomResourceDefinition"} <= kinds
        components = [
            doc["metadata"]["labels"]["app.kubernetes.io/component"]
            for doc in docs
            if doc["kind"] == "Deployment"
        ]
        assert components.count("operator") == 2  # active and standby
        assert components.count("pool-runner") == 1  # pools.groups
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
            # pod, the one verb (pods delete) the happy path above does not use.
            cluster.create_task(
                "abandoned",
                ackTimeout="1s",
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
            assert operator.alive, operator.log()[-4000:]
        finally:
            operator.stop()
        log = operator.log()
        assert "Succeeded" in str(cluster.status("charted"))
        assert not _forbidden_lines(log), "\n".join(_forbidden_lines(log))


def test_peering_standby_runs_under_its_rbac(
    helm: Helm,
    control_plane: Any,
    kube_config: Any,
    namespace: str,
    peering_crds: None,
    tmp_path: Path,
) -> None:
    """Active and standby operators, as the chart runs them (TASKLEASE_PEERING and two
    priorities), under the chart's RBAC: the standby pauses, the active one works."""
    core = client.CoreV1Api(kube_config)
    custom = client.CustomObjectsApi(kube_config)
    values = scoped_values(namespace, peering={"enabled": True, "installCRDs": False})
    with installed(helm, namespace, tmp_path, values) as release:
        deployments = [d for d in release.documents if d["kind"] == "Deployment"]
        assert len(deployments) == 2
        peering_name = release.fullname
        # The post-install hook made the KopfPeering kopf keeps its keep-alives in.
        custom.get_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", peering_name
        )
        kubeconfig = _operator_kubeconfig(
            control_plane, core, namespace, release.operator_sa, tmp_path / "operator.kubeconfig"
        )
        processes: dict[str, OperatorProcess] = {}

        def role(deployment: dict[str, Any]) -> str:
            return str(deployment["metadata"]["labels"]["tasklease.io/operator-role"])

        try:
            for deployment in sorted(deployments, key=lambda d: role(d) != "active"):
                env = {
                    e["name"]: e["value"]
                    for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
                    if e["name"] in ("TASKLEASE_PEERING", "TASKLEASE_PRIORITY")
                }
                assert env["TASKLEASE_PEERING"] == peering_name
                processes[role(deployment)] = OperatorProcess(
                    kubeconfig=kubeconfig,
                    namespace=namespace,
                    log_path=tmp_path / f"operator-{role(deployment)}.log",
                    extra_env=env,
                ).start()
                if role(deployment) == "active":
                    # Started together, the standby may see no peer yet and work for a
                    # moment (kopf peering is no lock); start it once the active one is up.
                    wait_for(
                        "the active operator to resume",
                        lambda: RESUMING in processes["active"].log(),
                        timeout=60,
                    )
            # Both keep-alives in the peering object; kopf starts a peered operator paused and
            # resumes only the highest priority.
            wait_for(
                "both operators' keep-alives in the KopfPeering",
                lambda: (
                    len(
                        custom.get_namespaced_custom_object(
                            "kopf.dev", "v1", namespace, "kopfpeerings", peering_name
                        ).get("status")
                        or {}
                    )
                    == 2
                ),
                timeout=60,
            )
            cluster = Cluster(kube_config, namespace)
            template = {
                "spec": {
                    "serviceAccountName": RUNNER_SA,
                    "containers": [{"name": "runner", "image": "tasklease:0.1.0"}],
                }
            }
            cluster.create_task("peered", template=template)
            cluster.wait_epoch("peered", 1)
            assert RESUMING not in processes["standby"].log(), "the standby must stay paused"
            # A graceful stop of the active one (a rollout, a drained node) removes its
            # keep-alive; the standby takes over at once.
            processes["active"].stop()
            wait_for(
                "the standby to take over",
                lambda: RESUMING in processes["standby"].log(),
                timeout=60,
            )
            cluster.create_task("after-failover", template=template)
            cluster.wait_epoch("after-failover", 1)
        finally:
            for process in processes.values():
                process.stop()
        for name, process in processes.items():
            lines = _forbidden_lines(process.log())
            assert not lines, f"{name}:\n" + "\n".join(lines)
        custom.delete_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", peering_name
        )
