"""A local pod executor: a minimal stand-in for the kubelet of one node, for development,
the demo and the tests (the local control plane runs no kubelet and no scheduler).

    from tasklease.executor import LocalExecutor

    with LocalExecutor(control_plane.kubeconfig, tmp_path / "executor") as executor:
        ...  # pods labelled tasklease.io/task are bound to node `tasklease-local` and run

From a shell: `python -m tasklease.executor --kubeconfig K --state-dir D` (see `cli.py`).

What it does, like a kubelet: registers a Node (Ready, labelled
`tasklease.io/local-executor: "true"`) and renews its Lease; binds pending pods to it (it is
its own scheduler: pods labelled `tasklease.io/task`, or all pods with `all_pods`); runs each
pod; reports the pod's status; honours graceful deletion; gives each pod a token of its
ServiceAccount bound to the pod, through a per-pod kubeconfig (`KUBECONFIG`).

What it does not do: **container images are ignored.** A pod's first container's
`command` + `args` run as a local process of the executor's user, on the host's file system
and network (pod IP = 127.0.0.1), with the container's environment (plain values,
downward-API `fieldRef`s, ConfigMap and Secret references, `$(VAR)` expansion) on top of the
executor's PATH (its virtualenv's `bin` first), HOME, LANG and PYTHON* variables. Volumes,
probes, resources, security contexts, init and further containers, restart policies (every
pod runs once, as `restartPolicy: Never`) and `kubectl logs`/`exec` are not supported; the
process's output is in `<state_dir>/logs/<namespace>_<pod>.log` (`LocalExecutor.logs`).
Processes never outlive the executor (see `processes.py`).
"""

from tasklease.executor.executor import DEFAULT_NODE_NAME, ExecutorError, LocalExecutor
from tasklease.executor.node import LOCAL_EXECUTOR_LABEL

__all__ = ["DEFAULT_NODE_NAME", "LOCAL_EXECUTOR_LABEL", "ExecutorError", "LocalExecutor"]
