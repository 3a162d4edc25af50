"""Compaction during waits, and auth-token expiry under many idle clients (real etcd).

Compaction: every wait is made to start its watch from a revision that was compacted
after its read (a hook on the client's watch hub compacts first; the compaction is done
by ANOTHER tenant's credentials, which etcd allows), while a background tenant compacts
in a loop. Each wait must still return exactly the right keys/value.

Token expiry: many idle clients and idle watch streams sit through several token TTLs;
afterwards every client writes and reads, and every wait started before the expiry
completes when its key is written after it.

Extends tests/test_etcd_backend.py (one compacted wait; one idle stream over expiry).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyetcd import etcdrpc

from etha.kvstore.etcd import EtcdKVStore
from etha.kvstore.etcd_client import EtcdClient
from etha.kvstore.etcd_watch import WatchCompacted
from tests.reliability.conftest import PrefixUser, make_prefix_user
from tests.support.chaos import record, scaled
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.etcd_users import root_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    # Private: compaction and short tokens would disturb tests sharing a server.
    with etcd_cluster(tmp_path / "etcd", auth=True, auth_token_ttl=2) as c:
        yield c


def _client(cluster: EtcdCluster, user: PrefixUser) -> EtcdClient:
    return EtcdClient(cluster.urls, username=user.name, password=user.password, timeout=10)


def _store(client: EtcdClient, user: PrefixUser, cluster: EtcdCluster) -> EtcdKVStore:
    return EtcdKVStore(user.namespace, "w", endpoints=cluster.urls, client=client)


class _Compactor:
    """Compacts the keyspace as tenant ``user`` (never root)."""

    def __init__(self, cluster: EtcdCluster, user: PrefixUser) -> None:
        self.client = _client(cluster, user)
        self.key = f"{user.namespace}/bump".encode()
        self.lock = threading.Lock()
        self.count = 0

    def compact_now(self) -> int:
        """Bump the revision twice and compact at the newest one; returns it."""
        with self.lock:
            self.client.put(self.key, b"1")
            revision = int(self.client.put(self.key, b"2").header.revision)
            try:
                self.client.call(
                    "KV", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=False)
                )
            except Exception as exc:  # compacting an already-compacted revision is fine
                if "compacted" not in str(exc):
                    raise
            self.count += 1
            return revision


class _Counting:
    """A watcher that counts the compaction notices it passes on (the wait re-reads)."""

    def __init__(self, watcher: Any, counter: list[int], lock: threading.Lock) -> None:
        self.watcher, self.counter, self.lock = watcher, counter, lock

    def get(self, timeout: float | None) -> Any:
        try:
            return self.watcher.get(timeout)
        except WatchCompacted:
            with self.lock:
                self.counter[0] += 1
            raise

    def cancel(self) -> None:
        self.watcher.cancel()


def test_waits_complete_when_their_watch_revision_was_compacted(cluster: EtcdCluster) -> None:
    waits = scaled(24, 200)
    parallel = 8
    with root_client(cluster) as root:
        tenant, other = make_prefix_user(root), make_prefix_user(root)
    compactor = _Compactor(cluster, other)
    compacted: list[int] = []  # compaction notices per wait
    started_compacted: list[int] = []
    unnoticed: list[Any] = []  # (wait, [(watch start, compacted at)], watches) without notice
    lock = threading.Lock()
    results: list[Any] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            compactor.compact_now()
            time.sleep(0.01)

    def one_wait(index: int) -> None:
        client = _client(cluster, tenant)
        hub = client.watch_hub
        real_watch = hub.watch
        calls = [0]
        mine = [0]
        trace: list[tuple[int, int]] = []
        base = f"r{index}"
        writer = _store(_client(cluster, tenant), tenant, cluster)

        def write() -> None:
            if index % 2 == 0:
                for i in range(4):
                    writer.set(f"{base}/rank:{i}", "1")
            else:
                writer.set(f"{base}/state", "starting")
                writer.set(f"{base}/state", "go")

        # The writes start only once the wait has read (nothing) and its watch revision
        # has been compacted: every wait meets the fault.
        timer = threading.Timer(0.05, write)

        def watch_after_compaction(
            key: bytes, range_end: bytes | None, start: int, *args: Any, **kwargs: Any
        ) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                revision = compactor.compact_now()
                assert revision > start  # the start revision is gone now
                trace.append((start, revision))
                timer.start()
            return _Counting(real_watch(key, range_end, start, *args, **kwargs), mine, lock)

        hub.watch = watch_after_compaction  # type: ignore[method-assign]
        store = _store(client, tenant, cluster)
        try:
            if index % 2 == 0:
                got: Any = store.wait_for_keys(f"{base}/rank:*", 4, timeout=60)
                want: Any = [f"{base}/rank:{i}" for i in range(4)]
            else:
                got, want = store.wait_for_value(f"{base}/state", "go", timeout=60), b"go"
            timer.join()
            results.append((got, want))
            with lock:
                compacted.append(mine[0])
                started_compacted.append(len(trace))
                if not mine[0]:
                    unnoticed.append((index, trace, calls[0]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            timer.cancel()
            store.close(cleanup=False)
            writer.close(cleanup=False)
            writer.client.close()
            client.close()

    background = threading.Thread(target=storm, daemon=True)
    background.start()
    try:
        for start in range(0, waits, parallel):
            threads = [
                threading.Thread(target=one_wait, args=(i,))
                for i in range(start, min(start + parallel, waits))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
                assert not t.is_alive(), "a wait hung after a compaction"
    finally:
        stop.set()
        background.join(30)
        compactor.client.close()
    record(
        "compaction_during_waits",
        {
            "waits": waits,
            "completed_correctly": sum(1 for got, want in results if got == want),
            "failed": len(errors),
            "watches_started_on_a_compacted_revision": sum(started_compacted),
            "compaction_notices_then_re_read": sum(compacted),
            "waits_that_saw_a_compaction": sum(1 for n in compacted if n),
            "waits_without_a_compaction_notice": unnoticed[:10],
            "compactions": compactor.count,
            "compacted_by": "another tenant (non-root user; etcd 3.5 allows it)",
        },
    )
    assert errors == []
    assert len(results) == waits
    assert all(got == want for got, want in results)
    # The fault really hit: (nearly) every wait's watch was told its start revision is gone
    # and re-read. A few may instead get their result from events etcd sent before the
    # notice (recorded above); either way the result must be right.
    assert len(compacted) == waits and sum(started_compacted) == waits
    assert sum(1 for n in compacted if n) >= 0.9 * waits, unnoticed


def test_idle_clients_and_watches_carry_on_after_the_token_expired(cluster: EtcdCluster) -> None:
    clients_n = scaled(12, 48)
    ttl = 2
    idle = ttl * 3 + 1
    with root_client(cluster) as root:
        user = make_prefix_user(root)
    clients = [_client(cluster, user) for _ in range(clients_n)]
    stores = [_store(c, user, cluster) for c in clients]
    outcomes: list[Any] = [None] * clients_n
    try:
        for i, store in enumerate(stores):
            store.set(f"hello/{i}", "1")  # every client logged in and holds a token
        waiters = []
        for i, store in enumerate(stores):

            def wait(i: int = i, store: EtcdKVStore = store) -> None:
                try:
                    outcomes[i] = store.wait_for_value(f"after/{i}", "late", timeout=idle + 60)
                except BaseException as exc:
                    outcomes[i] = exc

            t = threading.Thread(target=wait, daemon=True)
            t.start()
            waiters.append(t)
        time.sleep(idle)  # tokens expire; the streams stay idle
        writer = _store(_client(cluster, user), user, cluster)
        for i in range(clients_n):
            writer.set(f"after/{i}", "late")
        for t in waiters:
            t.join(90)
        assert outcomes == [b"late"] * clients_n, [o for o in outcomes if o != b"late"]
        # Unary calls after the expiry log in again, once per client.
        for i, store in enumerate(stores):
            store.set(f"again/{i}", uuid.uuid4().hex)
            assert store.exists(f"again/{i}")
        writer.close(cleanup=False)
        writer.client.close()
    finally:
        for store, client in zip(stores, clients, strict=True):
            store.close(cleanup=False)
            client.close()
    record(
        "token_expiry",
        {
            "auth_token_ttl_s": ttl,
            "idle_s": idle,
            "idle_clients": clients_n,
            "idle_watch_streams": clients_n,
            "waits_completed_after_expiry": sum(o == b"late" for o in outcomes),
            "clients_writing_after_expiry": clients_n,
        },
    )
