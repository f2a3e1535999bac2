# syntax=docker/dockerfile:1
# One image for the tasklease operator and for the runner wrapper:
#   docker build -t tasklease:0.1.0 .
#   docker run --rm tasklease:0.1.0 --help
#   operator:       tasklease operator     (the default command)
#   runner wrapper: tasklease run -- PROGRAM [ARGS...]
#
# The builder stage builds the wheel; the final stage installs it with every dependency
# pinned by constraints.txt, from wheels only (no compiler, no build tools in the image), and
# runs as an unprivileged numeric user so `runAsNonRoot` can verify it.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# The build context is narrowed by .dockerignore to what the wheel is built from.
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && cp constraints.txt /dist/constraints.txt

FROM ${PYTHON_IMAGE}
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
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    pip install --no-cache-dir --only-binary=:all: -c /dist/constraints.txt /dist/tasklease-*.whl \
    && pip check \
    && pip uninstall --no-cache-dir --yes setuptools wheel
USER 65532:65532
WORKDIR /tmp
# Metrics (TASKLEASE_METRICS_PORT) and kopf's /healthz (TASKLEASE_HEALTH_PORT).
EXPOSE 8080 8081
ENTRYPOINT ["tasklease"]
CMD ["operator"]
