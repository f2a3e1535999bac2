"""The local real node, and the product as users run it on it.

First the node itself: it runs pods as containers, reachable from the host, and stops
leaving nothing behind, so that two runs back to back both work. (That pods reach the API
server as in-cluster clients do is what every operator and runner pod below does.) Then the
product: the image built from the Dockerfile (`make image`), installed by the chart (`helm
install`, the README's own lines), the operator and the runner pods as containers of that
image, under the chart's ServiceAccounts, RBAC and admission policies. One module, so that a
parallel run keeps the node's tests on one worker: two nodes at once would share the
kubelet's fixed host paths.

The README's install lines are read from the README and run as a user's shell runs them, so
the docs cannot drift from what is tested. The tests share one release, in the order a user
meets things: install, run, failures of runners, upgrade, leader failover, uninstall; then
the install from a registry, on a namespace of its own making.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import config

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import LocalCluster, LocalRegistry
from tests.e2e.hoststate import host_state
from tests.integration.support import Cluster, wait_for
from tests.monitoring.prometheus import assert_every_query_has_data, running_prometheus
from tests.readme import readme_lines

if TYPE_CHECKING:
    from tasklease.controlplane import Binaries
    from tasklease.controlplane.node import NodeImages

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

NAMESPACE = "tasklease-system"
RELEASE = "tasklease"
OPERATOR = "deployment/tasklease-operator"
IMAGE = "tasklease:0.1.0"
README_MARKER = "<!-- tests/e2e/test_real_node.py runs these lines as they are -->"
# The CLI's default state dir; the README's KUBECONFIG line names the kubeconfig in it.
DEFAULT_KUBECONFIG = "$PWD/.tasklease/controlplane/kubeconfig"


# A runner that works `seconds` long under the wrapper, reporting each second.
def wrapped_sleeper(seconds: int) -> list[str]:
    script = (
        f'i=${{TASKLEASE_CHECKPOINT:-0}}; while [ "$i" -lt {seconds} ]; do i=$((i + 1)); '
        f'printf "%s/{seconds}\\nsecond %s\\ncheckpoint=%s\\n" "$i" "$i" "$i" '
        f'> "$TASKLEASE_PROGRESS_FILE"; sleep 1; done'
    )
    return ["tasklease", "run", "--", "sh", "-c", script]


def template(command: list[str], *, grace_s: int = 2) -> dict[str, Any]:
    return {
        "spec": {
            "serviceAccountName": "tasklease-runner",
            "terminationGracePeriodSeconds": grace_s,
            "containers": [{"name": "runner", "image": IMAGE, "command": command}],
        }
    }


# The pause image listens nowhere; its sandbox is what a pod's network and mounts are made of.
POD = """
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: default}
spec:
  terminationGracePeriodSeconds: 0
  containers:
    - name: pause
      image: %(image)s
      imagePullPolicy: Never
