"""``ETHA_GATEWAY_*`` settings, parsed with the same rules as ``ETHA_KV_*``.

Every error names the variable and says how to fix it; secrets (the etcd password) are
never part of a message or of ``repr``. The variables are listed in docs/gateway.md.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from etha.gateway.tenancy import QUOTA_NAMES
from etha.kvstore.config import (
    Endpoint,
    env_file,
    env_file_pair,
    env_int,
    env_port,
    env_seconds,
    env_value,
    parse_endpoints,
    parse_port,
    tls_wanted,
)
from etha.kvstore.errors import ConfigurationError

P = "ETHA_GATEWAY_"
LISTEN = P + "LISTEN"
ADVERTISE = P + "ADVERTISE"
ETCD_ENDPOINTS = P + "ETCD_ENDPOINTS"
ETCD_USERNAME = P + "ETCD_USERNAME"
ETCD_PASSWORD = P + "ETCD_PASSWORD"
ETCD_PASSWORD_FILE = P + "ETCD_PASSWORD_FILE"
ETCD_CA_FILE = P + "ETCD_CA_FILE"
ETCD_CERT_FILE = P + "ETCD_CERT_FILE"
ETCD_KEY_FILE = P + "ETCD_KEY_FILE"
ETCD_TIMEOUT = P + "ETCD_TIMEOUT"
TOKEN_KEY_FILE = P + "TOKEN_KEY_FILE"
TOKEN_TTL = P + "TOKEN_TTL"
TLS_CERT_FILE = P + "TLS_CERT_FILE"
TLS_KEY_FILE = P + "TLS_KEY_FILE"
METRICS_PORT = P + "METRICS_PORT"
ETCD_SPACE_HIGH_WATER = P + "ETCD_SPACE_HIGH_WATER"
ETCD_QUOTA_BACKEND_BYTES = P + "ETCD_QUOTA_BACKEND_BYTES"
ETCD_SPACE_POLL = P + "ETCD_SPACE_POLL"
QUOTA_RESYNC = P + "QUOTA_RESYNC"
LOG_LEVEL = P + "LOG_LEVEL"
#: ``ETHA_GATEWAY_QUOTA_<NAME>`` for every quota name.
QUOTA_VARIABLES = {name: f"{P}QUOTA_{name.upper()}" for name in QUOTA_NAMES}

DEFAULT_LISTEN = "0.0.0.0:2379"
DEFAULT_QUOTAS = {
    "bytes": 100 * 1024 * 1024,
    "keys": 100_000,
    "value_bytes": 1024 * 1024,
    "watches": 1000,
    "requests_per_second": 0,
}
#: etcd's own default --quota-backend-bytes.
DEFAULT_ETCD_QUOTA_BACKEND_BYTES = 2 * 1024 * 1024 * 1024
DEFAULT_HIGH_WATER = 0.8


@dataclass(frozen=True)
class GatewaySettings:
    """The parsed settings of one gateway process."""

    etcd_endpoints: tuple[Endpoint, ...]
    token_key_file: str
    listen_host: str = "0.0.0.0"
    listen_port: int = 2379
    advertise: tuple[str, ...] = ()
    etcd_tls: bool = False
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    etcd_ca_file: str | None = None
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    etcd_timeout: float = 10.0
    token_ttl: float = 600.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    metrics_port: int = 0
    quotas: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    etcd_quota_backend_bytes: int = DEFAULT_ETCD_QUOTA_BACKEND_BYTES
    etcd_space_high_water: float = DEFAULT_HIGH_WATER
    etcd_space_poll: float = 2.0
    quota_resync: float = 30.0
    log_level: int = logging.INFO

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def _host_port(name: str, raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not port:
        raise ConfigurationError(f"{name}={raw!r} must look like host:port (e.g. 0.0.0.0:2379)")
    host = host.strip("[]") or "0.0.0.0"
    return host, parse_port(name, port)


def _advertise(env: Mapping[str, str], host: str, port: int) -> tuple[str, ...]:
    raw = env_value(env, ADVERTISE)
    if raw is None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return (f"{shown}:{port}",)
    parse_endpoints(raw, ADVERTISE)  # parsed only to validate
    return tuple(item.strip() for item in raw.split(","))


def _etcd_login(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The gateway's etcd username and password (from the variable or its ``_FILE``)."""
    username = env_value(env, ETCD_USERNAME)
    password = env.get(ETCD_PASSWORD) or None
    password_file = env_file(env, ETCD_PASSWORD_FILE)
    if password is not None and password_file is not None:
        raise ConfigurationError(
            f"{ETCD_PASSWORD} and {ETCD_PASSWORD_FILE} are both set; set one of them"
        )
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{ETCD_PASSWORD_FILE}={password_file!r}: {exc}") from None
        if password is None:
            raise ConfigurationError(f"{ETCD_PASSWORD_FILE}={password_file!r} is empty")
    if (username is None) != (password is None):
        missing = ETCD_USERNAME if username is None else f"{ETCD_PASSWORD} (or _FILE)"
        raise ConfigurationError(
            f"{missing} is not set: the etcd username and password go together"
        )
    return username, password


