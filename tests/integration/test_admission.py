"""The chart's ValidatingAdmissionPolicy: a runner's write to status.progress or status.result
is admitted only from the pod holding the lease, and only with the current epoch.

Runners are played two ways: with real tokens bound to a pod (TokenRequest with a Pod
`boundObjectRef`, what a kubelet projects into the runner pod), and by the admin
impersonating the runner ServiceAccount with the pod-name extra. The writes here carry no
JSON Patch `test` fence, like a runner that skips the SDK: only the policy stands in the way.

The chart is installed once for the module into its own namespace, and the policy binding
matches that namespace only (the control plane is shared by the whole session).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client

from tasklease.runner import Identity, TaskLease
from tests.integration.chart_support import (
    RUNNER_SA,
    ChartInstaller,
    ChartSetup,
    impersonating_client,
    leased_task,
    message,
    patch_status,
    progress,
    result,
    runner_pod,
    service_account_token,
    token_client,
)
from tests.integration.support import wait_for

pytestmark = pytest.mark.cluster

HOLDER = "runner-a"
OTHER = "runner-b"


@dataclass
class Setup(ChartSetup):
    pods: dict[str, Any] = dataclasses.field(default_factory=dict)  # runner pods, by name

    def as_pod(self, pod: str, how: str) -> client.ApiClient:
        """The runner ServiceAccount acting from `pod`, by bound token or impersonation."""
        if how == "bound-token":
            core = client.CoreV1Api(self.admin)
            token = service_account_token(core, self.namespace, RUNNER_SA, pod=self.pods[pod])
            return token_client(self.control_plane, token)
        return impersonating_client(self.control_plane, self.release.runner_user(), pod=pod)

    def task(self, *, holder: str = HOLDER, epoch: int = 2, with_status: bool = True) -> str:
        """A Task leased to `holder` at `epoch`, with the status the operator would have
        written at hand-out (unless `with_status` is False)."""
        name = f"task-{secrets.token_hex(3)}"
        leased_task(self.admin, self.namespace, name, holder=holder, epoch=epoch)
        if with_status:
            status = {"phase": "Assigned", "attempt": 1, "epoch": epoch, "holder": holder or None}
            assert patch_status(self.admin, self.namespace, name, status) is None
        return name


@pytest.fixture(scope="module")
def setup(chart_installer: ChartInstaller) -> Iterator[Setup]:
    with chart_installer.install(Setup, prefix="vap") as ready:
        assert "ValidatingAdmissionPolicy" in ready.release.kinds()
        for name in (HOLDER, OTHER):
            ready.pods[name] = runner_pod(ready.cluster.core, ready.namespace, name)
        _wait_until_policy_is_active(ready)
        yield ready


def _wait_until_policy_is_active(setup: Setup) -> None:
    """A new policy takes a moment to be enforced: poll until a known-bad write is refused.

    (Its CEL is type-checked against the Task schema by kube-controller-manager's
    validatingadmissionpolicy-status controller, which the test control plane does not run;
    an expression that failed at run time would refuse every write here, positive cases
    included, with failurePolicy Fail.)"""
    name = setup.task()
    intruder = setup.as_pod(OTHER, "impersonation")
    wait_for(
        "the admission policy to refuse a non-holder's write",
        lambda: (
            patch_status(intruder, setup.namespace, name, {"progress": progress(2)}) is not None
        ),
        timeout=60,
    )


IDENTITIES = ["bound-token", "impersonation"]


@pytest.mark.parametrize("how", IDENTITIES)
def test_admission_refuses_non_holder_pod(setup: Setup, how: str) -> None:
    name = setup.task(holder=HOLDER, epoch=2)
    intruder = setup.as_pod(OTHER, how)
    for field, value in (("progress", progress(2)), ("result", result(2))):
        refusal = patch_status(intruder, setup.namespace, name, {field: value})
        assert refusal is not None, f"{OTHER} wrote status.{field} of a task held by {HOLDER}"
        assert refusal.status == 403
        text = message(refusal)
        assert (
            f"pod {OTHER} does not hold the lease on task {name}: the holder is pod {HOLDER} "
            f"(epoch 2); only the holder may write status.progress and status.result"
        ) in text, text
        assert "ValidatingAdmissionPolicy" in text
    status = setup.cluster.status(name)
    assert "progress" not in status and "result" not in status


@pytest.mark.parametrize("how", IDENTITIES)
def test_admission_refuses_stale_epoch(setup: Setup, how: str) -> None:
    name = setup.task(holder=HOLDER, epoch=2)
    holder = setup.as_pod(HOLDER, how)
    for field, value in (("progress", progress(1)), ("result", result(1))):
        refusal = patch_status(holder, setup.namespace, name, {field: value})
        assert refusal is not None, f"status.{field} with stale epoch 1 was admitted"
        assert refusal.status == 422
        text = message(refusal)
        assert (
            f"stale epoch: pod {HOLDER} wrote status.{field} with epoch 1 but the current "
            f"epoch of task {name} is 2 (holder {HOLDER})"
        ) in text, text
        assert "handed out" not in text, text
    # Epochs compare as numbers: 9 is below 10.
    name = setup.task(holder=HOLDER, epoch=10)
    refusal = patch_status(holder, setup.namespace, name, {"progress": progress(9)})
    assert refusal is not None and refusal.status == 422
    assert f"stale epoch: pod {HOLDER} wrote status.progress with epoch 9" in message(refusal)


@pytest.mark.parametrize("how", IDENTITIES)
def test_admission_refuses_a_future_epoch_saying_it_is_ahead(setup: Setup, how: str) -> None:
    """An epoch above the current one is no better than a stale one, but it is not stale:
    the refusal says it was never handed out. (Epochs compare as numbers: 10 is above 9.)"""
    name = setup.task(holder=HOLDER, epoch=9)
    holder = setup.as_pod(HOLDER, how)
    for field, value in (("progress", progress(10)), ("result", result(10))):
        refusal = patch_status(holder, setup.namespace, name, {field: value})
        assert refusal is not None, f"status.{field} with future epoch 10 was admitted"
        assert refusal.status == 422
        text = message(refusal)
        assert (
            f"future epoch: pod {HOLDER} wrote status.{field} with epoch 10 but the current "
            f"epoch of task {name} is 9 (holder {HOLDER}); epoch 10 has not been handed out"
        ) in text, text
        assert "stale" not in text, text
    status = setup.cluster.status(name)
    assert "progress" not in status and "result" not in status


@pytest.mark.parametrize("how", IDENTITIES)
def test_admission_admits_the_holder_with_the_current_epoch(setup: Setup, how: str) -> None:
    name = setup.task(holder=HOLDER, epoch=2)
    holder = setup.as_pod(HOLDER, how)
    assert patch_status(holder, setup.namespace, name, {"progress": progress(2, 40.0)}) is None
    assert patch_status(holder, setup.namespace, name, {"progress": progress(2, 80.0)}) is None
    assert patch_status(holder, setup.namespace, name, {"result": result(2)}) is None
    status = setup.cluster.status(name)
    assert status["progress"]["percent"] == 80.0
    assert status["result"]["status"] == "FINISHED"


def test_the_runner_sdk_passes_the_policy_with_a_bound_token(setup: Setup) -> None:
    """The real runner path: the SDK's fenced JSON Patches, from the holder pod's token."""
    name = setup.task(holder=HOLDER, epoch=2)
    identity = Identity(task=name, namespace=setup.namespace, epoch=2, pod_name=HOLDER)
    with TaskLease(identity, api_client=setup.as_pod(HOLDER, "bound-token")) as lease:
        assert lease.progress(percent=50, checkpoint={"row": 5})
    assert not lease.lost, lease.cancel_reason
    assert setup.cluster.status(name)["result"]["epoch"] == 2


def test_a_failure_with_its_checkpoint_passes_the_policy_in_one_write(setup: Setup) -> None:
    """fail(checkpoint=...) changes status.progress and status.result in one write: each
    carries the current epoch, and the holder's bound token passes both rules at once."""
    name = setup.task(holder=HOLDER, epoch=2)
    identity = Identity(task=name, namespace=setup.namespace, epoch=2, pod_name=HOLDER)
    with TaskLease(identity, api_client=setup.as_pod(HOLDER, "bound-token")) as lease:
        assert lease.progress(percent=50, checkpoint={"row": 5})
        lease.fail("Transient", "connection reset", checkpoint={"row": 7})
    assert not lease.lost, lease.cancel_reason
    status = setup.cluster.status(name)
    assert (status["result"]["status"], status["result"]["epoch"]) == ("FAILED", 2)
    assert (status["progress"]["checkpoint"], status["progress"]["epoch"]) == ({"row": 7}, 2)