"""


def test_node_runs_pods_and_stops_leaving_nothing_behind(
    control_plane_binaries: Binaries, node_images: NodeImages
) -> None:
    from tasklease.controlplane import ControlPlane

    before = host_state()
    for run in (1, 2):
        with ControlPlane.start(binaries=control_plane_binaries, node=node_images) as plane:
            assert plane.node is not None and plane.node.addresses is not None
            plane.kubectl("apply", "-f", "-", input=POD % {"image": node_images.sandbox_name})
            plane.kubectl("wait", "pod/probe", "--for=condition=Ready", "--timeout=60s")
            pod = json.loads(plane.kubectl("get", "pod", "probe", "-o", "json").stdout)
            assert pod["spec"]["nodeName"] == "tasklease-node"
            ip = pod["status"]["podIP"]
            assert ip.startswith(plane.node.addresses.pod_cidr.rsplit(".", 2)[0]), ip
            # The host routes the pod range to the node: a closed port answers at once.
            with pytest.raises(ConnectionRefusedError), socket.create_connection((ip, 9), 5):
                pass
            # `kubectl logs` goes from the API server to the kubelet.
            plane.kubectl("logs", "probe")
            # The snapshot sees a running node (else its equality below would prove nothing).
            seen = before.differences(host_state()).keys()
            assert {"processes", "mounts", "links", "netns", "cgroups", "files"} <= seen, seen
        differences = before.differences(host_state())
        assert not differences, f"run {run} left behind (missing, extra): {differences}"


@dataclass
class Release:
    """The installed chart, and the admin's view of its namespace."""

    cluster: LocalCluster
    tasks: Cluster

    def operator_pods(self) -> list[dict[str, Any]]:
        listed = self.cluster.kubectl(
            "-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
            "-o", "json",
        )  # fmt: skip
        pods: list[dict[str, Any]] = json.loads(listed.stdout)["items"]
        return [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]

    def pod(self, name: str) -> Any:
        """A pod that must exist."""
        found = self.tasks.pod(name)
        assert found is not None, f"pod {name} is gone"
        return found

    def container_id(self, pod_name: str) -> str:
        """The containerd id of a pod's first container (for `ctr tasks pause/kill`)."""

        def started() -> str | None:
            pod = self.tasks.pod(pod_name)
            statuses = (pod.status.container_statuses or []) if pod else []
            if statuses and statuses[0].container_id and statuses[0].state.running:
                return str(statuses[0].container_id).removeprefix("containerd://")
            return None

        return wait_for(f"pod {pod_name}'s container to run", started, timeout=60)

    def holder(self, task: str) -> tuple[str, int]:
        annotations = self.tasks.annotations(task)
        return annotations.get("tasklease.io/holder", ""), int(
            annotations.get("tasklease.io/epoch", "0")
        )

    def describe(self, task: str) -> str:
        return self.cluster.kubectl("-n", NAMESPACE, "describe", "task", task, check=False).stdout

    def create_runner_task(self, name: str, *, lease: str, work_s: int) -> None:
        """A Task whose wrapped runner works `work_s` seconds, heartbeating every second
        under `lease` (ack and progress timeouts); a lost lease is handed on at once."""
        self.tasks.create_task(
            name,
            ackTimeout=lease,
            reportProgressTimeout=lease,
            heartbeatInterval="1s",
            retry={"maxAttempts": 3, "backoff": {"initial": "0s"}},
            template=template(wrapped_sleeper(work_s)),
        )

    def start_runner(self, name: str, *, lease: str, work_s: int) -> str:
        """`create_runner_task`, then wait until it is Running; its runner pod's name."""
        self.create_runner_task(name, lease=lease, work_s=work_s)
        self.tasks.wait_phase(name, "Running", timeout=60)
        return self.holder(name)[0]

    def start_runners(self, prefix: str, *, lease: str, work_s: int) -> list[str]:
        """Three such Tasks; return once all are Running."""
        names = [f"{prefix}-{i}" for i in range(3)]
        for name in names:
            self.create_runner_task(name, lease=lease, work_s=work_s)
        for name in names:
            self.tasks.wait_phase(name, "Running", timeout=60)
        return names

    def assert_finished_in_one_attempt(self, names: list[str]) -> None:
        """Each Task Succeeded with its first epoch's pod, the only one it ever had."""
        for name in names:
            status = self.tasks.wait_phase(name, "Succeeded", timeout=60)
            attempts = [(a["epoch"], a["outcome"]) for a in status["attempts"]]
            assert attempts == [(1, "Succeeded")], self.describe(name)
            epochs = [pod.metadata.labels["tasklease.io/epoch"] for pod in self.tasks.pods(name)]
            assert epochs == ["1"], epochs

    def upgrade(self, *settings: str) -> None:
        """`helm upgrade --reuse-values --set ...`, then wait for the operator's rollout."""
        sets = [arg for setting in settings for arg in ("--set", setting)]
        self.cluster.helm(
            "upgrade", RELEASE, "charts/tasklease", "-n", NAMESPACE, "--reuse-values", *sets
        )
        self.cluster.kubectl("-n", NAMESPACE, "rollout", "status", OPERATOR, "--timeout=120s")


