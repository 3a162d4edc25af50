"""Two gateway replicas: one is SIGKILLed under load; the client fails over, keeps its
token (the replicas share the signing keys), and no acknowledged write is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from etha.kvstore.etcd_client import EtcdClient
from tests.gateway.conftest import TenantCreds, open_store, start_gateway
from tests.support.etcd_server import EtcdCluster
from tests.support.gateway import write_token_keys

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
