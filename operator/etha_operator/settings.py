"""Operator settings from ``ETHA_OPERATOR_*`` environment variables.

Every error names the variable that is wrong. The root password is kept out of
``repr`` so that logging the settings never leaks it.

Two modes (``ETHA_OPERATOR_MODE``):

* ``gateway`` (default): workers reach the store only through ``etha-gateway``; the
  operator writes a tenant record into etcd's registry and hands workers the gateway's
  endpoints (``ETHA_OPERATOR_GATEWAY_ENDPOINTS``).
* ``direct``: workers log in to etcd itself with an etcd user and role per KVNamespace.
  etcd 3.5's permission checks can be bypassed, so this is an explicit opt-in for
  single-tenant clusters (see :mod:`etha_operator.etcd_version`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from etha.kvstore.config import (
    Endpoint,
    env_bool,
    env_file,
    env_file_pair,
    env_port,
    env_seconds,
    env_value,
    parse_endpoints,
)
from etha.kvstore.errors import ConfigurationError
from etha_operator.jobkinds import JOB_KINDS_ENV, SHIPPED_JOB_KINDS_ENV, JobKinds

PREFIX = "ETHA_OPERATOR_"
ETCD_ENDPOINTS = "ETHA_OPERATOR_ETCD_ENDPOINTS"
WORKER_ENDPOINTS = "ETHA_OPERATOR_WORKER_ENDPOINTS"
ETCD_USERNAME = "ETHA_OPERATOR_ETCD_USERNAME"
ETCD_PASSWORD = "ETHA_OPERATOR_ETCD_PASSWORD"  # noqa: S105 - a variable name
ETCD_CA_FILE = "ETHA_OPERATOR_ETCD_CA_FILE"
ETCD_CERT_FILE = "ETHA_OPERATOR_ETCD_CERT_FILE"
ETCD_KEY_FILE = "ETHA_OPERATOR_ETCD_KEY_FILE"
ETCD_TIMEOUT = "ETHA_OPERATOR_ETCD_TIMEOUT"
NAMESPACES = "ETHA_OPERATOR_NAMESPACES"
WEBHOOK_PORT = "ETHA_OPERATOR_WEBHOOK_PORT"
WEBHOOK_CERT_FILE = "ETHA_OPERATOR_WEBHOOK_CERT_FILE"
WEBHOOK_KEY_FILE = "ETHA_OPERATOR_WEBHOOK_KEY_FILE"
HEALTH_PORT = "ETHA_OPERATOR_HEALTH_PORT"
AUDIT_INTERVAL = "ETHA_OPERATOR_AUDIT_INTERVAL"
CLEANUP_DEADLINE = "ETHA_OPERATOR_CLEANUP_DEADLINE"
JOB_CHECK_INTERVAL = "ETHA_OPERATOR_JOB_CHECK_INTERVAL"
WATCH_SERVER_TIMEOUT = "ETHA_OPERATOR_WATCH_SERVER_TIMEOUT"
LOG_LEVEL = "ETHA_OPERATOR_LOG_LEVEL"
METRICS_PORT = "ETHA_OPERATOR_METRICS_PORT"
MODE = "ETHA_OPERATOR_MODE"
GATEWAY_ENDPOINTS = "ETHA_OPERATOR_GATEWAY_ENDPOINTS"
GATEWAY_CA_FILE = "ETHA_OPERATOR_GATEWAY_CA_FILE"
GATEWAY_CA_PEM = "ETHA_OPERATOR_GATEWAY_CA_PEM"
ALLOW_UNSAFE_DIRECT = "ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT"
#: JSON list of job kinds added to (or replacing) the shipped ones (etha_operator.jobkinds).
JOB_KINDS = JOB_KINDS_ENV
#: JSON list of the shipped job kinds to follow (<plural>.<group>); unset: all of them.
SHIPPED_JOB_KINDS = SHIPPED_JOB_KINDS_ENV
#: Seconds a discovery answer ("is this job kind served?") is reused.
DISCOVERY_INTERVAL = "ETHA_OPERATOR_DISCOVERY_INTERVAL"

Mode = Literal["gateway", "direct"]
MODES: tuple[Mode, ...] = ("gateway", "direct")
#: What a missing file of the operator most likely means.
_MOUNTED = "is the Secret mounted?"


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the operator reads from its environment."""

    etcd_endpoints: tuple[Endpoint, ...]
    worker_endpoints: tuple[Endpoint, ...]
    etcd_tls: bool = False
    worker_tls: bool = False
    etcd_username: str = "root"
    etcd_password: str | None = field(default=None, repr=False)
    etcd_ca_file: str | None = None
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    etcd_timeout: float = 5.0
    namespaces: tuple[str, ...] = ()
    webhook_port: int = 9443
    health_port: int = 8080
    #: Port of the Prometheus /metrics endpoint; 0 = off.
    metrics_port: int = 0
    #: The admission webhook's serving certificate and key; without them it is off.
    webhook_cert_file: str | None = None
    webhook_key_file: str | None = None
    #: Seconds between audits for etcd users/roles without a KVNamespace; 0 = no audit.
    audit_interval: float = 300.0
    #: Seconds the deletion finalizer tries before it gives up and leaves the rest.
    cleanup_deadline: float = 30.0
    #: Seconds between re-checks whether a KVNamespace's job has ended.
    job_check_interval: float = 30.0
    #: Seconds the API server keeps one watch request open (kopf's server timeout).
    watch_server_timeout: float = 300.0
    log_level: int = logging.INFO
    mode: Mode = "gateway"
    gateway_endpoints: tuple[Endpoint, ...] = ()
    gateway_tls: bool = False
    gateway_ca: str | None = field(default=None, repr=False)
    allow_unsafe_direct: bool = False
    #: The job kinds a jobRef may name, with their end rules.
    job_kinds: JobKinds = field(default_factory=JobKinds, compare=False)
    discovery_interval: float = 10.0

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def webhook_enabled(self) -> bool:
        return self.webhook_cert_file is not None

    @property
    def gateway_mode(self) -> bool:
        return self.mode == "gateway"

    def ca_pem(self) -> str | None:
        """The CA bundle workers need (copied into their Secrets as PEM text), or None.

        Gateway mode: the gateway's CA (when it serves TLS). Direct mode: etcd's CA.
        """
        if self.gateway_mode:
            return self.gateway_ca if self.gateway_tls else None
        if self.etcd_ca_file is None:
            return None
        with open(self.etcd_ca_file, encoding="ascii") as fh:
            return fh.read()

    def workers_reach(self) -> tuple[tuple[Endpoint, ...], bool]:
        """(endpoints, tls) written into the workers' Secrets."""
        if self.gateway_mode:
            return self.gateway_endpoints, self.gateway_tls
        return self.worker_endpoints, self.worker_tls


