"""Batched counters (``Coordination.Add``) through a real gateway on real etcd."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable

import grpc
import pytest

from etha.kvstore import gateway_api as api
from etha.kvstore.config import EtcdConfig
from etha.kvstore.errors import KVStoreError
from etha.kvstore.etcd import coordination_supported, gateway_add
from etha.kvstore.etcd_client import EtcdClient, normalize_endpoints
from tests.gateway.conftest import TenantCreds, tenant_client
from tests.support.etcd_metrics import handled_calls
from tests.support.etcd_server import EtcdCluster
from tests.support.gateway import GatewayProcess

PROCESSES = 64
ADDS_EACH = 8


def _adder(env: dict[str, str], key: str, count: int, go: float) -> list[int]:
    """One worker process: an EthaStore from ``ETHA_KV_*``, ``count`` adds at ``go``."""
    os.environ.update(env)
    from etha.distributed.store import EthaStore

    store = EthaStore(timeout=60)
    store.check(["warm-up"])  # connected and logged in before the start
    while time.perf_counter() < go:
        time.sleep(0.005)
    try:
        return [store.add(key, 1) for _ in range(count)]
    finally:
        store.close()


def _config(gateway: GatewayProcess, creds: TenantCreds) -> EtcdConfig:
    endpoints, _ = normalize_endpoints([gateway.endpoint])
    return EtcdConfig(
        namespace=creds.prefix,
        endpoints=tuple(endpoints),
        username=creds.username,
        password=creds.secret,
        timeout=60,
    )


def test_adds_of_64_processes_are_exact_in_few_transactions(
    gateway: GatewayProcess,
    tenant: Callable[..., TenantCreds],
    etcd_auth: EtcdCluster,
) -> None:
    creds = tenant()
    env = _config(gateway, creds).to_env()
    ctx = multiprocessing.get_context("forkserver")
    # Children fork from a server that imported torch once (not 64 imports on 2 cores).
    ctx.set_forkserver_preload(["etha.distributed.store"])
    with ctx.Pool(PROCESSES) as pool:
        # Warm the pool (imports torch once per process) before counting transactions.
        pool.starmap(_adder, [(env, "warm", 0, 0.0)] * PROCESSES, chunksize=1)
        txns_before = handled_calls(etcd_auth, "Txn")["Txn"]
        go = time.perf_counter() + 2.0
        results = pool.starmap(_adder, [(env, "counter", ADDS_EACH, go)] * PROCESSES, chunksize=1)
        txns = handled_calls(etcd_auth, "Txn")["Txn"] - txns_before
    total = PROCESSES * ADDS_EACH
    flat = sorted(v for per in results for v in per)
    # Linearizable: every add saw a distinct value, and together they are exactly 1..total.
    assert flat == list(range(1, total + 1))
    for per in results:
        assert per == sorted(per), "one process's adds must see increasing values"
    client = tenant_client([gateway.endpoint], creds)
    try:
        stored = client.range(f"{creds.prefix}/torch/counter".encode()).kvs[0].value
    finally:
        client.close()
    assert stored == str(total).encode()  # decimal text, as torch expects
    print(f"{txns:.0f} etcd transactions for {total} adds by {PROCESSES} processes")
    assert txns <= 2 * total, f"{txns} etcd transactions for {total} adds"


def test_add_through_the_library_and_its_refusals(
    gateway: GatewayProcess, tenant: Callable[..., TenantCreds]
) -> None:
    creds, other = tenant(), tenant()
    client = tenant_client([gateway.endpoint], creds)
    try:
        key = f"{creds.prefix}/c/n".encode()
        assert gateway_add(client, key, 5) == 5
        assert gateway_add(client, key, -7) == -2
        client.put(key, b"41")
        assert gateway_add(client, key, 1) == 42
        assert coordination_supported(client)
        client.put(key, b"not a number")
        with pytest.raises(KVStoreError) as info:
            gateway_add(client, key, 1)
        assert info.value.code == "FAILED_PRECONDITION"
        assert client.range(key).kvs[0].value == b"not a number"  # left alone
        with pytest.raises(KVStoreError) as info:
            gateway_add(client, f"{other.prefix}/c/n".encode(), 1)
        assert info.value.code == "PERMISSION_DENIED"
    finally:
        client.close()


def test_add_wraps_at_64_bits_like_torch(
    gateway: GatewayProcess, tenant: Callable[..., TenantCreds]
) -> None:
    creds = tenant()
    client = tenant_client([gateway.endpoint], creds)
    try:
        key = f"{creds.prefix}/wrap".encode()
        client.put(key, str(2**63 - 1).encode())
        assert gateway_add(client, key, 1) == -(2**63)
    finally:
        client.close()


def test_plain_etcd_keeps_the_compare_and_swap(etcd_auth: EtcdCluster, namespace: str) -> None:
    from tests.support.etcd_server import ROOT_USER

    client = EtcdClient(etcd_auth.endpoints, username=ROOT_USER, password=etcd_auth.root_password)
    try:
        assert gateway_add(client, f"{namespace}/n".encode(), 1) is None
        assert not coordination_supported(client)
    finally:
        client.close()


def test_add_without_a_token_is_refused_like_etcd(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.endpoint) as channel, pytest.raises(grpc.RpcError) as info:
        api.add_stub(channel)(api.AddRequest(key=b"x/y", delta=1), timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "etcdserver: user name is empty"