@pytest.fixture(scope="module")
def release(local_cluster: LocalCluster) -> Iterator[Release]:
    """The README's lines up to the operator's rollout: `make image`, `helm install`."""
    lines = readme_lines(README_MARKER)
    assert lines[0] == f"export KUBECONFIG={DEFAULT_KUBECONFIG}", lines[0]
    rollout = next(i for i, line in enumerate(lines) if "rollout status" in line)
    for line in lines[1 : rollout + 1]:
        result = local_cluster.sh(line, check=False)
        if result.returncode != 0:
            pods = local_cluster.kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide", check=False)
            logs = local_cluster.kubectl(
                "-n", NAMESPACE, "logs", OPERATOR, "--all-containers", "--previous", check=False
            )  # fmt: skip
            raise AssertionError(
                f"the README's `{line}` failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                f"{result.stderr[-2000:]}\npods:\n{pods.stdout}\nthe operator's last log:\n"
                f"{(logs.stdout + logs.stderr)[-3000:]}"
            )
    api = config.new_client_from_config(config_file=str(local_cluster.kubeconfig))
    try:
        yield Release(local_cluster, Cluster(api, NAMESPACE))
    finally:
        local_cluster.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)
        api.close()


def test_operator_image_runs_as_the_chart_runs_it(release: Release) -> None:
    """UID 65532 with no passwd entry, read-only root filesystem, every capability dropped:
    the operator starts and stays Ready, and the image holds the operator and the runner,
    not the local-cluster tooling."""
    (pod,) = release.operator_pods()
    name = pod["metadata"]["name"]
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0, status
    assert status["image"].endswith(IMAGE), status["image"]

    def in_operator(*argv: str) -> Any:
        return release.cluster.kubectl("-n", NAMESPACE, "exec", name, "--", *argv, check=False)

    probe = in_operator(
        "python", "-c",
        "import json, os, pathlib; print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), "
        "'caps': [l.split()[1] for l in pathlib.Path('/proc/self/status').read_text()"
        ".splitlines() if l.startswith('CapEff')][0]}))",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"uid": 65532, "gid": 65532, "caps": "0" * 16}
    passwd = in_operator("python", "-c", "import pwd; pwd.getpwuid(65532)")
    assert "uid not found" in passwd.stderr, "the test proves nothing if UID 65532 has an entry"
    read_only = in_operator("touch", "/usr/local/lib/written-by-the-operator")
    assert read_only.returncode != 0 and "Read-only file system" in read_only.stderr
    tooling = in_operator("python", "-c", "import tasklease.controlplane")
    assert "No module named 'tasklease.controlplane'" in tooling.stderr
    shipped = in_operator("python", "-c", "import tasklease.operator.main, tasklease.runner")
    assert shipped.returncode == 0, shipped.stderr
    log = release.cluster.kubectl("-n", NAMESPACE, "logs", name).stdout
    assert "Traceback" not in log, log[-3000:]


