"""The ``ETHA_KV_*`` environment contract, parsed into typed configurations.

The operator writes these variables into each KVNamespace's Secret and the admission
webhook injects them into worker pods; :func:`etha.kvstore.from_env` reads them. The
contract is documented in ``docs/configuration.md``; :meth:`EtcdConfig.to_env` is the
inverse of :func:`parse_env`, so both sides share one definition.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypedDict, cast

from etha import _env

# The environment rules shared with the gateway's and the operator's settings (one set
# of rules and messages for every variable) live in etha._env; these are their public
# names.
from etha._env import Endpoint as Endpoint
from etha._env import env_bool as env_bool
from etha._env import env_file as env_file
from etha._env import env_file_pair as env_file_pair
from etha._env import env_int as env_int
from etha._env import env_port as env_port
from etha._env import env_seconds as env_seconds
from etha._env import env_value as env_value
from etha._env import parse_bool as parse_bool
from etha._env import parse_port as parse_port
from etha._env import tls_wanted as tls_wanted
from etha.kvstore.errors import ConfigurationError, InvalidKeyError
from etha.kvstore.keys import validate_name

PREFIX = "ETHA_KV_"
BACKEND = "ETHA_KV_BACKEND"
NAMESPACE = "ETHA_KV_NAMESPACE"
COMPONENT = "ETHA_KV_COMPONENT"
ENDPOINTS = "ETHA_KV_ENDPOINTS"
USERNAME = "ETHA_KV_USERNAME"
PASSWORD = "ETHA_KV_PASSWORD"  # noqa: S105 - a variable name, not a password
CA_FILE = "ETHA_KV_CA_FILE"
CA_PEM = "ETHA_KV_CA_PEM"
CERT_FILE = "ETHA_KV_CERT_FILE"
KEY_FILE = "ETHA_KV_KEY_FILE"
TIMEOUT = "ETHA_KV_TIMEOUT"
TCPSTORE_HOST = "ETHA_KV_TCPSTORE_HOST"
TCPSTORE_PORT = "ETHA_KV_TCPSTORE_PORT"
TCPSTORE_IS_SERVER = "ETHA_KV_TCPSTORE_IS_SERVER"
TCPSTORE_WORLD_SIZE = "ETHA_KV_TCPSTORE_WORLD_SIZE"

#: Variables that carry secrets: never log them, never put them in a status or event.
SECRET_VARIABLES = frozenset({PASSWORD})
#: Every variable of the contract; the webhook treats all of them as reserved.
ALL_VARIABLES = frozenset(
    {
        BACKEND,
        NAMESPACE,
        COMPONENT,
        ENDPOINTS,
        USERNAME,
        PASSWORD,
        CA_FILE,
        CA_PEM,
        CERT_FILE,
        KEY_FILE,
        TIMEOUT,
        TCPSTORE_HOST,
        TCPSTORE_PORT,
        TCPSTORE_IS_SERVER,
        TCPSTORE_WORLD_SIZE,
    }
)

DEFAULT_COMPONENT = "default"
DEFAULT_TIMEOUT = 10.0


class ConnectionOptions(TypedDict):
    """The connection settings of an etcd client, by the names its constructor takes."""

    username: str | None
    password: str | None
    tls: bool
    ca_file: str | None
    ca_pem: str | None
    cert_file: str | None
    key_file: str | None
    timeout: float


@dataclass(frozen=True)
class EtcdConfig:
    """Everything needed to open an :class:`~etha.kvstore.etcd.EtcdKVStore`."""

    namespace: str
    endpoints: tuple[Endpoint, ...]
    component: str = DEFAULT_COMPONENT
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    ca_pem: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    backend: Literal["etcd"] = "etcd"

    def connection(self) -> ConnectionOptions:
        """The settings besides the endpoints that an etcd client is opened with
        (``EtcdClient(config.endpoints, **config.connection())``)."""
        return cast(
            ConnectionOptions,
            {name: getattr(self, name) for name in ConnectionOptions.__annotations__},
        )

    def to_env(self) -> dict[str, str]:
        """The ``ETHA_KV_*`` variables that :func:`parse_env` turns back into this config."""
        scheme = "https" if self.tls else "http"
        env = {
            BACKEND: "etcd",
            NAMESPACE: self.namespace,
            COMPONENT: self.component,
            ENDPOINTS: ",".join(f"{scheme}://{ep}" for ep in self.endpoints),
            TIMEOUT: _format_float(self.timeout),
        }
        optional = {
            USERNAME: self.username,
            PASSWORD: self.password,
            CA_FILE: self.ca_file,
            CA_PEM: self.ca_pem,
            CERT_FILE: self.cert_file,
            KEY_FILE: self.key_file,
        }
        env.update({name: value for name, value in optional.items() if value is not None})
        return env


@dataclass(frozen=True)
class TCPStoreConfig:
    """Everything needed to open a :class:`~etha.kvstore.tcpstore.TCPStoreKVStore`."""

    namespace: str
    host: str
    port: int
    is_server: bool
    component: str = DEFAULT_COMPONENT
    world_size: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    backend: Literal["tcpstore"] = "tcpstore"

    def to_env(self) -> dict[str, str]:
        """The ``ETHA_KV_*`` variables that :func:`parse_env` turns back into this config."""
        env = {
            BACKEND: "tcpstore",
            NAMESPACE: self.namespace,
            COMPONENT: self.component,
            TCPSTORE_HOST: self.host,
            TCPSTORE_PORT: str(self.port),
            TCPSTORE_IS_SERVER: "true" if self.is_server else "false",
            TIMEOUT: _format_float(self.timeout),
        }
        if self.world_size is not None:
            env[TCPSTORE_WORLD_SIZE] = str(self.world_size)
        return env


StoreConfig = EtcdConfig | TCPStoreConfig


def _format_float(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _require(env: Mapping[str, str], name: str, why: str) -> str:
    value = env_value(env, name)
    if value is None:
        raise ConfigurationError(f"{name} is not set: {why}")
    return value


def _parse_name(env: Mapping[str, str], name: str, value: str) -> str:
    try:
        return validate_name(value, name)
    except InvalidKeyError as exc:
        raise ConfigurationError(str(exc)) from None


def parse_endpoints(raw: str, name: str = ENDPOINTS) -> tuple[tuple[Endpoint, ...], bool | None]:
    """Parse ``host:port[,...]`` with optional ``http://``/``https://`` schemes.

    :returns: the endpoints, and True/False when a scheme asked for TLS or plaintext
        (None when no endpoint named a scheme)
    """
    return _env.parse_endpoints(raw, name)


def parse_env(environ: Mapping[str, str] | None = None) -> StoreConfig:
    """Parse the ``ETHA_KV_*`` variables (default: ``os.environ``) into a config.

    :raises ConfigurationError: naming the variable that is missing, malformed, or in
        contradiction with another one
    """
    env = os.environ if environ is None else environ
    backend = (env_value(env, BACKEND) or "etcd").lower()
    namespace = _parse_name(
        env, NAMESPACE, _require(env, NAMESPACE, "it names the key namespace of this job")
    )
    component = _parse_name(env, COMPONENT, env_value(env, COMPONENT) or DEFAULT_COMPONENT)
    timeout = env_seconds(env, TIMEOUT, DEFAULT_TIMEOUT)
    if backend == "etcd":
        return _parse_etcd(env, namespace, component, timeout)
    if backend == "tcpstore":
        return _parse_tcpstore(env, namespace, component, timeout)
    raise ConfigurationError(f"{BACKEND}={backend!r} is not a backend; use 'etcd' or 'tcpstore'")


def _parse_etcd(
    env: Mapping[str, str], namespace: str, component: str, timeout: float
) -> EtcdConfig:
    for name in (TCPSTORE_HOST, TCPSTORE_PORT, TCPSTORE_IS_SERVER, TCPSTORE_WORLD_SIZE):
        if env_value(env, name) is not None:
            raise ConfigurationError(
                f"{name} is set but {BACKEND} is etcd; unset it or set {BACKEND}=tcpstore"
            )
    endpoints, scheme_tls = parse_endpoints(
        _require(env, ENDPOINTS, "list the etcd endpoints as host:port[,host:port]")
    )
    username, password = env_value(env, USERNAME), env.get(PASSWORD)
    if password is not None and password == "":
        password = None
    if (username is None) != (password is None):
        missing = PASSWORD if password is None else USERNAME
        raise ConfigurationError(f"{missing} is not set: {USERNAME} and {PASSWORD} go together")
    ca_file, ca_pem = env_file(env, CA_FILE), env_value(env, CA_PEM)
    if ca_file and ca_pem:
        raise ConfigurationError(f"{CA_FILE} and {CA_PEM} are both set; set one of them")
    if ca_pem is not None and "BEGIN CERTIFICATE" not in ca_pem:
        raise ConfigurationError(f"{CA_PEM} does not hold a PEM certificate")
    cert_file, key_file = env_file_pair(env, CERT_FILE, KEY_FILE)
    if scheme_tls is False and tls_wanted(None, ca_file, ca_pem, cert_file):
        raise ConfigurationError(
            f"{ENDPOINTS} uses http:// but TLS files are set; use https:// endpoints"
        )
    return EtcdConfig(
        namespace=namespace,
        component=component,
        endpoints=endpoints,
        username=username,
        password=password,
        tls=tls_wanted(scheme_tls, ca_file, ca_pem, cert_file),
        ca_file=ca_file,
        ca_pem=ca_pem,
        cert_file=cert_file,
        key_file=key_file,
        timeout=timeout,
    )


def _parse_tcpstore(
    env: Mapping[str, str], namespace: str, component: str, timeout: float
) -> TCPStoreConfig:
    for name in (ENDPOINTS, USERNAME, PASSWORD, CA_FILE, CA_PEM, CERT_FILE, KEY_FILE):
        if env_value(env, name) is not None:
            raise ConfigurationError(
                f"{name} is set but {BACKEND} is tcpstore, which has no such setting; unset it"
            )
    host = env_value(env, TCPSTORE_HOST) or env_value(env, "MASTER_ADDR")
    if host is None:
        raise ConfigurationError(f"{TCPSTORE_HOST} is not set (nor MASTER_ADDR)")
    port_name = TCPSTORE_PORT if env_value(env, TCPSTORE_PORT) is not None else "MASTER_PORT"
    raw_port = env_value(env, port_name)
    if raw_port is None:
        raise ConfigurationError(f"{TCPSTORE_PORT} is not set (nor MASTER_PORT)")
    port = parse_port(port_name, raw_port)
    raw_server = env_value(env, TCPSTORE_IS_SERVER)
    if raw_server is not None:
        is_server = parse_bool(TCPSTORE_IS_SERVER, raw_server)
    else:
        rank = env_value(env, "RANK")
        if rank is None:
            raise ConfigurationError(
                f"{TCPSTORE_IS_SERVER} is not set (nor RANK): say whether this process"
                " hosts the TCPStore server"
            )
        try:
            is_server = int(rank) == 0
        except ValueError:
            raise ConfigurationError(f"RANK={rank!r} is not an integer") from None
    world_name = (
        TCPSTORE_WORLD_SIZE if env_value(env, TCPSTORE_WORLD_SIZE) is not None else "WORLD_SIZE"
    )
    world_size = None
    if env_value(env, world_name) is not None:
        world_size = env_int(env, world_name, 0, minimum=1)
    return TCPStoreConfig(
        namespace=namespace,
        component=component,
        host=host,
        port=port,
        is_server=is_server,
        world_size=world_size,
        timeout=timeout,
    )
