"""Fixtures: real etcd with auth, one real gateway process, tenants registered like the operator."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from etha.kvstore.etcd import EtcdKVStore
from etha.kvstore.etcd_client import EtcdClient
from tests.support.etcd_server import EtcdCluster
from tests.support.etcd_users import root_client
from tests.support.gateway import GatewayProcess, register_tenant
from tests.support.tenants import gateway_fixture, root_gateway

STORE_TIMEOUT = 15.0


@dataclass
class TenantCreds:
    username: str
    secret: str
    prefix: str
    opened: list[EtcdKVStore] = field(default_factory=list)


def open_store(
    endpoints: list[str],
    creds: TenantCreds,
    component: str = "default",
    timeout: float = STORE_TIMEOUT,
) -> EtcdKVStore:
    """An etha store through the gateway(s) at ``endpoints``, as the tenant."""
    store = EtcdKVStore(
        creds.prefix,
        component,
        endpoints=endpoints,
        username=creds.username,
        password=creds.secret,
        timeout=timeout,
    )
    creds.opened.append(store)
    return store


def tenant_client(
    endpoints: list[str], creds: TenantCreds, timeout: float = STORE_TIMEOUT
) -> EtcdClient:
    """A raw etcd client through the gateway(s), as the tenant (caller closes it)."""
    return EtcdClient(endpoints, username=creds.username, password=creds.secret, timeout=timeout)


@pytest.fixture(scope="module")
def root(etcd_auth: EtcdCluster) -> Iterator[EtcdClient]:
    """etcd's root user, straight to etcd (what the operator uses)."""
    with root_client(etcd_auth) as client:
        yield client


def start_gateway(
    cluster: EtcdCluster, workdir: Path, env: Mapping[str, str] | None = None, **kwargs: object
) -> GatewayProcess:
    """A started gateway replica that reaches ``cluster`` as root (the caller stops it)."""
    return root_gateway(cluster, workdir, env=env, **kwargs).start()


#: One gateway replica in front of the session's etcd (with auth).
gateway = gateway_fixture("gateway")


@pytest.fixture
def tenant(root: EtcdClient) -> Iterator[Callable[..., TenantCreds]]:
    """Factory: ``tenant(quotas={...})`` registers a fresh tenant; its stores close after."""
    made: list[TenantCreds] = []

    def make(quotas: Mapping[str, int] | None = None, prefix: str | None = None) -> TenantCreds:
        username, secret, real_prefix = register_tenant(root, prefix, quotas=quotas)
        creds = TenantCreds(username, secret, real_prefix)
        made.append(creds)
        return creds

    try:
        yield make
    finally:
        for creds in made:
            for store in creds.opened:
                store.close()
