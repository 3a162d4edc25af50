# etha-operator image: the kopf operator and the etha library, without torch.
#
# Build from the repository root:
#   docker build -t etha-operator:0.1.0 .
# The chart runs it as UID 10001 with a read-only root filesystem; all settings come from
# ETHA_OPERATOR_* environment variables (docs/install.md).

# Python minor version pinned to the one the project is tested with; bump the patch tag
# (or pin a digest) deliberately.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY etha ./etha
COPY operator ./operator

# The `operator` extra only: torch belongs to the `tcpstore` extra and never enters this
# image. constraints.txt pins every resolved version. pip is removed afterwards: the
# running image never installs anything. The last two commands fail the build if the
# entrypoint or an import is missing.
RUN pip install --constraint constraints.txt ".[operator]" \
    && pip uninstall --yes pip \
    && test -x /opt/venv/bin/etha-operator \
    && python -c "import etha.kvstore, etha_operator, kopf, pyetcd"

FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="etha-operator" \
      org.opencontainers.image.description="Kubernetes operator that provisions per-job etcd credentials for etha.kvstore" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="etha" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric UID/GID so Kubernetes can verify runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 etha \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin etha

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
# 8080: kopf health endpoint (/healthz); 9443: admission webhook (HTTPS).
EXPOSE 8080 9443
ENTRYPOINT ["etha-operator"]
