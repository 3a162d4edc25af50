"""Two gateway replicas: one is SIGKILLed under load; the client fails over, keeps its
token (the replicas share the signing keys), and no acknowledged write is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pyetcd import etcdrpc

from etha.kvstore import KVStoreError, PermissionDeniedError
from etha.kvstore.etcd_client import EtcdClient
from tests.gateway.conftest import TenantCreds, open_store, start_gateway, tenant_client
from tests.support.etcd_server import ROOT_USER, EtcdCluster, etcd_cluster
from tests.support.gateway import GatewayProcess, register_tenant, revoke_tenant, write_token_keys

pytestmark = pytest.mark.timeout(180)


def test_client_fails_over_when_a_replica_is_killed(
    etcd_auth: EtcdCluster, tmp_path: Path, tenant: Callable[..., TenantCreds], root: EtcdClient
) -> None:
    keys = write_token_keys(tmp_path / "shared.keys")
    first = start_gateway(etcd_auth, tmp_path / "a", token_key_file=keys)
    second = start_gateway(etcd_auth, tmp_path / "b", token_key_file=keys)
    try:
        creds = tenant()
        store = open_store([first.endpoint, second.endpoint], creds, timeout=20)
        acknowledged: list[int] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def write() -> None:
            i = 0
            while not stop.is_set():
                try:
                    store.set(f"w/{i}", str(i))
                except BaseException as exc:
                    errors.append(exc)
                    return
                acknowledged.append(i)
                i += 1

        writer = threading.Thread(target=write)
        writer.start()
        while len(acknowledged) < 50 and writer.is_alive():
            time.sleep(0.01)
        first.kill()  # SIGKILL: in-flight calls break mid-way
        killed_at = len(acknowledged)
        deadline = time.monotonic() + 60
        while len(acknowledged) < killed_at + 50 and writer.is_alive():
            assert time.monotonic() < deadline, "writes did not resume on the other replica"
            time.sleep(0.01)
        stop.set()
        writer.join(timeout=30)
        assert not errors, errors
        assert len(acknowledged) >= killed_at + 50
        prefix = f"{creds.prefix}/default/w/".encode()
        stored = {
            kv.key[len(prefix) :].decode()
            for kv in root.range(prefix, f"{creds.prefix}/default/w0".encode(), keys_only=True).kvs
        }
        lost = [i for i in acknowledged if str(i) not in stored]
        assert lost == []
        # The surviving replica serves reads and waits too.
        assert store.get(f"w/{acknowledged[-1]}") == str(acknowledged[-1]).encode()
        store.close()
    finally:
        first.kill()
        second.stop()


def test_revocations_made_while_cut_off_from_etcd_apply_after_reconnecting(
    tmp_path: Path,
) -> None:
    """The registry's watch breaks; meanwhile a record is deleted and etcd compacted past
    the watch. On reconnect the registry reads everything again: the tenant is revoked."""
    with etcd_cluster(tmp_path / "etcd", members=3, auth=True) as cluster:
        root = EtcdClient(cluster.endpoints, username=ROOT_USER, password=cluster.root_password)
        member = cluster.nodes[0]
        gw = GatewayProcess(
            [member.endpoint], tmp_path / "gw", username=ROOT_USER, password=cluster.root_password
        ).start()
        try:
            kept = TenantCreds(*register_tenant(root))
            gone = TenantCreds(*register_tenant(root))
            for creds in (kept, gone):
                with tenant_client([gw.endpoint], creds) as client:
                    client.put(f"{creds.prefix}/k".encode(), b"v")
            member.stop()
            revoke_tenant(root, gone.username)
            for i in range(5):
                root.put(b"-filler", str(i).encode())
            revision = root.range(b"-filler").header.revision
            root.call("KV", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True))
            member.start()
            cluster.wait_healthy(nodes=[member])
            deadline = time.monotonic() + 60
            while True:
                try:
                    with tenant_client([gw.endpoint], kept, timeout=5) as client:
                        client.put(f"{kept.prefix}/k".encode(), b"again")
                    break
                except KVStoreError:
                    assert time.monotonic() < deadline, gw.log_tail()
                    time.sleep(0.5)
            with pytest.raises(PermissionDeniedError), tenant_client([gw.endpoint], gone) as c:
                c.put(f"{gone.prefix}/k".encode(), b"revoked meanwhile")
            assert root.range(f"{gone.prefix}/k".encode()).kvs[0].value == b"v"
        finally:
            gw.stop()
            root.close()
