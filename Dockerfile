# One image for the tasklease operator and for the runner wrapper:
#   docker build -t tasklease:0.1.0 .
#   docker run --rm tasklease:0.1.0 --help
#   operator:       tasklease operator     (the default command)
#   runner wrapper: tasklease run -- PROGRAM [ARGS...]
#
# The builder stage builds the wheel; the final stage installs it with every dependency
# pinned by constraints.txt, from wheels only (no compiler, no build tools in the image), and
# runs as an unprivileged numeric user so `runAsNonRoot` can verify it.
#
# Docker's built-in frontend builds it (no `# syntax=` line: that would pull a frontend image
# from a registry), and so does buildah, which `make image` uses where there is no Docker
# engine and no registry (operator/tasklease/controlplane/image.py).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# The build context is narrowed by .dockerignore to what the wheel is built from.
COPY . .
# The wheel, the pins, and the wheel's own dependencies as a requirements file.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && cp constraints.txt /dist/constraints.txt \
    && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /dist/requirements.txt
# The SBOM of the final image's Python environment (CycloneDX JSON): the final stage's own
# install (same requirements, constraints and order) into a virtualenv, read by
# `cyclonedx-py environment` (pinned in constraints.txt) from a virtualenv of its own, so that
# neither the tool nor its dependencies are listed, nor shipped: the final stage copies the
# file only. A layer of its own, apart from the wheel's command (which the tests run).
# hadolint ignore=DL3059
RUN python -m venv /sbom/env \
    && /sbom/env/bin/pip install --no-cache-dir --only-binary=:all: -c /dist/constraints.txt -r /dist/requirements.txt \
    && /sbom/env/bin/pip install --no-cache-dir --only-binary=:all: -c /dist/constraints.txt /dist/tasklease-*.whl \
    && /sbom/env/bin/pip uninstall --no-cache-dir --yes setuptools wheel \
    && python -m venv /sbom/tool \
    && /sbom/tool/bin/pip install --no-cache-dir --only-binary=:all: -c /dist/constraints.txt cyclonedx-bom \
    && /sbom/tool/bin/cyclonedx-py environment --output-reproducible --output-format JSON --output-file /sbom/sbom.cdx.json /sbom/env/bin/python

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The dependencies first, in a layer of their own that only a change of pyproject.toml's
# dependencies or of constraints.txt rebuilds: a change of the source reinstalls tasklease
# alone. COPY, not `RUN --mount=type=bind,from=builder`: buildah's layer cache (1.28) does
# not see a change of a mounted stage's files, and would keep installing the previous wheel.
# The copied files (the wheel: a few hundred kB) stay in their layers; no build tool does.
COPY --from=builder /dist/requirements.txt /dist/constraints.txt /deps/
RUN pip install --no-cache-dir --only-binary=:all: -c /deps/constraints.txt -r /deps/requirements.txt \
    && rm -rf /deps
COPY --from=builder /dist /dist
RUN pip install --no-cache-dir --only-binary=:all: -c /dist/constraints.txt /dist/tasklease-*.whl \
    && pip check \
    && pip uninstall --no-cache-dir --yes setuptools wheel \
    && rm -rf /dist
# The SBOM of what the two installs above put in the image (see the builder stage).
COPY --from=builder /sbom/sbom.cdx.json /usr/share/doc/tasklease/sbom.cdx.json
# The labels come after the install, so that a new revision alone does not reinstall.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="tasklease" \
      org.opencontainers.image.description="AWS Data Pipeline's task-runner heartbeat lease as a Kubernetes operator; also the runner wrapper (tasklease run)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="tasklease"
USER 65532:65532
WORKDIR /tmp
# Metrics (TASKLEASE_METRICS_PORT) and kopf's /healthz (TASKLEASE_HEALTH_PORT).
EXPOSE 8080 8081
ENTRYPOINT ["tasklease"]
CMD ["operator"]
