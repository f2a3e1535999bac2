"""`kubectl tasklease`, the kubectl plugin: `get` with progress bars and report ages,
`describe` with the attempt timeline and Events, `cancel`, `rerun`, `logs` and `watch`.

Installed with the package as the executable `kubectl-tasklease`, which kubectl finds on
PATH. It ships in the runner image, so it stays light: the API's models and the synchronous
`kubernetes` client, as the runner SDK; no kopf, no operator, no lease core.
"""
