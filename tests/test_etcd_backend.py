"""EtcdKVStore against real etcd: operations, waits, auth, TLS, size limits, cleanup."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyetcd import etcdrpc

from etha.kvstore import from_env
from etha.kvstore import keys as _keys
from etha.kvstore.config import EtcdConfig, parse_endpoints
from etha.kvstore.errors import (
    InvalidKeyError,
    InvalidValueError,
    KVTimeoutError,
    PermissionDeniedError,
    StoreClosedError,
)
from etha.kvstore.etcd import EtcdKVStore
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from etha.kvstore.etcdv3.wait import PatternView as _PatternView
from tests.support.etcd_server import ROOT_USER, EtcdCluster, etcd_cluster
from tests.support.etcd_users import grant_prefix_user, root_client
from tests.support.threads import Waiter, wait_threads_gone
from tests.support.tls import TLSFiles
from tests.support.tls_clusters import tls_cluster_fixture, tls_files_fixture

pytestmark = pytest.mark.timeout(120)


def open_store(cluster: EtcdCluster, namespace: str, **kwargs: object) -> EtcdKVStore:
    if cluster.auth and "username" not in kwargs:
        kwargs.update(username=ROOT_USER, password=cluster.root_password)
    return EtcdKVStore(namespace, endpoints=cluster.endpoints, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def store(etcd_auth: EtcdCluster, namespace: str) -> Iterator[EtcdKVStore]:
    s = open_store(etcd_auth, namespace)
    try:
        yield s
    finally:
        s.close()


def later(delay: float, fn: object, *args: object) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn(*args)  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# -- basic operations -----------------------------------------------------------------


def test_set_get_exists_delete(store: EtcdKVStore, etcd_auth: EtcdCluster) -> None:
    assert store.get("a") is None
    assert not store.exists("a")
    store.set("a", "héllo")
    assert store.get("a") == "héllo".encode()
    assert store.get_bytes("a") == store.get("a")
    assert store.exists("a")
    assert store.delete("a")
    assert not store.delete("a")
    assert store.get("a") is None


def test_bytes_are_stored_natively(store: EtcdKVStore) -> None:
    data = bytes(range(256))
    store.set_bytes("blob", data)
    assert store.get_bytes("blob") == data
    full = f"{store.namespace}/{store.component}/blob".encode()
    assert store.client.range(full).kvs[0].value == data  # no base64 on etcd


def test_key_layout_and_component_override(store: EtcdKVStore) -> None:
    store.set("k", "1")
    store.set("k", "2", component="other")
    assert store.get("k") == b"1"
    assert store.get("k", component="other") == b"2"
    ns = store.namespace.encode()
    keys = store.client.range(ns + b"/", prefix_range_end(ns + b"/"), keys_only=True).kvs
    assert sorted(kv.key for kv in keys) == [ns + b"/default/k", ns + b"/other/k"]


def test_invalid_input_is_rejected_before_sending(store: EtcdKVStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.set("../escape", "1")
    with pytest.raises(InvalidValueError):
        store.set("k", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        store.set_bytes("k", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.wait_for_key("k", timeout=-1)
    with pytest.raises(ValueError):
        store.wait_for_keys("k/*", expected_count=0)
    assert store.coordination_keys == frozenset()


def test_oversize_value_rejected_and_nothing_stored(store: EtcdKVStore) -> None:
    store.set("big", "small")
    with pytest.raises(InvalidValueError, match=r"1572864") as info:
        store.set_bytes("big", b"x" * (1572864 + 1))
    assert str(len(b"x" * (1572864 + 1))) in str(info.value)
    with pytest.raises(InvalidValueError):
        store.set("big", "y" * 1572864)
    assert store.get("big") == b"small"
    # A value comfortably below the limit goes through.
    store.set_bytes("big", b"z" * 1_000_000)
    assert store.get_bytes("big") == b"z" * 1_000_000


def test_from_env_opens_an_etcd_store(etcd_auth: EtcdCluster, namespace: str) -> None:
    env = {
        "ETHA_KV_NAMESPACE": namespace,
        "ETHA_KV_ENDPOINTS": ",".join(etcd_auth.urls),
        "ETHA_KV_USERNAME": ROOT_USER,
        "ETHA_KV_PASSWORD": etcd_auth.root_password,
    }
    with from_env(env) as s:
        assert isinstance(s, EtcdKVStore)
        s.set("k", "v")
        assert s.get("k") == b"v"
        client = s.client
    # The store held the process-wide shared client and released it on close.
    assert client.closed


# -- waits ----------------------------------------------------------------------------


def test_wait_for_key_returns_existing_value(store: EtcdKVStore) -> None:
    store.set("k", "v")
    assert store.wait_for_key("k", timeout=5) == b"v"
    assert store.wait_for_key("k", timeout=0) == b"v"


def test_wait_for_key_wakes_on_a_later_set(store: EtcdKVStore, etcd_auth: EtcdCluster) -> None:
    with open_store(etcd_auth, store.namespace) as writer:
        later(0.2, writer.set, "k", "late")
        assert store.wait_for_key("k", timeout=30) == b"late"


def test_wait_for_key_times_out_with_a_timeout_error(store: EtcdKVStore) -> None:
    with pytest.raises(TimeoutError, match="never") as info:
        store.wait_for_key("never", timeout=0.3)
    assert isinstance(info.value, KVTimeoutError)
    with pytest.raises(KVTimeoutError, match="does not exist"):
        store.wait_for_key("never", timeout=0)


def test_wait_for_value_ignores_other_values_and_deletes(
    store: EtcdKVStore, etcd_auth: EtcdCluster
) -> None:
    store.set("state", "starting")

    def sequence(writer: EtcdKVStore) -> None:
        writer.set("state", "running")
        writer.delete("state")
        writer.set("state", "done")

    writer = open_store(etcd_auth, store.namespace)
    try:
        later(0.2, sequence, writer)
        assert store.wait_for_value("state", "done", timeout=30) == b"done"
    finally:
        writer.close(cleanup=False)  # "state" must survive for the next check
    with pytest.raises(KVTimeoutError, match="last value b'done'"):
        store.wait_for_value("state", "other", timeout=0.2)


def test_wait_for_keys_counts_matching_keys_with_the_value(
    store: EtcdKVStore, etcd_auth: EtcdCluster
) -> None:
    store.set("job/rank:0/ready", "1")
    store.set("job/rank:1/ready", "0")  # wrong value: not counted
    store.set("job/rank:2/notready", "1")  # does not match the pattern
    store.set("jobx/rank:3/ready", "1")  # outside the pattern's literal prefix

    def finish(writer: EtcdKVStore) -> None:
        writer.set("job/rank:1/ready", "1")
        writer.set("job/sub/rank:4/ready", "1")  # '*' spans '/'

    with open_store(etcd_auth, store.namespace) as writer:
        later(0.2, finish, writer)
        got = store.wait_for_keys("job/rank:*/ready", 2, timeout=30, candidate_keys=["ignored"])
        assert got == ["job/rank:0/ready", "job/rank:1/ready"]
        got = store.wait_for_keys("job/*/ready", 3, timeout=30)
        assert got == ["job/rank:0/ready", "job/rank:1/ready", "job/sub/rank:4/ready"]


def test_wait_for_keys_forgets_deleted_and_changed_keys(store: EtcdKVStore) -> None:
    store.set("r/0", "1")
    store.set("r/1", "1")
    store.delete("r/1")
    store.set("r/0", "2")
    with pytest.raises(KVTimeoutError, match="0 of 1 keys matched"):
        store.wait_for_keys("r/*", 1, timeout=0.3)


def test_wait_for_keys_timeout_says_what_was_seen(store: EtcdKVStore) -> None:
    for i in range(5):
        store.set(f"b/rank:{i}/ready", "1")
    with pytest.raises(KVTimeoutError, match="5 of 8 keys matched"):
        store.wait_for_keys("b/rank:*/ready", 8, timeout=0.3)


def test_barrier_of_many_threads(etcd_auth: EtcdCluster, namespace: str) -> None:
    n = 16
    results: list[list[str]] = []
    errors: list[BaseException] = []
    stores = [open_store(etcd_auth, namespace) for _ in range(n)]

    def rank(i: int) -> None:
        try:
            stores[i].set(f"barrier/rank:{i}/ready", "1")
            results.append(stores[i].wait_for_keys("barrier/rank:*/ready", n, timeout=60))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for s in stores:
        s.close()
    assert errors == []
    expected = sorted(f"barrier/rank:{i}/ready" for i in range(n))
    assert results == [expected] * n


def test_compaction_between_read_and_watch(store: EtcdKVStore) -> None:
    """The watch starts at a compacted revision: the wait re-reads and still completes."""
    store.set("c/0", "1")
    hub = store.client.watch_hub
    real_watch = hub.watch
    calls: list[int] = []

    def watch_after_compaction(
        key: bytes, range_end: bytes | None, start: int, apply: object = None
    ) -> object:
        calls.append(start)
        if len(calls) == 1:
            store.set("c/1", "1")
            store.set("c/2", "1")
            revision = store.client.put(b"unrelated-" + uuid.uuid4().hex.encode(), b"x")
            store.client.call(
                "KV",
                "Compact",
                etcdrpc.CompactionRequest(revision=revision.header.revision, physical=True),
            )
        return real_watch(key, range_end, start, apply)  # type: ignore[arg-type]

    hub.watch = watch_after_compaction  # type: ignore[method-assign]
    try:
        assert store.wait_for_keys("c/*", 3, timeout=30) == ["c/0", "c/1", "c/2"]
    finally:
        del hub.watch
    assert len(calls) == 1  # the re-read found everything; no second watch needed


# -- auth -----------------------------------------------------------------------------


@pytest.fixture
def limited_user(etcd_auth: EtcdCluster) -> Iterator[tuple[str, str, str]]:
    """A user granted read-write on one namespace: (user, allowed ns, forbidden ns)."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    allowed, forbidden = f"ok-{uuid.uuid4().hex[:8]}", f"no-{uuid.uuid4().hex[:8]}"
    with root_client(etcd_auth) as root:
        grant_prefix_user(root, user, "pw", f"{allowed}/".encode())
    yield user, allowed, forbidden


