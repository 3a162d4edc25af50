"""Environment parsing shared by ``etha.kvstore.config``, the gateway and the operator.

One set of rules and messages for every variable (``ETHA_KV_*``, ``ETHA_GATEWAY_*``,
``ETHA_OPERATOR_*``). The public names are re-exported by :mod:`etha.kvstore.config`;
this module is private so that its shape can change with its callers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from etha.kvstore.errors import ConfigurationError

_N = TypeVar("_N", int, float)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Endpoint:
    """One etcd client endpoint."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value with surrounding blanks removed; unset and empty are None."""
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _number(raw: str, name: str, convert: Callable[[str], _N], what: str) -> _N:
    try:
        return convert(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not {what}") from None


def env_seconds(
    env: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False
) -> float:
    """A duration in seconds: ``default`` when unset; finite, positive (or zero if allowed).

    :raises ConfigurationError: naming the variable
    """
    raw = env_value(env, name)
    if raw is None:
        return default
    value = _number(raw, name, float, "a number of seconds")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        limit = "zero or more" if allow_zero else "a positive number of"
        raise ConfigurationError(f"{name}={raw!r} must be {limit} seconds")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    """A whole number of at least ``minimum``; ``default`` when unset.

    :raises ConfigurationError: naming the variable
    """
    raw = env_value(env, name)
    if raw is None:
        return default
    value = _number(raw, name, int, "a whole number")
    if value < minimum:
        raise ConfigurationError(f"{name}={raw!r} must be {minimum} or more")
    return value


def parse_port(name: str, raw: str) -> int:
    """``raw`` (the value of variable ``name``) as a TCP port, 1-65535."""
    port = _number(raw, name, int, "a port number")
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"{name}={raw!r} is not a port number between 1 and 65535")
    return port


def env_port(env: Mapping[str, str], name: str, default: int, *, zero_is_off: bool = False) -> int:
    """A TCP port, 1-65535; ``default`` when unset. With ``zero_is_off``, ``0`` is
    accepted too (a server that is turned off)."""
    raw = env_value(env, name)
    if raw is None:
        return default
    return 0 if zero_is_off and raw == "0" else parse_port(name, raw)


def parse_bool(name: str, raw: str) -> bool:
    """``raw`` (the value of variable ``name``) as a boolean: true/false, 1/0, yes/no, on/off."""
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} must be one of true/false, 1/0, yes/no")


def env_bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """A boolean (see :func:`parse_bool`); ``default`` when unset or empty."""
    raw = env_value(env, name)
    return default if raw is None else parse_bool(name, raw)


def parse_endpoints(raw: str, name: str) -> tuple[tuple[Endpoint, ...], bool | None]:
    """Parse ``host:port[,...]`` (the value of variable ``name``) with optional
    ``http://``/``https://`` schemes.

    :returns: the endpoints, and True/False when a scheme asked for TLS or plaintext
        (None when no endpoint named a scheme)
    """
    endpoints: list[Endpoint] = []
    schemes: set[str] = set()
    for item in raw.split(","):
        item = item.strip()
        if not item:
            raise ConfigurationError(f"{name}={raw!r} has an empty endpoint")
        url = item if "://" in item else f"//{item}"
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"{name}: endpoint {item!r} is invalid ({exc})") from None
        if parts.scheme:
            if parts.scheme not in ("http", "https"):
                raise ConfigurationError(
                    f"{name}: endpoint {item!r} has scheme {parts.scheme!r}; use http or https"
                )
            schemes.add(parts.scheme)
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ConfigurationError(
                f"{name}: endpoint {item!r} must look like [https://]host:port"
            )
        endpoints.append(Endpoint(parts.hostname, port))
    if len(schemes) > 1:
        raise ConfigurationError(f"{name}={raw!r} mixes http:// and https:// endpoints")
    tls = None if not schemes else schemes == {"https"}
    return tuple(endpoints), tls


def tls_wanted(
    scheme_tls: bool | None,
    ca_file: str | None,
    ca_pem: str | None = None,
    cert_file: str | None = None,
) -> bool:
    """The one TLS rule: ``https://`` endpoints (``scheme_tls``) or any TLS file mean TLS."""
    return bool(scheme_tls) or bool(ca_file or ca_pem or cert_file)


def env_file(env: Mapping[str, str], name: str, hint: str = "") -> str | None:
    """The path in variable ``name`` (None when unset); it must be an existing file."""
    path = env_value(env, name)
    if path is not None and not os.path.isfile(path):
        raise ConfigurationError(f"{name}={path!r}: no such file{f' ({hint})' if hint else ''}")
    return path


def env_file_pair(
    env: Mapping[str, str], cert: str, key: str, hint: str = ""
) -> tuple[str | None, str | None]:
    """A certificate file and its key file (variables ``cert`` and ``key``): both set or
    neither; each must be an existing file (see :func:`env_file`).

    :raises ConfigurationError: naming every variable that is missing or wrong (a file
        that does not exist and its unset partner are reported together)
    """
    paths: list[str | None] = []
    problems: list[str] = []
    for name in (cert, key):
        try:
            paths.append(env_file(env, name, hint))
        except ConfigurationError as exc:
            paths.append(env_value(env, name))
            problems.append(str(exc))
    cert_file, key_file = paths
    if (cert_file is None) != (key_file is None):
        missing = key if key_file is None else cert
        problems.append(f"{missing} is not set: {cert} and {key} go together")
    if problems:
        raise ConfigurationError("; ".join(problems))
    return cert_file, key_file


__all__ = [
    "Endpoint",
    "env_bool",
    "env_file",
    "env_file_pair",
    "env_int",
    "env_port",
    "env_seconds",
    "env_value",
    "parse_bool",
    "parse_endpoints",
    "parse_port",
    "tls_wanted",
]