def test_helm_install_runs_a_task_in_real_containers(release: Release) -> None:
    """The README's remaining lines (an example Task applied, waited for until Succeeded),
    then the example Task the install notes print."""
    lines = readme_lines(README_MARKER)
    rollout = next(i for i, line in enumerate(lines) if "rollout status" in line)
    for line in lines[rollout + 1 :]:
        release.cluster.sh(line)
    status = release.tasks.status("load-orders")
    assert status["phase"] == "Succeeded"
    assert [attempt["outcome"] for attempt in status["attempts"]] == ["Succeeded"]
    # The chart's operator compacted managedFields at the hand-out: kubectl's entry (the
    # whole spec) is gone, so the heartbeats did not rewrite it (compactManagedFields).
    managed = release.tasks.task("load-orders")["metadata"]["managedFields"]
    assert {entry["manager"] for entry in managed} == {"tasklease-operator", "tasklease-runner"}
    (pod,) = release.tasks.pods("load-orders")
    assert pod.spec.node_name == "tasklease-node"
    assert pod.spec.service_account_name == "tasklease-runner"

    # The wrapper exits with its program's status once it has reported the result.
    def exited() -> Any:
        container = release.pod(pod.metadata.name).status.container_statuses[0]
        return container if container.state.terminated else None

    container = wait_for("the runner's container to exit", exited)
    assert container.image.endswith(IMAGE)
    assert container.state.terminated.exit_code == 0, container.state.terminated

    notes = release.cluster.helm("get", "notes", RELEASE, "-n", NAMESPACE).stdout
    heredoc = re.search(r"apply -f - *\n(.*?)\n\s*YAML", notes, re.S)
    assert heredoc is not None, notes
    manifest = yaml.safe_load(_dedent(heredoc.group(1)))
    release.cluster.kubectl("-n", NAMESPACE, "apply", "-f", "-", input=json.dumps(manifest))
    name = manifest["metadata"]["name"]
    release.tasks.wait_phase(name, "Succeeded", timeout=90)


def _dedent(block: str) -> str:
    lines = [line for line in block.splitlines() if line.strip()]
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    return "\n".join(line[indent:] for line in lines)


def test_hung_runner_container_is_replaced(release: Release) -> None:
    """The runner's container frozen (cgroup freezer, `ctr tasks pause`) while its pod stays
    Running, as a hung process does: the operator hands the task on (ProgressTimeout) and
    the new pod resumes from the last checkpoint and finishes."""
    name = "hung-runner"
    first_pod = release.start_runner(name, lease="6s", work_s=10)
    container = release.container_id(first_pod)
    wait_for(
        "a checkpoint past the first second",
        lambda: int((release.tasks.status(name).get("progress") or {}).get("checkpoint") or 0) >= 3,
        timeout=30,
    )
    release.cluster.ctr("tasks", "pause", container)
    try:
        wait_for(
            "the hung runner's pod to still be Running while the task moves on",
            lambda: release.holder(name)[1] == 2,
            timeout=30,
        )
        assert release.pod(first_pod).status.phase == "Running"
        checkpoint = release.tasks.status(name)["progress"]["checkpoint"]
        status = release.tasks.wait_phase(name, "Succeeded", timeout=60)
    finally:
        release.cluster.ctr("tasks", "resume", container, check=False)
    outcomes = [attempt["outcome"] for attempt in status["attempts"]]
    assert outcomes == ["ProgressTimeout", "Succeeded"], release.describe(name)
    second = next(
        pod for pod in release.tasks.pods(name) if pod.metadata.labels["tasklease.io/epoch"] == "2"
    )
    env = {item.name: item.value for item in second.spec.containers[0].env}
    assert env["TASKLEASE_CHECKPOINT"] == json.dumps(checkpoint), env


def test_killed_runner_container_is_replaced_at_once(release: Release) -> None:
    """SIGKILL of the runner's container: the pod fails, and the operator ends the attempt as
    PodFailed and starts the next one, without waiting for any lease timeout (a minute)."""
    name = "killed-runner"
    first_pod = release.start_runner(name, lease="60s", work_s=5)
    release.cluster.ctr(
        "tasks", "kill", "--all", "--signal", "SIGKILL", release.container_id(first_pod)
    )
    status = release.tasks.wait_phase(name, "Succeeded", timeout=50)
    outcomes = [attempt["outcome"] for attempt in status["attempts"]]
    assert outcomes == ["PodFailed", "Succeeded"], release.describe(name)