def test_user_is_refused_outside_its_namespace(
    etcd_auth: EtcdCluster, limited_user: tuple[str, str, str]
) -> None:
    user, allowed, forbidden = limited_user
    with open_store(etcd_auth, forbidden) as root_store:
        root_store.set("k", "root")
        with open_store(etcd_auth, allowed, username=user, password="pw") as mine:
            mine.set("k", "mine")
            assert mine.wait_for_key("k", timeout=5) == b"mine"
        with open_store(etcd_auth, forbidden, username=user, password="pw") as other:
            with pytest.raises(PermissionDeniedError):
                other.get("k")
            with pytest.raises(PermissionDeniedError):
                other.exists("k")
            with pytest.raises(PermissionDeniedError):
                other.set("k", "evil")
            with pytest.raises(PermissionDeniedError):
                other.delete("k")
            started = time.monotonic()
            with pytest.raises(PermissionDeniedError):
                other.wait_for_key("k", timeout=60)
            with pytest.raises(PermissionDeniedError):
                other.wait_for_keys("*", 1, timeout=60)
            assert time.monotonic() - started < 30  # refused, not waited out
        assert root_store.get("k") == b"root"


def test_wait_after_token_expiry_on_an_idle_stream(tmp_path: Path, namespace: str) -> None:
    """Both the unary calls and the (idle) watch stream survive the token's expiry."""
    with etcd_cluster(tmp_path / "ttl", auth=True, auth_token_ttl=2) as cluster:
        with root_client(cluster) as root:
            grant_prefix_user(root, "worker", "pw", f"{namespace}/".encode())
        with open_store(cluster, namespace, username="worker", password="pw") as s:
            s.set("a", "1")
            later(0.1, s.set, "b", "1")
            assert s.wait_for_key("b", timeout=30) == b"1"  # opens the watch stream
            time.sleep(3.5)  # idle past the TTL: both tokens are now invalid
            assert s.get("a") == b"1"
            time.sleep(3.5)
            later(0.3, s.set, "c", "1")
            assert s.wait_for_key("c", timeout=30) == b"1"


