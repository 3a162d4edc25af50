"""Concurrent Puts through the gateway are coalesced into Txns (etha.gateway.batch).

Every simulated rank is its own client: its own gRPC channel and log-in. What etcd
received is read from etcd's own metrics, not from the gateway's claims.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from pyetcd import etcdrpc

from etha.kvstore.etcd_client import EtcdClient
from tests.gateway.conftest import TenantCreds, start_gateway
from tests.support.etcd_metrics import handled_calls
from tests.support.etcd_server import ROOT_USER, EtcdCluster, etcd_cluster
from tests.support.gateway import GatewayProcess, register_tenant

Factory = Callable[..., TenantCreds]


def _etcd_calls(cluster: EtcdCluster) -> dict[str, float]:
    """etcd's count of handled KV.Put and KV.Txn calls (its own metrics)."""
    return handled_calls(cluster, "Put", "Txn")


async def _ranks_put(
    endpoint: str, creds: TenantCreds, items: list[tuple[bytes, bytes]]
) -> list[etcdrpc.PutResponse]:
    """One independent client per item (own channel, own log-in); all put at once."""
    channels = [grpc.aio.insecure_channel(endpoint) for _ in items]
    try:
        tokens = await asyncio.gather(*(
            etcdrpc.AuthStub(ch).Authenticate(
                etcdrpc.AuthenticateRequest(name=creds.username, password=creds.secret),
                timeout=30,
            )
            for ch in channels
        ))  # fmt: skip
        go = asyncio.Event()

        async def one(ch: grpc.aio.Channel, token: str, key: bytes, value: bytes) -> object:
            stub = etcdrpc.KVStub(ch)
            await go.wait()
            request = etcdrpc.PutRequest(key=key, value=value, prev_kv=True)
            return await stub.Put(request, metadata=(("token", token),), timeout=30)

        tasks = [
            asyncio.ensure_future(one(ch, t.token, k, v))
            for ch, t, (k, v) in zip(channels, tokens, items, strict=True)
        ]
        await asyncio.sleep(0.2)
        go.set()
        return list(await asyncio.gather(*tasks))
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


def test_concurrent_puts_reach_etcd_in_fewer_calls_and_all_land(
    etcd_auth: EtcdCluster, gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    creds = tenant()
    n = 256
    items = [(f"{creds.prefix}/b/rank:{i}".encode(), f"v{i}".encode()) for i in range(n)]
    before = _etcd_calls(etcd_auth)
    answers = asyncio.run(_ranks_put(gateway.endpoint, creds, items))
    after = _etcd_calls(etcd_auth)

    # Every put landed with its own value (read back by root, straight from etcd).
    kvs = root.range(f"{creds.prefix}/b/".encode(), f"{creds.prefix}/b0".encode()).kvs
    assert {bytes(kv.key): bytes(kv.value) for kv in kvs} == dict(items)
    # Each answer's revision is the revision its key holds.
    mod = {bytes(kv.key): kv.mod_revision for kv in kvs}
    assert [a.header.revision for a in answers] == [mod[k] for k, _ in items]
    assert all(not a.HasField("prev_kv") for a in answers)  # new keys: nothing before
    # Batched: puts shared revisions, and etcd got far fewer calls than puts.
    calls = (after["Put"] - before["Put"]) + (after["Txn"] - before["Txn"])
    assert len({a.header.revision for a in answers}) < n
    assert calls < n, f"etcd handled {calls:.0f} Put/Txn calls for {n} puts"


def test_concurrent_puts_of_one_key_chain_their_prev_kv(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    """Puts of one key are never in one Txn: each sees exactly the value before it."""
    creds = tenant()
    key = f"{creds.prefix}/same".encode()
    n = 64
    values = [f"v{i}".encode() for i in range(n)]
    answers = asyncio.run(_ranks_put(gateway.endpoint, creds, [(key, v) for v in values]))

    revisions = [a.header.revision for a in answers]
    assert len(set(revisions)) == n  # one key, one revision per put
    order = [v for _, v in sorted(zip(revisions, values, strict=True))]
    by_value = dict(zip(values, answers, strict=True))
    assert not by_value[order[0]].HasField("prev_kv")
    for earlier, later in itertools.pairwise(order):
        assert bytes(by_value[later].prev_kv.value) == earlier
    assert bytes(root.range(key).kvs[0].value) == order[-1]


def test_batch_refused_by_etcd_limits_falls_back_to_single_puts(tmp_path: Path) -> None:
    """etcd allows 2 ops per Txn here: batches are refused, every put still lands alone."""
    with etcd_cluster(tmp_path / "etcd", auth=True, extra_args=("--max-txn-ops=2",)) as cluster:
        root = EtcdClient(cluster.endpoints, username=ROOT_USER, password=cluster.root_password)
        gw = start_gateway(cluster, tmp_path / "gw")
        try:
            username, secret, prefix = register_tenant(root)
            creds = TenantCreds(username, secret, prefix)
            items = [(f"{prefix}/k{i}".encode(), f"v{i}".encode()) for i in range(64)]
            before = _etcd_calls(cluster)
            answers = asyncio.run(_ranks_put(gw.endpoint, creds, items))
            after = _etcd_calls(cluster)
            kvs = root.range(f"{prefix}/".encode(), f"{prefix}0".encode()).kvs
            assert {bytes(kv.key): bytes(kv.value) for kv in kvs} == dict(items)
            assert len(answers) == len(items)
            # The fallback really ran: etcd refused at least one Txn, and then saw
            # one Put per refused put.
            assert after["Txn"] > before["Txn"], "no batch was tried"
            assert after["Put"] - before["Put"] >= 3
        finally:
            gw.stop()
            root.close()


@pytest.mark.parametrize("flag", ["ignore_value", "ignore_lease"])
def test_put_with_ignore_flags_keeps_its_own_error(
    gateway: GatewayProcess, tenant: Factory, flag: str
) -> None:
    """Such puts are never batched: etcd's own "key not found" reaches only their caller."""
    creds = tenant()

    async def run() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(gateway.endpoint) as ch:
            token = await etcdrpc.AuthStub(ch).Authenticate(
                etcdrpc.AuthenticateRequest(name=creds.username, password=creds.secret)
            )
            request = etcdrpc.PutRequest(key=f"{creds.prefix}/absent".encode())
            setattr(request, flag, True)
            try:
                await etcdrpc.KVStub(ch).Put(
                    request, metadata=(("token", token.token),), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                assert "key not found" in (exc.details() or "")
                return exc.code()
            raise AssertionError("etcd accepted an ignore_* put of a missing key")

    assert asyncio.run(run()) is grpc.StatusCode.INVALID_ARGUMENT