def test_prometheus_scrapes_the_chart_installed_operator(release: Release, tmp_path: Path) -> None:
    """The monitoring the chart ships, on the operator as the chart runs it: a real Prometheus
    scrapes the operator pod's metrics port (what the chart's ServiceMonitor points at) while
    a runner container is killed and its Task handed on, and every dashboard query and alert
    expression has data, every rule evaluates, and neither down nor not-leading fires."""
    (pod,) = release.operator_pods()
    target = f"{pod['status']['podIP']}:8080"  # the chart's metrics.port
    with running_prometheus(tmp_path, target) as prometheus:
        wait_for(
            "Prometheus to scrape the operator pod",
            lambda: prometheus.query('up{job="tasklease"} == 1'),
            timeout=60,
        )
        name = "watched-runner"
        first_pod = release.start_runner(name, lease="60s", work_s=3)
        release.cluster.ctr(
            "tasks", "kill", "--all", "--signal", "SIGKILL", release.container_id(first_pod)
        )
        release.tasks.wait_phase(name, "Succeeded", timeout=50)
        wait_for(
            "Prometheus to have scraped the reassignment",
            lambda: prometheus.query(
                'increase(tasklease_reassignments_total{job="tasklease", reason="PodFailed"}[1m])'
                " > 0"
            ),
            timeout=30,
        )
        assert_every_query_has_data(prometheus)


def _token_kubeconfig(release: Release, pod: str, path: Path) -> dict[str, str]:
    """A kubeconfig holding a token of the chart's runner ServiceAccount bound to `pod`: what
    the pod's own projected token is (the pod-name claim the admission policy reads)."""
    token = release.cluster.kubectl(
        "-n", NAMESPACE, "create", "token", "tasklease-runner",
        "--bound-object-kind=Pod", f"--bound-object-name={pod}", "--duration=10m",
    ).stdout.strip()  # fmt: skip
    admin = yaml.safe_load(release.cluster.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": "runner", "user": {"token": token}}],
                "contexts": [{"name": "runner", "context": {"cluster": "local", "user": "runner"}}],
                "current-context": "runner",
            }
        )
    )
    return {"KUBECONFIG": str(path)}


def _readme_runner_lines() -> dict[str, str]:
    """The README's kubectl-only runner lines: the report (ack and heartbeat) and results."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Nothing but kubectl", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("kubectl patch task")]
    report = next(line for line in lines if "/status/progress" in line)
    finished = next(line for line in lines if '"status":"FINISHED"' in line)
    return {"report": report, "finished": finished}


def test_readme_kubectl_runner_under_the_chart_rbac(release: Release, tmp_path: Path) -> None:
    """The README's kubectl lines, as the chart's runner ServiceAccount with a token bound to
    the runner pod: they acknowledge and heartbeat; after the lease moved on, the old pod's
    write is refused by the API server; the new pod's result finishes the task."""
    lines = _readme_runner_lines()
    name = "kubectl-runner"
    release.tasks.create_task(
        name,
        ackTimeout="6s",
        reportProgressTimeout="6s",
        heartbeatInterval="1s",
        retry={"maxAttempts": 3, "backoff": {"initial": "0s"}},
        # The container only holds the pod (and so its token) alive; the test plays its
        # runner with the README's lines. A long grace period keeps the replaced pod, and
        # so its token, valid while the zombie writes.
        template=template(["sleep", "3600"], grace_s=60),
    )
    release.tasks.wait_epoch(name, 1, timeout=60)

    def as_runner(pod_name: str, line: str, beat: int) -> Any:
        pod = release.pod(pod_name)
        env = {item.name: item.value for item in pod.spec.containers[0].env if item.value}
        env["TASKLEASE_POD_NAME"] = pod_name
        env["BEATS"] = str(beat)
        env |= _token_kubeconfig(release, pod_name, tmp_path / f"{pod_name}.kubeconfig")
        return release.cluster.sh(line, check=False, env=env)

    first, _ = release.holder(name)
    for beat in (1, 2, 3):
        result = as_runner(first, lines["report"], beat)
        assert result.returncode == 0, result.stderr
    assert release.tasks.status(name)["phase"] == "Running"

    wait_for("the task handed on after the reports stopped", lambda: release.holder(name)[1] == 2,
             timeout=30)  # fmt: skip
    zombie = as_runner(first, lines["report"], 4)
    assert zombie.returncode == 1, zombie.stdout + zombie.stderr
    assert "the server rejected our request" in zombie.stderr, zombie.stderr

    second, _ = release.holder(name)
    assert second != first
    assert as_runner(second, lines["report"], 1).returncode == 0
    assert as_runner(second, lines["finished"], 2).returncode == 0
    status = release.tasks.wait_phase(name, "Succeeded", timeout=30)
    assert [a["outcome"] for a in status["attempts"]] == ["ProgressTimeout", "Succeeded"]