# -- TLS ------------------------------------------------------------------------------


tls_files = tls_files_fixture("tls-backend")
etcd_mtls_auth = tls_cluster_fixture("etcd-mtls-backend", client_cert_auth=True)


def test_store_over_mtls_with_cert_user(
    etcd_mtls_auth: EtcdCluster, tls_files: TLSFiles, namespace: str
) -> None:
    with EtcdKVStore(
        namespace, endpoints=etcd_mtls_auth.urls, ca_pem=tls_files.ca_cert.read_text(),
        cert_file=str(tls_files.client_cert), key_file=str(tls_files.client_key),
    ) as s:  # fmt: skip
        assert isinstance(s, EtcdKVStore)
        assert s.client.tls
        later(0.2, s.set, "k", "v")
        assert s.wait_for_key("k", timeout=30) == b"v"


def test_store_over_tls_with_password(
    etcd_mtls_auth: EtcdCluster, tls_files: TLSFiles, namespace: str
) -> None:
    with EtcdKVStore(
        namespace, endpoints=etcd_mtls_auth.endpoints, tls=True,
        ca_file=str(tls_files.ca_cert), cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key), username=ROOT_USER,
        password=etcd_mtls_auth.root_password,
    ) as s:  # fmt: skip
        s.set("k", "v")
        assert s.get("k") == b"v"


# -- sharing and close ----------------------------------------------------------------


