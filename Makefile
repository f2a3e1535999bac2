# tasklease developer commands. `make help` lists them.
# Everything runs from the repository's own virtualenv (.venv), made by `make venv`.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k lease -x"`.
PYTEST_ARGS ?=
# `make test` runs on this many workers (a module each at a time; each starts its own control
# plane): two suits two cores, most of the time is waiting.
PYTEST_WORKERS ?= 2

.PHONY: help venv binaries manifests check-manifests lint test test-unit test-kind demo bench soak cluster image registry node-deps clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed  ## Create .venv with the package and test tools (pinned by constraints.txt)

binaries: venv  ## Obtain etcd, kube-apiserver, kube-controller-manager, kubectl and helm (cached; built once from the Go module proxy)
	$(PY) -m tasklease.controlplane binaries
	$(PY) -m tasklease.controlplane helm

node-deps: venv  ## Install the Debian packages a local node, `make image` and the monitoring tests need (as root; says what to install otherwise)
	$(PY) -m tasklease.controlplane node-deps

manifests: venv  ## Regenerate the CRD (crds/ and the chart's copy) from the pydantic models
	$(PY) -m tasklease.api.crd

check-manifests: venv  ## Fail when the CRD manifests drifted from the models
	$(PY) -m tasklease.api.crd --check

lint: venv  ## ruff, mypy --strict, import layering, manifest drift
	$(BIN)/ruff check operator tests bench soak
	$(BIN)/ruff format --check operator tests bench soak
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(PY) -m tasklease.api.crd --check

test: lint binaries  ## The whole suite: lint, unit, integration (real API server) and end-to-end (real node) tests
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-unit: venv  ## Unit tests only (no control plane)
	$(BIN)/pytest -m "not cluster and not kind" $(PYTEST_ARGS)

test-kind: venv binaries  ## The end-to-end test on kind (needs Docker and kind; not part of `make test`)
	$(BIN)/pytest -m kind tests/e2e/test_kind.py $(PYTEST_ARGS)

demo: binaries  ## The main job on a local control plane (KEEP=1 keeps the cluster up afterwards)
	$(PY) -m tasklease.demo $(if $(KEEP),--keep,)

soak: binaries  ## Robustness run under random faults, judged on the audit log (SOAK_ARGS="--tasks 2000 --operator-kills 50 ...")
	$(PY) -m soak.run $(SOAK_ARGS)

bench: binaries  ## Scale benchmark (N=1,000 by default; BENCH_ARGS="--tasks 10000 ...")
	$(PY) -m bench.run $(BENCH_ARGS)

cluster: binaries  ## Run a local control plane in the foreground (prints the KUBECONFIG line); NODE=1 adds a real node (root)
	$(PY) -m tasklease.controlplane up $(if $(NODE),--node,)

image: venv  ## Build the image (Dockerfile) with buildah, no registry or Docker needed, into the running local node (NODE=1 cluster); PUSH=127.0.0.1:PORT pushes it to that registry instead
	$(PY) -m tasklease.controlplane image $(if $(PUSH),--push $(PUSH),)

registry: venv  ## Run a local OCI registry (CNCF distribution, built once from the Go module proxy) in the foreground, pulled from by the NODE=1 cluster's node (root)
	$(PY) -m tasklease.controlplane registry

clean:  ## Remove the virtualenv and caches (the binaries cache outside the repository stays)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .tasklease
