"""EtcdClient and WatchHub against real etcd: auth, TLS, failover, watches."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyetcd import etcdrpc

from etha.kvstore.config import EtcdConfig, parse_endpoints
from etha.kvstore.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidValueError,
    KVStoreError,
    PermissionDeniedError,
    StoreClosedError,
    UnavailableError,
)
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from etha.kvstore.etcd_watch import DELETE, PUT, WatchCompacted
from etha.kvstore.etcdv3.transport import is_conditional as _is_conditional
from etha.kvstore.etcdv3.transport import never_sent
from tests.support.etcd_server import ROOT_USER, EtcdCluster, etcd_cluster
from tests.support.etcd_users import grant_prefix_user, root_client
from tests.support.ports import free_port
from tests.support.threads import wait_threads_gone
from tests.support.tls import TLSFiles
from tests.support.tls_clusters import tls_cluster_fixture, tls_files_fixture

pytestmark = pytest.mark.timeout(120)


def unique(prefix: str = "c") -> bytes:
    return f"{prefix}-{uuid.uuid4().hex[:10]}/".encode()


@pytest.fixture
def root(etcd_auth: EtcdCluster) -> Iterator[EtcdClient]:
    client = root_client(etcd_auth)
    try:
        yield client
    finally:
        client.close()


# -- prefix_range_end -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"a/", b"a0"),
        (b"abc", b"abd"),
        (b"a\xff", b"b"),
        (b"a\xff\xff", b"b"),
        (b"\xff", b"\0"),
        (b"", b"\0"),
    ],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


def test_prefix_range_end_selects_exactly_the_prefix(etcd_plain: EtcdCluster) -> None:
    base = unique()
    with EtcdClient(etcd_plain.endpoints) as client:
        for key in (base + b"x", base + b"y/z", base[:-1] + b"0", base[:-1] + b".")[:4]:
            client.put(key, b"1")
        response = client.range(base, prefix_range_end(base), keys_only=True)
        assert sorted(kv.key for kv in response.kvs) == [base + b"x", base + b"y/z"]


# -- call() and the wrappers ----------------------------------------------------------


def test_put_range_delete_txn_roundtrip(etcd_plain: EtcdCluster) -> None:
    base = unique()
    with EtcdClient(etcd_plain.endpoints) as client:
        put = client.put(base + b"k", b"\x00\xffbinary")
        got = client.range(base + b"k")
        assert got.kvs[0].value == b"\x00\xffbinary"
        assert got.kvs[0].mod_revision == put.header.revision
        assert client.range(base + b"k", count_only=True).count == 1
        txn = etcdrpc.TxnRequest(
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=base + b"t", value=b"2"))]
        )
        assert client.txn(txn).succeeded
        assert client.delete_range(base, prefix_range_end(base)) == 2
        assert client.delete_range(base + b"k") == 0
        assert client.range(base, prefix_range_end(base)).count == 0


def test_call_rejects_unknown_service_and_method(etcd_plain: EtcdCluster) -> None:
    with EtcdClient(etcd_plain.endpoints) as client:
        with pytest.raises(InvalidArgumentError, match="Watch"):
            client.call("Watch", "Watch", etcdrpc.WatchRequest())
        with pytest.raises(InvalidArgumentError, match="NoSuchMethod"):
            client.call("KV", "NoSuchMethod", etcdrpc.RangeRequest(key=b"x"))


def test_oversize_request_rejected_before_sending(etcd_plain: EtcdCluster) -> None:
    key = unique() + b"big"
    with EtcdClient(etcd_plain.endpoints) as client:
        with pytest.raises(InvalidValueError, match="1572864"):
            client.put(key, b"x" * 1572864)
        big_txn = etcdrpc.TxnRequest(
            success=[
                etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=b"y" * 800_000))
                for _ in range(2)
            ]
        )
        with pytest.raises(InvalidValueError, match="Txn request is"):
            client.txn(big_txn)
        assert client.range(key).count == 0
        # Just under the limit is accepted by the server too.
        client.put(key, b"x" * (1572864 - 1024))
        assert len(client.range(key).kvs[0].value) == 1572864 - 1024


def test_server_side_size_limit_maps_to_invalid_value(tmp_path: Path) -> None:
    # The server's limit is lower than the client's idea of it: the server refuses.
    with (
        etcd_cluster(tmp_path / "small", extra_args=("--max-request-bytes=100000",)) as cluster,
        EtcdClient(cluster.endpoints) as client,
    ):
        with pytest.raises(InvalidValueError, match="too large"):
            client.put(b"big", b"x" * 200_000)
        assert client.range(b"big").count == 0


def test_root_creates_users_and_roles_through_call(root: EtcdClient) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    grant_prefix_user(root, user, "pw", b"somewhere/")
    users = root.call("Auth", "UserList", etcdrpc.AuthUserListRequest()).users
    assert user in users
    roles = root.call("Auth", "UserGet", etcdrpc.AuthUserGetRequest(name=user)).roles
    assert roles == [f"{user}-role"]


def test_prefix_user_is_refused_outside_its_prefix(
    etcd_auth: EtcdCluster, root: EtcdClient
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    allowed, other = unique("a"), unique("b")
    grant_prefix_user(root, user, "pw", allowed)
    root.put(other + b"k", b"secret")
    with EtcdClient(etcd_auth.endpoints, username=user, password="pw") as client:
        client.put(allowed + b"k", b"v")
        assert client.range(allowed + b"k").kvs[0].value == b"v"
        with pytest.raises(PermissionDeniedError, match=user):
            client.range(other + b"k")
        with pytest.raises(PermissionDeniedError):
            client.put(other + b"k", b"mine")
        with pytest.raises(PermissionDeniedError):
            client.delete_range(other + b"k")
    assert root.range(other + b"k").kvs[0].value == b"secret"


def test_wrong_password_is_permission_denied(etcd_auth: EtcdCluster) -> None:
    with EtcdClient(etcd_auth.endpoints, username=ROOT_USER, password="wrong") as client:
        with pytest.raises(PermissionDeniedError, match="authentication failed") as info:
            client.range(b"x")
        assert "wrong" not in str(info.value)


def test_no_credentials_on_auth_cluster_is_refused(etcd_auth: EtcdCluster) -> None:
    with EtcdClient(etcd_auth.endpoints) as client, pytest.raises(KVStoreError):
        client.put(unique() + b"k", b"v")


def test_credentials_on_a_cluster_without_auth_work(etcd_plain: EtcdCluster) -> None:
    key = unique() + b"k"
    with EtcdClient(etcd_plain.endpoints, username="someone", password="pw") as client:
        client.put(key, b"v")
        assert client.range(key).kvs[0].value == b"v"


def test_username_without_password_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="together"):
        EtcdClient(["127.0.0.1:2379"], username="u")
    with pytest.raises(ConfigurationError, match="endpoint"):
        EtcdClient([])


def test_unreachable_endpoint_raises_unavailable_within_timeout() -> None:
    port = free_port()
    with EtcdClient([f"127.0.0.1:{port}"], timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match=str(port)):
            client.range(b"x")
        assert time.monotonic() - started < 10


def test_fails_over_from_a_dead_first_endpoint(etcd_plain: EtcdCluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    key = unique() + b"k"
    with EtcdClient([dead, *etcd_plain.endpoints]) as client:
        client.put(key, b"v")
        assert client.range(key).kvs[0].value == b"v"


def test_token_is_renewed_after_expiry(tmp_path: Path) -> None:
    with (
        etcd_cluster(tmp_path / "ttl", auth=True, auth_token_ttl=2) as cluster,
        root_client(cluster) as client,
    ):
        client.put(b"k", b"1")
        first = client._metadata
        time.sleep(3.5)  # idle past the token's TTL
        client.put(b"k", b"2")
        assert client.range(b"k").kvs[0].value == b"2"
        assert client._metadata != first  # it really logged in again


def test_closed_client_refuses_calls(etcd_plain: EtcdCluster) -> None:
    client = EtcdClient(etcd_plain.endpoints)
    client.put(unique() + b"k", b"v")
    client.close()
    client.close()
    with pytest.raises(StoreClosedError):
        client.range(b"x")
    with pytest.raises(StoreClosedError):
        client.watch_hub.watch(b"x")


def test_shared_is_refcounted(etcd_plain: EtcdCluster) -> None:
    endpoints, _ = parse_endpoints(",".join(etcd_plain.endpoints))
    config = EtcdConfig(namespace="a", endpoints=endpoints)
    other_namespace = EtcdConfig(namespace="b", component="c", endpoints=endpoints)
    first = EtcdClient.shared(config)
    second = EtcdClient.shared(other_namespace)
    assert first is second
    first.release()
    assert not second.closed
    second.put(unique() + b"k", b"v")
    second.release()
    assert second.closed
    third = EtcdClient.shared(config)
    try:
        assert third is not first
    finally:
        third.release()


# -- TLS ------------------------------------------------------------------------------


tls_files = tls_files_fixture("tls")
etcd_tls = tls_cluster_fixture("etcd-tls")
etcd_mtls = tls_cluster_fixture("etcd-mtls", client_cert_auth=True)


def test_tls_with_ca_file_and_password(etcd_tls: EtcdCluster, tls_files: TLSFiles) -> None:
    key = unique() + b"k"
    with EtcdClient(
        etcd_tls.urls, username=ROOT_USER, password=etcd_tls.root_password,
        ca_file=str(tls_files.ca_cert),
    ) as client:  # fmt: skip
        assert client.tls
        client.put(key, b"v")
        assert client.range(key).kvs[0].value == b"v"


def test_tls_with_ca_pem(etcd_tls: EtcdCluster, tls_files: TLSFiles) -> None:
    key = unique() + b"k"
    with EtcdClient(
        etcd_tls.endpoints, tls=True, username=ROOT_USER, password=etcd_tls.root_password,
        ca_pem=tls_files.ca_cert.read_text(),
    ) as client:  # fmt: skip
        client.put(key, b"v")
        assert client.range(key).kvs[0].value == b"v"


def test_plaintext_client_cannot_talk_to_tls_server(etcd_tls: EtcdCluster) -> None:
    with (
        EtcdClient(
            etcd_tls.endpoints, username=ROOT_USER, password=etcd_tls.root_password, timeout=1.0
        ) as client,
        pytest.raises(UnavailableError),
    ):
        client.range(b"x")


def test_mtls_client_cert_maps_to_root_user(etcd_mtls: EtcdCluster, tls_files: TLSFiles) -> None:
    key = unique() + b"k"
    with EtcdClient(
        etcd_mtls.urls, ca_file=str(tls_files.ca_cert), cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    ) as client:  # fmt: skip
        client.put(key, b"v")
        assert client.range(key).kvs[0].value == b"v"
        # Only root may manage users: this proves the CN really mapped to root.
        users = client.call("Auth", "UserList", etcdrpc.AuthUserListRequest()).users
        assert ROOT_USER in users


def test_mtls_without_client_cert_is_refused(etcd_mtls: EtcdCluster, tls_files: TLSFiles) -> None:
    client = EtcdClient(etcd_mtls.urls, ca_file=str(tls_files.ca_cert), timeout=1.0)
    with client, pytest.raises(KVStoreError):
        client.range(b"x")


# -- the watch hub --------------------------------------------------------------------


def test_watch_delivers_events_in_order_on_one_stream(etcd_plain: EtcdCluster) -> None:
    base = unique()
    with EtcdClient(etcd_plain.endpoints) as client:
        start = client.put(base + b"x", b"0").header.revision
        hub = client.watch_hub
        prefix_watch = hub.watch(base, prefix_range_end(base), start + 1)
        key_watch = hub.watch(base + b"a", None, start + 1)
        for i in range(5):
            client.put(base + b"a", str(i).encode())
        client.delete_range(base + b"a")
        seen: list[tuple[int, bytes]] = []
        while len(seen) < 6:
            events = prefix_watch.get(10)
            assert events is not None
            seen += [(e.type, e.kv.value) for e in events]
        assert seen == [(PUT, str(i).encode()) for i in range(5)] + [(DELETE, b"")]
        keyed: list[int] = []
        while len(keyed) < 6:
            events = key_watch.get(10)
            assert events is not None
            keyed += [e.kv.mod_revision for e in events]
        assert keyed == sorted(keyed) and keyed[0] > start
        prefix_watch.cancel()
        key_watch.cancel()
        key_watch.cancel()
        assert hub.connected


def test_cancelled_watch_gets_no_more_events(etcd_plain: EtcdCluster) -> None:
    base = unique()
    with EtcdClient(etcd_plain.endpoints) as client:
        hub = client.watch_hub
        start = client.put(base + b"other", b"0").header.revision
        gone = hub.watch(base + b"k", None, start + 1)
        kept = hub.watch(base + b"k", None, start + 1)
        gone.cancel()
        client.put(base + b"k", b"1")
        assert kept.get(10) is not None
        assert gone.get(0.2) is None


def test_forbidden_watch_fails_promptly(etcd_auth: EtcdCluster, root: EtcdClient) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    allowed, other = unique("a"), unique("b")
    grant_prefix_user(root, user, "pw", allowed)
    with EtcdClient(etcd_auth.endpoints, username=user, password="pw") as client:
        hub = client.watch_hub
        ok = hub.watch(allowed, prefix_range_end(allowed))
        denied = hub.watch(other, prefix_range_end(other))
        with pytest.raises(PermissionDeniedError, match="permission denied"):
            denied.get(20)
        with pytest.raises(PermissionDeniedError):
            denied.get(0)  # the error sticks
        # The other watch on the same stream is unaffected.
        client.put(allowed + b"k", b"v")
        events = ok.get(10)
        assert events is not None and events[0].kv.value == b"v"


def test_watch_from_compacted_revision_signals_compaction(etcd_plain: EtcdCluster) -> None:
    base = unique()
    with EtcdClient(etcd_plain.endpoints) as client:
        old = client.put(base + b"k", b"0").header.revision
        now = client.put(base + b"k", b"1").header.revision
        client.call("KV", "Compact", etcdrpc.CompactionRequest(revision=now, physical=True))
        watcher = client.watch_hub.watch(base + b"k", None, old)
        with pytest.raises(WatchCompacted) as info:
            watcher.get(20)
        assert info.value.compact_revision >= now


def test_watch_survives_a_server_restart(tmp_path: Path) -> None:
    with (
        etcd_cluster(tmp_path / "restart") as cluster,
        EtcdClient(cluster.endpoints, timeout=5) as client,
    ):
        start = client.put(b"k", b"before").header.revision
        watcher = client.watch_hub.watch(b"k", None, start + 1)
        client.put(b"k", b"1")
        first = watcher.get(10)
        assert first is not None and first[0].kv.value == b"1"
        node = cluster.nodes[0]
        node.stop()
        node.start()
        cluster.wait_healthy()
        client.put(b"k", b"2")
        events = watcher.get(20)
        assert events is not None
        assert [e.kv.value for e in events] == [b"2"]  # nothing lost, nothing repeated


def test_close_joins_the_watch_thread(etcd_plain: EtcdCluster) -> None:
    before = set(threading.enumerate())
    client = EtcdClient(etcd_plain.endpoints)
    watcher = client.watch_hub.watch(unique())
    assert any(t.name == "etha-etcd-watch" for t in threading.enumerate())
    client.close()
    with pytest.raises(StoreClosedError):
        watcher.get(5)
    assert wait_threads_gone(before) == []


def test_watch_on_a_stream_whose_token_expired(tmp_path: Path) -> None:
    """etcd checks a new watch with the token the stream was opened with; once that token
    expired it answers "permission denied". The hub must log in again, not fail."""
    with etcd_cluster(tmp_path / "ttl-watch", auth=True, auth_token_ttl=2) as cluster:
        with root_client(cluster) as root:
            grant_prefix_user(root, "worker", "pw", b"w/")
        with EtcdClient(cluster.endpoints, username="worker", password="pw") as client:
            start = client.put(b"w/k", b"0").header.revision
            first = client.watch_hub.watch(b"w/k", None, start + 1)
            client.put(b"w/k", b"1")
            assert first.get(10) is not None  # the stream is open, with the first token
            token = client._metadata
            time.sleep(3.5)  # the stream's token expires while idle
            second = client.watch_hub.watch(b"w/", prefix_range_end(b"w/"), start + 1)
            events = second.get(20)
            assert events is not None and events[0].kv.value == b"1"
            assert client._metadata != token  # it logged in again
            client.put(b"w/k", b"2")
            events = first.get(20)  # the older watch survived the stream's re-opening
            assert events is not None and [e.kv.value for e in events] == [b"2"]


def test_watchers_of_one_range_share_a_server_watch(etcd_plain: EtcdCluster) -> None:
    base = unique()
    with EtcdClient(etcd_plain.endpoints) as client:
        hub = client.watch_hub
        start = client.put(base + b"x", b"0").header.revision
        first = hub.watch(base, prefix_range_end(base), start + 1)
        second = hub.watch(base, prefix_range_end(base), start + 1)
        assert hub.server_watches == 1
        one = client.put(base + b"a", b"1").header.revision
        for watcher in (first, second):
            events = watcher.get(10)
            assert events is not None and [e.kv.value for e in events] == [b"1"]
        # Joining later from a newer revision: only events from that revision on.
        two = client.put(base + b"a", b"2").header.revision
        late = hub.watch(base, prefix_range_end(base), two + 1)
        assert hub.server_watches == 1
        client.put(base + b"a", b"3")
        seen = []
        while len(seen) < 1:
            events = late.get(10)
            assert events is not None
            seen += [e.kv.value for e in events]
        assert seen == [b"3"]
        # A watcher that needs older events than the shared watch has passed gets its own.
        behind = hub.watch(base, prefix_range_end(base), one)
        assert hub.server_watches == 2
        replay: list[bytes] = []
        while len(replay) < 3:
            events = behind.get(10)
            assert events is not None
            replay += [e.kv.value for e in events]
        assert replay == [b"1", b"2", b"3"]
        first.cancel()
        second.cancel()
        client.put(base + b"a", b"4")
        events = late.get(10)
        assert events is not None and [e.kv.value for e in events] == [b"4"]
        late.cancel()
        behind.cancel()
        assert hub.server_watches == 0


def test_shared_watch_with_fold_wakes_each_waiter_once(etcd_plain: EtcdCluster) -> None:
    base = unique()
    with EtcdClient(etcd_plain.endpoints) as client:
        start = client.put(base + b"x", b"0").header.revision
        counts = [0, 0]

        def fold(i: int, need: int) -> object:
            def apply(events: object) -> object:
                counts[i] += len(events)  # type: ignore[arg-type]
                return counts[i] if counts[i] >= need else None

            return apply

        a = client.watch_hub.watch(base, prefix_range_end(base), start + 1, fold(0, 3))
        b = client.watch_hub.watch(base, prefix_range_end(base), start + 1, fold(1, 5))
        for i in range(5):
            client.put(base + str(i).encode(), b"1")
        result = a.get(10)  # events may arrive batched: 3, 4 or 5 at the first result
        assert isinstance(result, int) and 3 <= result <= 5
        assert b.get(10) == 5
        assert a.get(0) is None  # one result only


def test_conditional_txn_is_re_sent_only_when_it_never_reached_a_server(
    etcd_plain: EtcdCluster,
) -> None:
    key = f"cas-{uuid.uuid4().hex}".encode()
    cas = etcdrpc.TxnRequest(
        compare=[
            etcdrpc.Compare(
                key=key,
                result=etcdrpc.Compare.EQUAL,
                target=etcdrpc.Compare.CREATE,
                create_revision=0,
            )
        ],
        success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=b"1"))],
    )
    assert _is_conditional("KV", "Txn", cas)
    assert not _is_conditional("KV", "Txn", etcdrpc.TxnRequest())
    # etcd's answer after a leader failure: the txn may have been applied, never re-send.
    assert not never_sent("etcdserver: request timed out, possibly due to previous leader failure")
    # A dead first endpoint: the request never left, so it goes to the next one.
    dead = f"127.0.0.1:{free_port()}"
    with EtcdClient([dead, *etcd_plain.endpoints], timeout=10) as client:
        assert client.txn(cas).succeeded
        assert client.range(key).kvs[0].value == b"1"


def test_a_deadline_that_passed_inside_etcd_counts_as_a_deadline() -> None:
    """etcd answers UNKNOWN "context deadline exceeded" when a request's deadline passed
    inside the server (a read waiting for a new leader): failed over like a local one."""
    import grpc

    from etha.kvstore.etcdv3.transport import deadline_passed

    assert deadline_passed(grpc.StatusCode.DEADLINE_EXCEEDED, "")
    assert deadline_passed(grpc.StatusCode.UNKNOWN, "context deadline exceeded")
    assert not deadline_passed(grpc.StatusCode.UNKNOWN, "etcdserver: something else")
    assert not deadline_passed(grpc.StatusCode.UNAVAILABLE, "context deadline exceeded")