def test_helm_upgrade_keeps_running_leases(release: Release) -> None:
    """A new image tag rolled out while Tasks heartbeat: the operator is replaced, and no
    lease is taken from a runner that kept reporting."""
    # A second tag of the same image: containerd knows it under its normalised name.
    imported = release.cluster.ctr("images", "list", "--quiet").stdout.split()
    (image,) = [found for found in imported if found.endswith(f"/library/{IMAGE}")]
    release.cluster.ctr("images", "tag", "--force", image, f"{image}-upgrade")
    names = release.start_runners("upgrade", lease="8s", work_s=15)
    (before,) = release.operator_pods()
    release.upgrade("image.tag=0.1.0-upgrade")
    (after,) = release.operator_pods()
    assert after["metadata"]["name"] != before["metadata"]["name"]
    assert after["spec"]["containers"][0]["image"] == f"{IMAGE}-upgrade"
    release.assert_finished_in_one_attempt(names)


def test_leader_pod_killed_standby_takes_over(release: Release) -> None:
    """Two replicas with leader election; the leader's container is killed (SIGKILL, no
    release of its Lease): the standby takes over, no running lease is taken back, and no
    epoch is handed out twice."""
    release.upgrade("leaderElection.enabled=true", "operator.replicas=2")
    pods = {pod["metadata"]["name"] for pod in release.operator_pods()}

    def leader(among: set[str]) -> str | None:
        identity = release.cluster.kubectl(
            "-n", NAMESPACE, "get", "lease", "tasklease-operator",
            "-o", "jsonpath={.spec.holderIdentity}", check=False,
        ).stdout  # fmt: skip
        pod = identity.rsplit("_", 1)[0]  # `<pod>_<random>`
        return pod if pod in among else None

    first = wait_for("a leader among the operator pods", lambda: leader(pods))
    names = release.start_runners("failover", lease="30s", work_s=30)
    release.cluster.ctr("tasks", "kill", "--all", "--signal", "SIGKILL",
                        release.container_id(first))  # fmt: skip
    wait_for("the standby to take the Lease", lambda: leader(pods - {first}), timeout=60)
    release.assert_finished_in_one_attempt(names)


def test_helm_uninstall_keeps_tasks_and_crd(release: Release) -> None:
    before = json.loads(release.cluster.kubectl("get", "tasks", "-A", "-o", "json").stdout)["items"]
    assert before, "the earlier tests left Tasks to keep"
    release.cluster.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    deployments = release.cluster.kubectl("-n", NAMESPACE, "get", "deployments", "-o", "name")
    assert deployments.stdout.strip() == ""
    release.cluster.kubectl("get", "crd", "tasks.tasklease.io")
    after = json.loads(release.cluster.kubectl("get", "tasks", "-A", "-o", "json").stdout)["items"]
    assert sorted(t["metadata"]["uid"] for t in after) == sorted(
        t["metadata"]["uid"] for t in before
    )
    # The finished Tasks keep their status too: nothing ran that would have rewritten them.
    assert {t["metadata"]["name"]: t["status"]["phase"] for t in after} == {
        t["metadata"]["name"]: t["status"]["phase"] for t in before
    }