def _high_water(env: Mapping[str, str]) -> float:
    raw = env_value(env, ETCD_SPACE_HIGH_WATER)
    if raw is None:
        return DEFAULT_HIGH_WATER
    try:
        high_water = float(raw)
    except ValueError:
        raise ConfigurationError(f"{ETCD_SPACE_HIGH_WATER}={raw!r} is not a number") from None
    if not math.isfinite(high_water) or not 0 < high_water < 1:
        raise ConfigurationError(
            f"{ETCD_SPACE_HIGH_WATER}={raw!r} must be a fraction between 0 and 1"
            " (e.g. 0.8: refuse writes above 80% of etcd's quota)"
        )
    return high_water


def _log_level(env: Mapping[str, str]) -> int:
    name = (env_value(env, LOG_LEVEL) or "INFO").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ConfigurationError(
            f"{LOG_LEVEL}={name!r} is not a log level; use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def parse_settings(environ: Mapping[str, str] | None = None) -> GatewaySettings:
    """Parse the ``ETHA_GATEWAY_*`` variables (default: ``os.environ``).

    :raises ConfigurationError: naming the variable that is missing or malformed
    """
    env = os.environ if environ is None else environ
    raw_endpoints = env_value(env, ETCD_ENDPOINTS)
    if raw_endpoints is None:
        raise ConfigurationError(
            f"{ETCD_ENDPOINTS} is not set: list the etcd members as host:port[,host:port]"
        )
    endpoints, scheme_tls = parse_endpoints(raw_endpoints, ETCD_ENDPOINTS)
    host, port = _host_port(LISTEN, env_value(env, LISTEN) or DEFAULT_LISTEN)
    username, password = _etcd_login(env)

    ca_file = env_file(env, ETCD_CA_FILE)
    cert_file, key_file = env_file_pair(env, ETCD_CERT_FILE, ETCD_KEY_FILE)
    etcd_tls = tls_wanted(scheme_tls, ca_file, cert_file=cert_file)
    if scheme_tls is False and tls_wanted(None, ca_file, cert_file=cert_file):
        raise ConfigurationError(
            f"{ETCD_ENDPOINTS} uses http:// but etcd TLS files are set; use https://"
        )

    token_key_file = env_file(env, TOKEN_KEY_FILE, "a file with one signing key per line")
    if token_key_file is None:
        raise ConfigurationError(
            f"{TOKEN_KEY_FILE} is not set: name a file with one signing key per line,"
            " shared by every gateway replica"
        )
    tls_cert, tls_key = env_file_pair(env, TLS_CERT_FILE, TLS_KEY_FILE)

    # The variables not read yet are read in the order of these arguments.
    return GatewaySettings(
        etcd_endpoints=endpoints,
        etcd_tls=etcd_tls,
        etcd_timeout=env_seconds(env, ETCD_TIMEOUT, 10.0),
        etcd_username=username,
        etcd_password=password,
        etcd_quota_backend_bytes=env_int(
            env, ETCD_QUOTA_BACKEND_BYTES, DEFAULT_ETCD_QUOTA_BACKEND_BYTES
        ),
        etcd_ca_file=ca_file,
        etcd_cert_file=cert_file,
        etcd_space_high_water=_high_water(env),
        etcd_key_file=key_file,
        etcd_space_poll=env_seconds(env, ETCD_SPACE_POLL, 2.0),
        listen_host=host,
        listen_port=port,
        advertise=_advertise(env, host, port),
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        metrics_port=env_port(env, METRICS_PORT, 0, zero_is_off=True),
        token_key_file=token_key_file,
        token_ttl=env_seconds(env, TOKEN_TTL, 600.0),
        quotas={
            name: env_int(env, var, DEFAULT_QUOTAS[name]) for name, var in QUOTA_VARIABLES.items()
        },
        quota_resync=env_seconds(env, QUOTA_RESYNC, 30.0),
        log_level=_log_level(env),
    )


__all__ = ["DEFAULT_QUOTAS", "QUOTA_VARIABLES", "GatewaySettings", "parse_settings"]