def test_stores_share_one_client_and_one_watch_stream(
    etcd_auth: EtcdCluster, namespace: str
) -> None:
    a = open_store(etcd_auth, namespace)
    b = open_store(etcd_auth, namespace, component="other")
    try:
        assert a.client is b.client
        b.set("k", "1", component="default")
        a.wait_for_key("k", timeout=5)
        assert a.client.watch_hub is b.client.watch_hub
    finally:
        a.close()
    assert not b.client.closed
    b.set("still", "works")
    b.close()
    assert b.client.closed


def test_close_cleans_up_exactly_the_tracked_keys(etcd_auth: EtcdCluster, namespace: str) -> None:
    before = set(threading.enumerate())
    other = open_store(etcd_auth, namespace)
    other.set("theirs", "1")
    s = open_store(etcd_auth, namespace)
    s.set("mine/a", "1")
    s.set_bytes("mine/b", b"\x00")
    s.set("mine/c", "1", component="comp2")
    s.set("gone", "1")
    s.delete("gone")
    later(0.1, other.set, "signal", "1")
    s.wait_for_key("signal", timeout=30)  # starts the watch thread
    assert s.coordination_keys == {
        f"{namespace}/default/mine/a",
        f"{namespace}/default/mine/b",
        f"{namespace}/comp2/mine/c",
    }
    s.close(cleanup=True)
    s.close(cleanup=True)  # idempotent
    for call in (
        lambda: s.get("x"),
        lambda: s.set("x", "1"),
        lambda: s.wait_for_key("x", timeout=1),
    ):
        with pytest.raises(StoreClosedError):
            call()
    assert other.get("mine/a") is None
    assert other.get("mine/b") is None
    assert other.get("mine/c", component="comp2") is None
    assert other.get("theirs") == b"1"
    assert other.get("signal") == b"1"
    other.close(cleanup=False)
    assert wait_threads_gone(before) == []
    with root_client(etcd_auth) as root:
        ns = f"{namespace}/".encode()
        left = root.range(ns, prefix_range_end(ns), keys_only=True).kvs
        assert sorted(kv.key for kv in left) == sorted(
            [f"{namespace}/default/theirs".encode(), f"{namespace}/default/signal".encode()]
        )


def test_close_without_cleanup_keeps_keys(etcd_auth: EtcdCluster, namespace: str) -> None:
    s = open_store(etcd_auth, namespace)
    s.set("k", "1")
    s.close(cleanup=False)
    with open_store(etcd_auth, namespace) as other:
        assert other.get("k") == b"1"


def test_cleanup_of_many_keys_uses_several_transactions(
    etcd_auth: EtcdCluster, namespace: str
) -> None:
    s = open_store(etcd_auth, namespace)
    for i in range(300):
        s.set(f"k/{i}", "1")
    s.close()
    with root_client(etcd_auth) as root:
        ns = f"{namespace}/".encode()
        assert root.range(ns, prefix_range_end(ns), count_only=True).count == 0


def test_close_wakes_a_waiter_in_another_thread(etcd_auth: EtcdCluster, namespace: str) -> None:
    client = EtcdClient.from_config(
        EtcdConfig(
            namespace=namespace,
            endpoints=parse_endpoints(",".join(etcd_auth.endpoints))[0],
            username=ROOT_USER,
            password=etcd_auth.root_password,
        )
    )
    s = EtcdKVStore(namespace, endpoints="unused:1", client=client)
    waiter = Waiter(lambda: s.wait_for_key("never", timeout=60))
    waiter.start()
    time.sleep(0.5)
    s.close()
    assert not client.closed  # a client passed in is not the store's to close
    client.close()
    waiter.join(30)
    assert not waiter.is_alive()
    assert isinstance(waiter.error, StoreClosedError), waiter.error


# -- pattern matching of wait_for_keys ---------------------------------------------------

_PATTERN_TEXT = st.text(alphabet="ab/:*", min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(
    pattern=_PATTERN_TEXT,
    tail=st.binary(max_size=8) | st.text(alphabet="ab/:", max_size=8).map(str.encode),
)
def test_the_byte_level_matcher_agrees_with_the_documented_pattern(
    pattern: str, tail: bytes
) -> None:
    # _PatternView tests one-star and star-less patterns on raw bytes, without the
    # regex; it must match exactly the keys the regex matches, whatever bytes a foreign
    # writer put under the prefix (etcd returns only keys starting with the prefix).
    comp = b"ns/default/"
    prefix = comp + _keys.literal_prefix(pattern).encode()
    regex = _keys.compile_pattern(pattern)
    view = _PatternView(prefix, len(comp), regex, 1, b"1", pattern)
    key = prefix + tail
    expected = regex.fullmatch(key[len(comp) :].decode("utf-8", "replace")) is not None
    assert view.matches(key) == expected