# --- installing from a registry -----------------------------------------------------------
# The README's registry lines, after the release above is gone: the image built from the
# Dockerfile pushed to a real OCI registry on this machine (`make registry`), the chart
# packaged and pushed there as an OCI artifact, `helm install oci://...`, and the node pulling
# the image (`imagePullPolicy: IfNotPresent`, the chart's default) instead of having it
# imported. The pull is proven where it happens: containerd lacks the image before the
# install and has it after, the operator pod's Events say the kubelet pulled it from the
# registry, and the runner container runs the very manifest the registry serves.

REGISTRY_README_MARKER = (
    "<!-- tests/e2e/test_real_node.py runs these registry lines as they are -->"
)
VERSION = "0.1.0"  # the chart's version and appVersion, the image's tag
CHART_ARCHIVE = REPO_ROOT / ".tasklease" / "charts" / f"tasklease-{VERSION}.tgz"
SBOM = "/usr/share/doc/tasklease/sbom.cdx.json"
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def manifest_digest(registry: str, repository: str, reference: str) -> str:
    """The digest of the manifest the registry serves for `repository:reference`."""
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{reference}",
        method="HEAD",
        headers={"Accept": MANIFEST_TYPES},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return str(response.headers["Docker-Content-Digest"])


def pod_events(cluster: LocalCluster, pod: str) -> list[tuple[str, str]]:
    listed = cluster.kubectl(
        "-n", NAMESPACE, "get", "events", "--field-selector", f"involvedObject.name={pod}",
        "-o", "json",
    )  # fmt: skip
    return [(e["reason"], e["message"]) for e in json.loads(listed.stdout)["items"]]


def pods_of(cluster: LocalCluster, selector: str) -> list[dict[str, Any]]:
    listed = cluster.kubectl("-n", NAMESPACE, "get", "pods", "-l", selector, "-o", "json")
    found: list[dict[str, Any]] = json.loads(listed.stdout)["items"]
    return found


def _remove_release(cluster: LocalCluster) -> None:
    """No release, no Task and no namespace of ours: test_real_node.py keeps its Tasks after
    its `helm uninstall` (by design), and an old `load-orders` would make the wait pass."""
    cluster.kubectl("-n", NAMESPACE, "delete", "tasks", "--all", "--wait", check=False)
    cluster.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)
    cluster.kubectl(
        "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait", "--timeout=120s"
    )


@pytest.fixture
def clean_install(local_cluster: LocalCluster) -> Iterator[None]:
    _remove_release(local_cluster)
    # What `helm package` makes and the test removes: the archive and the folders it lacked.
    made = [
        path
        for path in (CHART_ARCHIVE, *CHART_ARCHIVE.parents)
        if path.is_relative_to(REPO_ROOT) and path != REPO_ROOT and not path.exists()
    ]
    try:
        yield
    finally:
        _remove_release(local_cluster)
        for path in made:  # deepest first
            with contextlib.suppress(OSError):
                path.unlink() if path.is_file() else path.rmdir()


