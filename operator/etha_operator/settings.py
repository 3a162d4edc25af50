"""Operator settings from ``ETHA_OPERATOR_*`` environment variables.

Every error names the variable that is wrong. The root password is kept out of
``repr`` so that logging the settings never leaks it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from etha.kvstore.config import (
    Endpoint,
    env_file,
    env_seconds,
    env_value,
    parse_endpoints,
    parse_port,
)
from etha.kvstore.errors import ConfigurationError

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
    webhook_cert_file: str | None = None
    webhook_key_file: str | None = None
    health_port: int = 8080
    audit_interval: float = 300.0
    cleanup_deadline: float = 30.0
    job_check_interval: float = 30.0
    watch_server_timeout: float = 300.0
    log_level: int = logging.INFO

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def webhook_enabled(self) -> bool:
        return self.webhook_cert_file is not None

    def ca_pem(self) -> str | None:
        """The etcd CA bundle as PEM text (copied into workers' Secrets), or None."""
        if self.etcd_ca_file is None:
            return None
        with open(self.etcd_ca_file, encoding="ascii") as fh:
            return fh.read()


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env_value(env, name)
    return default if raw is None else parse_port(name, raw)


def _file(env: Mapping[str, str], name: str) -> str | None:
    return env_file(env, name, "is the Secret mounted?")


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
    ca_file = _file(env, ETCD_CA_FILE)
    cert_file, key_file = _file(env, ETCD_CERT_FILE), _file(env, ETCD_KEY_FILE)
    if (cert_file is None) != (key_file is None):
        missing = ETCD_KEY_FILE if key_file is None else ETCD_CERT_FILE
        raise ConfigurationError(
            f"{missing} is not set: {ETCD_CERT_FILE} and {ETCD_KEY_FILE} go together"
        )
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
    cert_pair = env_value(env, WEBHOOK_CERT_FILE), env_value(env, WEBHOOK_KEY_FILE)
    if (cert_pair[0] is None) != (cert_pair[1] is None):
        missing = WEBHOOK_KEY_FILE if cert_pair[1] is None else WEBHOOK_CERT_FILE
        raise ConfigurationError(
            f"{missing} is not set: {WEBHOOK_CERT_FILE} and {WEBHOOK_KEY_FILE} go together"
        )
    webhook_cert, webhook_key = _file(env, WEBHOOK_CERT_FILE), _file(env, WEBHOOK_KEY_FILE)
    listed = (env_value(env, NAMESPACES) or "").split(",")
    namespaces = tuple(ns.strip() for ns in listed if ns.strip())
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
        webhook_port=_port(env, WEBHOOK_PORT, 9443),
        webhook_cert_file=webhook_cert,
        webhook_key_file=webhook_key,
        health_port=_port(env, HEALTH_PORT, 8080),
        audit_interval=env_seconds(env, AUDIT_INTERVAL, 300.0, allow_zero=True),
        cleanup_deadline=env_seconds(env, CLEANUP_DEADLINE, 30.0, allow_zero=False),
        job_check_interval=env_seconds(env, JOB_CHECK_INTERVAL, 30.0, allow_zero=False),
        watch_server_timeout=env_seconds(env, WATCH_SERVER_TIMEOUT, 300.0, allow_zero=False),
        log_level=getattr(logging, level_name),
    )
