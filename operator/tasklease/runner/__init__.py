"""Runner side of tasklease: hold a Task's lease from inside a runner pod.

`import tasklease.runner` must stay light and must not import kopf: runner images carry
only what they need.
"""

from tasklease.runner.sdk import Identity, LeaseLost, TaskLease, lease

__all__ = ["Identity", "LeaseLost", "TaskLease", "lease"]
