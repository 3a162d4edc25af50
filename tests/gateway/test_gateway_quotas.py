"""Quotas through the real gateway: each refusal is a named QuotaExceededError, changes
nothing, and leaves other tenants writing. Plus the etcd-space guard, which keeps a tenant
from driving etcd into NOSPACE (etcd's alarm list stays empty)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pyetcd import etcdrpc

from etha.kvstore import QuotaExceededError
from etha.kvstore.etcd_client import EtcdClient
from tests.gateway.conftest import TenantCreds, open_store, start_gateway, tenant_client
from tests.support.etcd_server import ROOT_USER, etcd_cluster
from tests.support.gateway import GatewayProcess, register_tenant

pytestmark = pytest.mark.timeout(180)

Factory = Callable[..., TenantCreds]


def _keys_under(root: EtcdClient, creds: TenantCreds) -> dict[bytes, bytes]:
    start = f"{creds.prefix}/".encode()
    response = root.range(start, f"{creds.prefix}0".encode())
    return {kv.key: kv.value for kv in response.kvs}


def _bystander_writes(gateway: GatewayProcess, tenant: Factory) -> None:
    other = tenant()
    store = open_store([gateway.endpoint], other)
    for i in range(5):
        store.set(f"k{i}", "still writing")
    assert store.get("k4") == b"still writing"


def test_keys_quota(gateway: GatewayProcess, tenant: Factory, root: EtcdClient) -> None:
    creds = tenant(quotas={"keys": 3})
    store = open_store([gateway.endpoint], creds)
    for i in range(3):
        store.set(f"k{i}", "v")
    before = _keys_under(root, creds)
    with pytest.raises(QuotaExceededError) as err:
        store.set("k3", "v")
    assert err.value.quota == "keys"
    assert "keys (3 of 3)" in str(err.value)
    assert _keys_under(root, creds) == before
    store.set("k0", "overwriting an existing key adds none")
    assert store.get("k0") == b"overwriting an existing key adds none"
    assert store.delete("k1")
    store.set("k3", "fits again")
    assert store.get("k3") == b"fits again"
    _bystander_writes(gateway, tenant)


def test_bytes_quota_counts_keys_and_values(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    creds = tenant(quotas={"bytes": 400})
    prefix = f"{creds.prefix}/b/".encode()
    with tenant_client([gateway.endpoint], creds) as client:
        client.put(prefix + b"a", b"x" * 200)
        before = _keys_under(root, creds)
        with pytest.raises(QuotaExceededError) as err:
            client.put(prefix + b"b", b"y" * 200)
        assert err.value.quota == "bytes"
        # A Txn is counted too (both branches' puts).
        txn = etcdrpc.TxnRequest(
            success=[
                etcdrpc.RequestOp(
                    request_put=etcdrpc.PutRequest(key=prefix + b"c", value=b"z" * 300)
                )
            ]
        )
        with pytest.raises(QuotaExceededError):
            client.txn(txn)
        assert _keys_under(root, creds) == before
        # Shrinking a value frees bytes; a delete frees the rest.
        client.put(prefix + b"a", b"x" * 10)
        client.put(prefix + b"b", b"y" * 200)
        client.delete_range(prefix, f"{creds.prefix}/c".encode())
        client.put(prefix + b"c", b"z" * 300)
    _bystander_writes(gateway, tenant)


def test_value_bytes_quota(gateway: GatewayProcess, tenant: Factory, root: EtcdClient) -> None:
    creds = tenant(quotas={"value_bytes": 100})
    store = open_store([gateway.endpoint], creds)
    store.set("small", "x" * 100)
    with pytest.raises(QuotaExceededError) as err:
        store.set("big", "x" * 101)
    assert err.value.quota == "value_bytes"
    assert f"{creds.prefix}/default/big".encode() not in _keys_under(root, creds)
    _bystander_writes(gateway, tenant)


def test_watches_quota(gateway: GatewayProcess, tenant: Factory) -> None:
    creds = tenant(quotas={"watches": 2})
    base = f"{creds.prefix}/w/".encode()
    with tenant_client([gateway.endpoint], creds) as client:
        revision = client.range(base).header.revision
        hub = client.watch_hub
        first, second = (
            hub.watch(base + b"1", b"", revision + 1),
            hub.watch(base + b"2", b"", revision + 1),
        )
        third = hub.watch(base + b"3", b"", revision + 1)
        with pytest.raises(QuotaExceededError) as err:
            third.get(timeout=10)
        assert err.value.quota == "watches"
        client.put(base + b"2", b"v")
        events = second.get(timeout=10)
        assert events is not None and events[0].kv.value == b"v"
        first.cancel()
        # A cancelled watch frees its slot once etcd confirms the cancel.
        deadline = time.monotonic() + 20
        open_now = f'etha_gateway_watches_open{{tenant="{creds.username}"}} 1.0'
        while open_now not in gateway.metrics():
            assert time.monotonic() < deadline, "the cancelled watch still counts"
            time.sleep(0.1)
        fourth = hub.watch(base + b"4", b"", revision + 1)
        client.put(base + b"4", b"w")
        events = fourth.get(timeout=10)
        assert events is not None and events[0].kv.value == b"w"
    _bystander_writes(gateway, tenant)


def test_requests_per_second_quota(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    refused: list[QuotaExceededError] = []
    last_ok = -1
    creds = tenant(quotas={"requests_per_second": 5})
    key = f"{creds.prefix}/r".encode()
    with tenant_client([gateway.endpoint], creds) as client:
        for i in range(40):
            try:
                client.put(key, str(i).encode())
                last_ok = i
            except QuotaExceededError as exc:
                refused.append(exc)
    assert refused and all(e.quota == "requests_per_second" for e in refused)
    assert len(refused) >= 20  # 40 puts at once against 5/s (+ a burst of 5)
    # Refused puts changed nothing: the stored value is the last acknowledged one.
    assert int(root.range(key).kvs[0].value) == last_ok
    _bystander_writes(gateway, tenant)


def _alarms(root: EtcdClient) -> list[int]:
    response = root.call(
        "Maintenance", "Alarm", etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET)
    )
    return [int(a.alarm) for a in response.alarms]


def test_etcd_space_high_water_refuses_writes_before_nospace(tmp_path: Path) -> None:
    quota = 4 * 1024 * 1024
    with etcd_cluster(
        tmp_path / "small-etcd", auth=True, extra_args=(f"--quota-backend-bytes={quota}",)
    ) as cluster:
        root = EtcdClient(cluster.endpoints, username=ROOT_USER, password=cluster.root_password)
        gw = start_gateway(
            cluster,
            tmp_path / "gw",
            env={
                "ETHA_GATEWAY_ETCD_QUOTA_BACKEND_BYTES": str(quota),
                "ETHA_GATEWAY_ETCD_SPACE_HIGH_WATER": "0.5",
                "ETHA_GATEWAY_ETCD_SPACE_POLL": "0.2",
                "ETHA_GATEWAY_QUOTA_BYTES": "0",
                "ETHA_GATEWAY_QUOTA_KEYS": "0",
            },
        )
        try:
            username, secret, prefix = register_tenant(root)
            creds = TenantCreds(username, secret, prefix)
            value = b"x" * 200_000
            refused: QuotaExceededError | None = None
            with tenant_client([gw.endpoint], creds) as client:
                for i in range(200):  # 40 MB: ten times etcd's quota
                    try:
                        client.put(f"{prefix}/fill/{i}".encode(), value)
                    except QuotaExceededError as exc:
                        refused = exc
                        break
                assert refused is not None and refused.quota == "etcd_space"
                assert "etcd is nearly full" in str(refused)
                count = client.range(
                    f"{prefix}/".encode(), f"{prefix}0".encode(), count_only=True
                ).count
                # Refused writes change nothing; deletes are still accepted.
                with pytest.raises(QuotaExceededError):
                    client.put(f"{prefix}/fill/extra".encode(), value)
                assert client.range(f"{prefix}/fill/extra".encode()).count == 0
                assert (
                    client.range(
                        f"{prefix}/".encode(), f"{prefix}0".encode(), count_only=True
                    ).count
                    == count
                )
                assert client.delete_range(f"{prefix}/fill/0".encode()) == 1
            assert _alarms(root) == []  # etcd never reached NOSPACE
            root.close()
        finally:
            gw.stop()
