"""The soak run's ground truth and its judge: what the API server recorded, and the invariants
checked over it.

`soak.audit` makes the API server keep an audit log of exactly the writes the invariants are
about; `soak.history` reads that log (and what the harness knows besides) into a `History`
that can be saved and replayed; `soak.checker` judges a history. The harness (`soak/run.py`)
injects the faults; nothing here touches a cluster, so a failing history saved as a fixture is
checked again by a unit test.
"""