def test_the_runner_sdk_from_another_pod_is_refused_every_time(setup: Setup) -> None:
    """A runner whose fence passes (it claims the holder's name) but whose token belongs to
    another pod: the policy refuses every write. The Task still names the pod the runner
    claims to be, so nothing proves the lease moved: the SDK keeps trying (and gives up
    once its report window has passed with nothing delivered) and nothing is written."""
    name = setup.task(holder=HOLDER, epoch=2)
    impostor = Identity(task=name, namespace=setup.namespace, epoch=2, pod_name=HOLDER)
    lease = TaskLease(impostor, api_client=setup.as_pod(OTHER, "bound-token"))
    lease.start()
    assert lease.progress(percent=10) is False
    lease.close()
    assert f"pod {OTHER} does not hold the lease on task {name}" in (lease.last_report_error or "")
    assert "progress" not in setup.cluster.status(name)


def test_admission_refuses_a_token_not_bound_to_a_pod(setup: Setup) -> None:
    name = setup.task(holder=HOLDER, epoch=2)
    core = client.CoreV1Api(setup.admin)
    unbound = token_client(
        setup.control_plane, service_account_token(core, setup.namespace, RUNNER_SA)
    )
    refusal = patch_status(unbound, setup.namespace, name, {"progress": progress(2)})
    assert refusal is not None and refusal.status == 403
    assert (
        f"{setup.release.runner_user()} (its token is not bound to a pod) does not hold the "
        f"lease on task {name}"
    ) in message(refusal)


