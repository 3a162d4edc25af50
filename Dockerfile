# etha-operator image: the kopf operator, the etha gateway and the etha library, without
# torch. One image, two programs:
#   etha-operator   (the ENTRYPOINT; settings from ETHA_OPERATOR_* variables)
#   etha-gateway    (run it with `--entrypoint etha-gateway`, or in Kubernetes with
#                    `command: ["etha-gateway"]`; settings from ETHA_GATEWAY_* variables)
#
# Build from the repository root:
#   docker build -t etha-operator:0.1.0 .
# The chart runs both as UID 10001 with a read-only root filesystem (docs/install.md).

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

# The `operator` and `gateway` extras only: torch belongs to the `tcpstore` extra and
# never enters this image. constraints.txt pins every resolved version. pip is removed
# afterwards: the running image never installs anything. The last commands fail the
# build if an entrypoint or an import is missing.
RUN pip install --constraint constraints.txt ".[operator,gateway]" \
    && pip uninstall --yes pip \
    && test -x /opt/venv/bin/etha-operator \
    && test -x /opt/venv/bin/etha-gateway \
    && test -x /opt/venv/bin/etha \
    && python -c "import etha.kvstore, etha.gateway.tenancy, etha_operator, kopf, pyetcd, prometheus_client"

FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="etha-operator" \
      org.opencontainers.image.description="Kubernetes operator and gateway that give each job a private, quota-limited slice of etcd for etha.kvstore" \
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
# 8080: operator health (/healthz); 9443: admission webhook (HTTPS);
# 2379: gateway gRPC; 9090: gateway /metrics, /healthz, /readyz.
EXPOSE 8080 9443 2379 9090
ENTRYPOINT ["etha-operator"]
