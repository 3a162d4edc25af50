"""Fixtures: real etcd with auth, one real gateway process, tenants registered like the operator."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from etha.kvstore.etcd import EtcdKVStore
from etha.kvstore.etcd_client import EtcdClient
from tests.support.etcd_server import ROOT_USER, EtcdCluster
from tests.support.gateway import GatewayProcess, register_tenant

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
    client = EtcdClient(etcd_auth.endpoints, username=ROOT_USER, password=etcd_auth.root_password)
    try:
        yield client
    finally:
        client.close()


def start_gateway(
    cluster: EtcdCluster, workdir: Path, env: Mapping[str, str] | None = None, **kwargs: object
) -> GatewayProcess:
    gateway = GatewayProcess(
        cluster.endpoints,
        workdir,
        username=ROOT_USER,
        password=cluster.root_password,
        env=env,
        **kwargs,  # type: ignore[arg-type]
    )
    return gateway.start()


@pytest.fixture(scope="module")
def gateway(
    etcd_auth: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """One gateway replica in front of the session's etcd (with auth)."""
    gw = start_gateway(etcd_auth, tmp_path_factory.mktemp("gateway"))
    try:
        yield gw
    finally:
        gw.stop()


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