def test_admission_refuses_writes_to_a_task_nobody_holds(setup: Setup) -> None:
    name = setup.task(holder="", epoch=2)
    refusal = patch_status(
        setup.as_pod(HOLDER, "impersonation"), setup.namespace, name, {"progress": progress(2)}
    )
    assert refusal is not None and refusal.status == 403
    assert f"task {name} is not leased to any pod: pod {HOLDER} may not write" in message(refusal)


def test_operator_and_admin_writes_are_not_matched(setup: Setup) -> None:
    name = setup.task(holder=HOLDER, epoch=2)
    # The admin (a client certificate, not a service account), e.g. a test playing a runner.
    assert patch_status(setup.admin, setup.namespace, name, {"progress": progress(1)}) is None
    # The operator's own ServiceAccount (it may clear or rewrite status when ending attempts).
    operator = impersonating_client(setup.control_plane, setup.release.operator_user)
    assert patch_status(operator, setup.namespace, name, {"progress": progress(1, 5.0)}) is None
    assert patch_status(operator, setup.namespace, name, {"result": result(1)}) is None


def test_status_writes_leaving_progress_and_result_alone_are_not_matched(setup: Setup) -> None:
    name = setup.task(holder=HOLDER, epoch=2)
    holder = setup.as_pod(HOLDER, "impersonation")
    assert patch_status(holder, setup.namespace, name, {"progress": progress(2)}) is None
    # Re-sending the very same progress changes nothing: not matched even from another pod.
    same = setup.cluster.status(name)["progress"]
    intruder = setup.as_pod(OTHER, "impersonation")
    assert patch_status(intruder, setup.namespace, name, {"progress": same}) is None


def test_policy_binding_is_scoped_to_the_runner_namespaces(
    setup: Setup, kube_config: Any, namespace: str
) -> None:
    """Another namespace is not bound: the same non-holder write is admitted there (the
    impersonated writer is in system:masters so that RBAC does not refuse it first)."""
    leased_task(kube_config, namespace, "elsewhere", holder=HOLDER, epoch=2)
    intruder = impersonating_client(
        setup.control_plane,
        setup.release.runner_user(namespace),
        pod=OTHER,
        groups=("system:masters",),
    )
    assert patch_status(intruder, namespace, "elsewhere", {"progress": progress(1)}) is None


@pytest.mark.parametrize(
    "change",
    [
        {"phase": "Succeeded"},
        {"attempt": 7},
        {"epoch": 9},
        {"holder": OTHER},
        {
            "conditions": [
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": "Succeeded",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ]
        },
    ],
    ids=lambda change: next(iter(change)),
)
def test_runners_may_not_change_the_operators_status_fields(
    setup: Setup, change: dict[str, Any]
) -> None:
    """Even the holder, with the current epoch, writes only progress and result."""
    name = setup.task(holder=HOLDER, epoch=2)
    holder = setup.as_pod(HOLDER, "bound-token")
    (field,) = change
    refusal = patch_status(holder, setup.namespace, name, {"progress": progress(2), **change})
    assert refusal is not None and refusal.status == 403, f"status.{field} was admitted"
    assert (
        f"{setup.release.runner_user()} may not change status.{field} of task {name}: runners "
        f"write status.progress and status.result, the rest of the status is the operator's"
    ) in message(refusal)
    # The operator may.
    operator = impersonating_client(setup.control_plane, setup.release.operator_user)
    assert patch_status(operator, setup.namespace, name, change) is None


def test_a_first_status_write_is_admitted(setup: Setup) -> None:
    """A Task with no status yet (a pool runner may report before the operator writes one):
    the write brings the schema's status defaults along and is admitted from the holder."""
    name = setup.task(holder=HOLDER, epoch=2, with_status=False)
    holder = setup.as_pod(HOLDER, "bound-token")
    assert patch_status(holder, setup.namespace, name, {"progress": progress(2)}) is None
    assert setup.cluster.status(name)["progress"]["epoch"] == 2