# The README's lines build the image (minutes when the build context changed) and the node
# pulls it through the registry: longer than the suite's default of 300 s.
@pytest.mark.timeout(1800)
def test_install_from_registry(
    local_cluster: LocalCluster, local_registry: LocalRegistry, clean_install: None
) -> None:
    registry = local_registry.address
    image = f"{registry}/tasklease:{VERSION}"
    lines = readme_lines(REGISTRY_README_MARKER)
    # The first two lines point the shell at the cluster and the registry; here the fixtures
    # started both on folders of their own and say where (KUBECONFIG, REGISTRY).
    assert lines[0] == "export KUBECONFIG=$PWD/.tasklease/controlplane/kubeconfig", lines[0]
    assert lines[1] == "export REGISTRY=$(cat .tasklease/registry/address)", lines[1]
    assert image not in local_cluster.ctr("images", "list", "--quiet").stdout.split()

    script = "\n".join(["set -ex", *lines[2:]])
    result = local_cluster.sh(script, env={"REGISTRY": registry}, timeout=1200, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        described = local_cluster.kubectl(
            "-n", NAMESPACE, "describe", "pods", "-l", "app.kubernetes.io/component=operator",
            check=False,
        )  # fmt: skip
        raise AssertionError(
            f"the README's lines failed ({result.returncode}):\n{output[-5000:]}\n"
            f"operator pods:\n{described.stdout[-3000:]}\ncontainerd:\n"
            f"{local_cluster.node_log('containerd')}"
        )

    # The image: pushed by `make image PUSH=...`, pulled by the kubelet for the operator.
    image_digest = manifest_digest(registry, "tasklease", VERSION)
    assert f"pushed {image} ({image_digest})" in output, output[-3000:]
    assert image in local_cluster.ctr("images", "list", "--quiet").stdout.split()
    (operator,) = pods_of(local_cluster, "app.kubernetes.io/component=operator")
    (container,) = operator["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == (image, "IfNotPresent")
    reasons = pod_events(local_cluster, operator["metadata"]["name"])
    assert ("Pulling", f'Pulling image "{image}"') in reasons, reasons
    assert any(
        reason == "Pulled" and message.startswith(f'Successfully pulled image "{image}"')
        for reason, message in reasons
    ), reasons
    (status,) = operator["status"]["containerStatuses"]
    assert status["imageID"] == f"{registry}/tasklease@{image_digest}", status

    # The chart: pulled from the registry by `helm install oci://...`, with its metadata.
    chart_digest = manifest_digest(registry, "charts/tasklease", VERSION)
    assert f"Pulled: {registry}/charts/tasklease:{VERSION}" in output, output[-3000:]
    assert f"Digest: {chart_digest}" in output, output[-3000:]
    listed = json.loads(local_cluster.helm("list", "-n", NAMESPACE, "-o", "json").stdout)
    assert [(r["name"], r["chart"]) for r in listed] == [(RELEASE, f"tasklease-{VERSION}")]
    shown = local_cluster.helm(
        "show", "chart", f"oci://{registry}/charts/tasklease", "--version", VERSION,
        "--plain-http",
    ).stdout  # fmt: skip
    assert "artifacthub.io/crds" in shown and "artifacthub.io/images" in shown, shown

    # The Task ran in a runner container of the image the registry serves; the wrapper exits
    # once it has reported the result.
    def runner_exited() -> dict[str, Any] | None:
        (runner,) = pods_of(local_cluster, "tasklease.io/task=load-orders")
        statuses = runner["status"].get("containerStatuses") or [{}]
        return statuses[0] if "terminated" in statuses[0].get("state", {}) else None

    runner_status = wait_for("the runner's container to exit", runner_exited, timeout=60)
    assert runner_status["image"] == image, runner_status
    assert runner_status["imageID"] == f"{registry}/tasklease@{image_digest}", runner_status
    assert runner_status["state"]["terminated"]["exitCode"] == 0, runner_status
    task = json.loads(
        local_cluster.kubectl("-n", NAMESPACE, "get", "task", "load-orders", "-o", "json").stdout
    )
    assert [a["outcome"] for a in task["status"]["attempts"]] == ["Succeeded"], task["status"]

    # The image's SBOM lists exactly the Python distributions installed in it.
    probe = local_cluster.kubectl(
        "-n", NAMESPACE, "exec", operator["metadata"]["name"], "--", "python", "-c",
        "import importlib.metadata as m, json; "
        f"sbom = json.load(open({SBOM!r})); "
        "print(json.dumps({'sbom': {c['name']: c['version'] for c in sbom['components']}, "
        "'installed': {d.metadata['Name']: d.version for d in m.distributions()}}))",
    )  # fmt: skip
    found = json.loads(probe.stdout)

    def normalized(names: dict[str, str]) -> dict[str, str]:
        return {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in names.items() if k != "pip"}

    assert normalized(found["sbom"]) == normalized(found["installed"]), found
    assert normalized(found["sbom"])["tasklease"] == VERSION
