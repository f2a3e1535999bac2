"""The phases of `make bench`, one module each, in the order bench/run.py runs them:
job_controller, warm_up, handout, steady, headroom, detection, restart; then closing, which
counts what spans them. Each takes the run's shared `BenchRun` (bench/context.py)."""
