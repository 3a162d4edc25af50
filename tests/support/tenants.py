"""Tenants for tests: a namespace user straight on etcd, or a tenant behind a gateway.

``namespace_fixture`` makes the module-scoped fixture a test module names ``ns_a``,
``ns_b``, ...; ``root_gateway`` is a gateway replica that reaches etcd as root (what the
operator deploys); ``gateway_tenant`` registers a tenant and yields its client config.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from etha.kvstore.config import DEFAULT_TIMEOUT, EtcdConfig, parse_endpoints
from tests.support.etcd_server import ROOT_USER, EtcdCluster
from tests.support.etcd_users import namespace_config, root_client
from tests.support.gateway import GatewayProcess, register_tenant


def namespace_fixture(label: str) -> Callable[..., EtcdConfig]:
    """A module-scoped fixture: a fresh ``{label}-<random>`` namespace user on ``etcd_auth``.

    Assign it to the fixture's name in the test module: ``ns_a = namespace_fixture("x-a")``.
    """

    @pytest.fixture(scope="module")
    def namespace(etcd_auth: EtcdCluster) -> EtcdConfig:
        return namespace_config(etcd_auth, f"{label}-{uuid.uuid4().hex[:8]}")

    return namespace


def root_gateway(cluster: EtcdCluster, workdir: Path, **kwargs: Any) -> GatewayProcess:
    """A gateway replica (not started yet) that reaches ``cluster`` as etcd's root user.

    ``kwargs`` go to :class:`GatewayProcess` (``env``, ``token_key_file``, ``name``).
    Start it with ``.start()`` (then ``.stop()`` it) or use it as a context manager.
    """
    return GatewayProcess(
        cluster.endpoints, workdir, username=ROOT_USER, password=cluster.root_password, **kwargs
    )


@contextmanager
def gateway_tenant(
    cluster: EtcdCluster, workdir: Path, timeout: float = DEFAULT_TIMEOUT
) -> Iterator[EtcdConfig]:
    """A new tenant behind a new gateway on ``cluster``, as the tenant's client config.

    The gateway is stopped when the block is left.
    """
    with root_client(cluster) as root:
        username, secret, prefix = register_tenant(root)
    with root_gateway(cluster, workdir) as gateway:
        endpoints, _ = parse_endpoints(gateway.endpoint)
        yield EtcdConfig(
            namespace=prefix,
            endpoints=endpoints,
            username=username,
            password=secret,
            timeout=timeout,
        )


def gateway_fixture(workdir_name: str) -> Callable[..., Iterator[GatewayProcess]]:
    """A module-scoped fixture: one started :func:`root_gateway` on ``etcd_auth``.

    Assign it to the fixture's name in the test module: ``gateway = gateway_fixture("gw")``.
    """

    @pytest.fixture(scope="module")
    def gateway(
        etcd_auth: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[GatewayProcess]:
        with root_gateway(etcd_auth, tmp_path_factory.mktemp(workdir_name)) as process:
            yield process

    return gateway


def gateway_tenant_fixture(
    workdir_name: str, timeout: float = DEFAULT_TIMEOUT
) -> Callable[..., Iterator[EtcdConfig]]:
    """A module-scoped fixture: a :func:`gateway_tenant` on ``etcd_auth``, its config."""

    @pytest.fixture(scope="module")
    def tenant_config(
        etcd_auth: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[EtcdConfig]:
        workdir = tmp_path_factory.mktemp(workdir_name)
        with gateway_tenant(etcd_auth, workdir, timeout=timeout) as config:
            yield config

    return tenant_config
