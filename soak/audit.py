"""The audit policy that makes the API server's audit log the soak's ground truth.

The invariants are judged from what the API server accepted, not from what the operator or the
runners believe they did: a client can crash between its write and its own log line, while
with `--audit-log-mode=blocking` the API server writes each event before it answers, and no
buffer fills up and drops events under load (the `batch` mode does). The policy records only
what the checker reads, so a long soak's log stays small:

- every write to a Task, with request and response bodies (`RequestResponse`): the runners'
  fenced JSON Patches, pool claims and releases, the operator's lease and status writes;
- pod creations and deletions with the request body (`Request`): a pod's labels name its
  Task and epoch;
- writes of `coordination.k8s.io` Leases outside the control plane's own namespaces, metadata
  only: pool runners' Leases (renewed by patch) and the operator's election Lease;
- nothing else. Only the `ResponseComplete` stage is kept: it carries the response code.

Known limit: an API server killed with SIGKILL after etcd committed a write and before the
event was written loses that event (the write is in etcd, not in the log); the checker says so
where it finds a state with no write behind it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

from tasklease.api.models import GROUP, PLURAL

POLICY_FILE: Final = "audit-policy.yaml"
LOG_FILE: Final = "audit.log"
POLICY: Final[dict[str, Any]] = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # ResponseStarted comes only for long-running requests (watches), which no rule records.
    "omitStages": ["RequestReceived", "ResponseStarted"],
    # The server's bookkeeping of field ownership, in every body: most of a Task's bytes.
    "omitManagedFields": True,
    "rules": [
        {
            "level": "RequestResponse",
            "verbs": ["create", "update", "patch", "delete"],
            "resources": [{"group": GROUP, "resources": [PLURAL, f"{PLURAL}/status"]}],
        },
        {
            "level": "Request",
            "verbs": ["create", "delete"],
            "resources": [{"group": "", "resources": ["pods"]}],
        },
        {
            # The control plane's own Leases (its components' elections, node heartbeats,
            # API server identities) are renewed every few seconds and tell nothing here.
            "level": "None",
            "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}],
            "namespaces": ["kube-system", "kube-node-lease"],
        },
        {
            # Pool runners renew their Leases by patch and delete them when they stop; the
            # operator's election takes its Lease by create and renews it by update.
            "level": "Metadata",
            "verbs": ["create", "update", "patch", "delete"],
            "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}],
        },
        {"level": "None"},
    ],
}


def apiserver_args(directory: Path) -> list[str]:
    """Write the policy into `directory` and return the kube-apiserver flags that use it; the
    log goes to `directory / LOG_FILE` (see `audit_log_path`)."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / POLICY_FILE
    policy.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    return [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={audit_log_path(directory)}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",
        # One file, never rotated, never pruned; no event cut for its size.
        "--audit-log-maxsize=0",
        "--audit-log-maxbackup=0",
        "--audit-log-maxage=0",
        "--audit-log-truncate-enabled=false",
    ]


def audit_log_path(directory: Path) -> Path:
    return directory / LOG_FILE
