"""EtcdKVStore through server restarts and member loss (real etcd processes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etha.kvstore.errors import KVStoreError
from etha.kvstore.etcd import EtcdKVStore
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.threads import Waiter, wait_threads_gone

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def single(tmp_path: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path / "single", auth=True) as cluster:
        yield cluster


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path / "trio", members=3, auth=True, start_timeout=60) as cluster:
        yield cluster


def wait_healthy_with_auth(cluster: EtcdCluster, timeout: float = 30.0) -> None:
    """The harness's health check runs without credentials, which an auth cluster refuses."""
    deadline = time.monotonic() + timeout
    while True:
        result = cluster.etcdctl("endpoint", "health", check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"etcd not healthy after restart: {result.stderr.strip()}")
        time.sleep(0.1)


def open_store(cluster: EtcdCluster, namespace: str, timeout: float = 10.0) -> EtcdKVStore:
    return EtcdKVStore(
        namespace, endpoints=cluster.urls, username="root", password=cluster.root_password,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_wait_for_key_across_a_server_restart(
    single: EtcdCluster, namespace: str, crash: bool
) -> None:
    wait_timeout = 30.0
    store = open_store(single, namespace)
    try:
        waiter = Waiter(lambda: store.wait_for_key("after-restart", timeout=wait_timeout))
        waiter.start()
        time.sleep(0.5)  # the waiter is now watching
        node = single.nodes[0]
        node.kill() if crash else node.stop()
        time.sleep(1.0)
        node.start()
        wait_healthy_with_auth(single)
        with open_store(single, namespace) as writer:
            writer.set("after-restart", "yes")
        waiter.join(wait_timeout + 30)
        assert not waiter.is_alive()
        # Either outcome is allowed; hanging or exceeding the timeout is not.
        if waiter.error is None:
            assert waiter.result == b"yes"
        else:
            assert isinstance(waiter.error, (KVStoreError, TimeoutError)), waiter.error
        assert waiter.elapsed < wait_timeout + 10
        # The store itself works again.
        store.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        store.close()


def test_wait_while_the_server_stays_down_fails_within_its_timeout(
    single: EtcdCluster, namespace: str
) -> None:
    store = open_store(single, namespace, timeout=2.0)
    try:
        waiter = Waiter(lambda: store.wait_for_key("never", timeout=3.0))
        waiter.start()
        time.sleep(0.5)
        single.nodes[0].stop()
        waiter.join(60)
        assert not waiter.is_alive()
        assert isinstance(waiter.error, TimeoutError), waiter.error
        assert "never" in str(waiter.error)
        assert waiter.elapsed < 3.0 + 10
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            store.wait_for_key("never", timeout=1.0)  # etcd is down from the start
        assert time.monotonic() - started < 1.0 + 10
    finally:
        store.close(cleanup=False)


def barrier_with_rank_0_in(store: EtcdKVStore, ranks: int, timeout: float) -> Waiter:
    """A barrier of ``ranks`` waiting in a thread, and rank 0 arrived once it waits."""
    barrier = Waiter(lambda: store.wait_for_keys("rank:*/ready", ranks, timeout=timeout))
    barrier.start()
    time.sleep(0.5)
    store.set("rank:0/ready", "1")
    return barrier


def joined(waiter: Waiter, timeout: float) -> object:
    """What the waiter's call returned; it must end within ``timeout`` and not raise."""
    waiter.join(timeout)
    assert not waiter.is_alive()
    assert waiter.error is None, waiter.error
    return waiter.result


def test_three_members_survive_the_loss_of_the_first_endpoint(
    trio: EtcdCluster, namespace: str
) -> None:
    store = open_store(trio, namespace)
    try:
        store.set("before", "1")
        barrier = barrier_with_rank_0_in(store, 3, timeout=60)
        first = trio.nodes[0]
        assert store.client.connection().endpoint.port == first.client_port
        first.stop()
        # Writes and reads continue through the remaining members.
        store.set("rank:1/ready", "1")
        assert store.get("before") == b"1"
        store.set("rank:2/ready", "1")
        assert joined(barrier, 90) == ["rank:0/ready", "rank:1/ready", "rank:2/ready"]
        # A new wait after the loss goes through a surviving member too.
        later = Waiter(lambda: store.wait_for_value("after", "x", timeout=60))
        later.start()
        time.sleep(0.3)
        store.set("after", "x")
        later.join(90)
        assert later.error is None and later.result == b"x"
    finally:
        store.close()


def test_a_new_store_starts_when_the_first_endpoint_is_down(
    trio: EtcdCluster, namespace: str
) -> None:
    trio.nodes[0].stop()
    with open_store(trio, namespace) as store:
        store.set("k", "v")
        assert store.wait_for_key("k", timeout=30) == b"v"


def test_a_hung_member_is_left_for_the_next_one(trio: EtcdCluster, namespace: str) -> None:
    # SIGSTOP: the member keeps its TCP connections open and answers nothing, so gRPC
    # never reports it UNAVAILABLE; only deadlines and watch progress requests show it.
    before = set(threading.enumerate())
    store = open_store(trio, namespace, timeout=9.0)
    first = trio.nodes[0]
    try:
        store.set("before", "1")
        barrier = barrier_with_rank_0_in(store, 2, timeout=30)
        assert store.client.connection().endpoint.port == first.client_port
        first.pause()
        # A read is retried on the next member within the call's own timeout.
        assert store.get("before") == b"1"
        assert store.client.connection().endpoint.port != first.client_port
        store.set("rank:1/ready", "1")
        # The barrier's watch stream left the hung member too (a progress request went
        # unanswered), so the second arrival reaches it well within its timeout.
        assert joined(barrier, 60) == ["rank:0/ready", "rank:1/ready"]
        assert store.client.watch_hub.describe() != (
            f"watch stream connected to 127.0.0.1:{first.client_port}"
        )
        assert any(t.name == "etha-etcd-watch-probe" for t in threading.enumerate())
    finally:
        first.resume()
        store.close()
    # The watch reader and the prober end with the store (the shared client's last user).
    assert wait_threads_gone(before) == []


def test_a_compare_and_swap_is_not_re_sent_to_another_member_after_a_deadline(
    trio: EtcdCluster, namespace: str
) -> None:
    from pyetcd import etcdrpc

    from etha.kvstore.errors import KVTimeoutError

    store = open_store(trio, namespace, timeout=9.0)
    first = trio.nodes[0]
    key = f"{namespace}/default/counter".encode()
    try:
        store.client.put(key, b"0")
        cas = etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(
                result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.VALUE, key=key, value=b"0"
            )],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=b"1"))],
        )  # fmt: skip
        assert store.client.connection().endpoint.port == first.client_port
        first.pause()
        # The CAS may have reached the hung member: it times out rather than being
        # re-sent elsewhere (which could apply it twice)...
        with pytest.raises(KVTimeoutError):
            store.client.txn(cas, timeout=2.0)
        # ...and the calls after it go to the next member.
        assert store.client.connection().endpoint.port != first.client_port
        assert store.get("counter") == b"0"
    finally:
        first.resume()
        store.close()