def _gateway(
    env: Mapping[str, str],
) -> tuple[tuple[Endpoint, ...], bool, str | None]:
    """The gateway's endpoints, whether it serves TLS, and its CA bundle (PEM)."""
    raw = env_value(env, GATEWAY_ENDPOINTS)
    if raw is None:
        raise ConfigurationError(
            f"{GATEWAY_ENDPOINTS} is not set: in gateway mode ({MODE}=gateway, the default)"
            " list the etha-gateway endpoints workers connect to, e.g."
            " https://etha-gateway.etha-system.svc:2379; or set"
            f" {MODE}=direct (single-tenant clusters only, see docs/operator.md)"
        )
    endpoints, scheme_tls = parse_endpoints(raw, GATEWAY_ENDPOINTS)
    ca_file = env_file(env, GATEWAY_CA_FILE, "is the gateway CA mounted?")
    ca_pem = env_value(env, GATEWAY_CA_PEM)
    if ca_file is not None and ca_pem is not None:
        raise ConfigurationError(
            f"{GATEWAY_CA_FILE} and {GATEWAY_CA_PEM} are both set: give the gateway's CA once"
        )
    if ca_file is not None:
        with open(ca_file, encoding="ascii") as fh:
            ca_pem = fh.read()
    if ca_pem is not None and "-----BEGIN CERTIFICATE-----" not in ca_pem:
        where = GATEWAY_CA_FILE if ca_file is not None else GATEWAY_CA_PEM
        raise ConfigurationError(f"{where} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if scheme_tls is False and ca_pem is not None:
        raise ConfigurationError(
            f"{GATEWAY_ENDPOINTS} uses http:// but the gateway's CA is set; use https:// endpoints"
        )
    tls = bool(scheme_tls) or ca_pem is not None
    return endpoints, tls, ca_pem


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Parse the ``ETHA_OPERATOR_*`` variables (default: ``os.environ``).

    :raises ConfigurationError: naming the missing or malformed variable
    """
    env = os.environ if environ is None else environ
    raw = env_value(env, ETCD_ENDPOINTS)
    if raw is None:
        raise ConfigurationError(
            f"{ETCD_ENDPOINTS} is not set: list the etcd endpoints the operator uses,"
            " e.g. https://etcd-0.etcd:2379"
        )
    endpoints, scheme_tls = parse_endpoints(raw, ETCD_ENDPOINTS)
    raw_workers = env_value(env, WORKER_ENDPOINTS)
    if raw_workers is None:
        workers, worker_scheme_tls = endpoints, scheme_tls
    else:
        workers, worker_scheme_tls = parse_endpoints(raw_workers, WORKER_ENDPOINTS)
    ca_file = env_file(env, ETCD_CA_FILE, _MOUNTED)
    cert_file, key_file = env_file_pair(env, ETCD_CERT_FILE, ETCD_KEY_FILE, _MOUNTED)
    wants_tls = bool(ca_file or cert_file)
    if scheme_tls is False and wants_tls:
        raise ConfigurationError(
            f"{ETCD_ENDPOINTS} uses http:// but TLS files are set; use https:// endpoints"
        )
    etcd_tls = bool(scheme_tls) or wants_tls
    worker_tls = etcd_tls if worker_scheme_tls is None else worker_scheme_tls
    password = env.get(ETCD_PASSWORD) or None
    username = env_value(env, ETCD_USERNAME) or "root"
    if password is None and cert_file is None:
        raise ConfigurationError(
            f"{ETCD_PASSWORD} is not set: give the etcd root password (from the"
            " root-credentials Secret) or a client certificate"
        )
    webhook_cert, webhook_key = env_file_pair(env, WEBHOOK_CERT_FILE, WEBHOOK_KEY_FILE, _MOUNTED)
    listed = (env_value(env, NAMESPACES) or "").split(",")
    namespaces = tuple(ns.strip() for ns in listed if ns.strip())
    mode = (env_value(env, MODE) or "gateway").strip().lower()
    if mode not in MODES:
        raise ConfigurationError(f"{MODE}={mode!r} must be gateway (the default) or direct")
    gateway: tuple[tuple[Endpoint, ...], bool, str | None] = ((), False, None)
    if mode == "gateway":
        gateway = _gateway(env)
        if raw_workers is not None:
            raise ConfigurationError(
                f"{WORKER_ENDPOINTS} applies to direct mode only: in gateway mode workers get"
                f" {GATEWAY_ENDPOINTS}; unset {WORKER_ENDPOINTS}"
            )
    level_name = (env_value(env, LOG_LEVEL) or "INFO").upper()
    if level_name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigurationError(
            f"{LOG_LEVEL}={level_name!r} must be DEBUG, INFO, WARNING or ERROR"
        )
    return OperatorSettings(
        etcd_endpoints=endpoints,
        worker_endpoints=workers,
        etcd_tls=etcd_tls,
        worker_tls=worker_tls,
        etcd_username=username,
        etcd_password=password,
        etcd_ca_file=ca_file,
        etcd_cert_file=cert_file,
        etcd_key_file=key_file,
        etcd_timeout=env_seconds(env, ETCD_TIMEOUT, 5.0, allow_zero=False),
        namespaces=namespaces,
        webhook_port=env_port(env, WEBHOOK_PORT, 9443),
        health_port=env_port(env, HEALTH_PORT, 8080),
        metrics_port=env_port(env, METRICS_PORT, 0, zero_is_off=True),
        webhook_cert_file=webhook_cert,
        webhook_key_file=webhook_key,
        audit_interval=env_seconds(env, AUDIT_INTERVAL, 300.0, allow_zero=True),
        cleanup_deadline=env_seconds(env, CLEANUP_DEADLINE, 30.0, allow_zero=False),
        job_check_interval=env_seconds(env, JOB_CHECK_INTERVAL, 30.0, allow_zero=False),
        watch_server_timeout=env_seconds(env, WATCH_SERVER_TIMEOUT, 300.0, allow_zero=False),
        log_level=getattr(logging, level_name),
        mode="gateway" if mode == "gateway" else "direct",
        gateway_endpoints=gateway[0],
        gateway_tls=gateway[1],
        gateway_ca=gateway[2],
        allow_unsafe_direct=env_bool(env, ALLOW_UNSAFE_DIRECT),
        job_kinds=JobKinds.from_setting(
            env_value(env, JOB_KINDS), env_value(env, SHIPPED_JOB_KINDS)
        ),
        discovery_interval=env_seconds(env, DISCOVERY_INTERVAL, 10.0, allow_zero=True),
    )
