"""Server-side waits (``Coordination.Wait``) through a real gateway process on real etcd.

The library's waits must give the same results and errors through the gateway as with
watches; every test checks the gateway really answered (its ``waits_total`` metric),
so a silent fall-back to watches would fail them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from pyetcd import etcdrpc

from etha.kvstore import gateway_api as api
from etha.kvstore.errors import KVTimeoutError, PermissionDeniedError, QuotaExceededError
from etha.kvstore.etcd import EtcdKVStore, coordination_supported
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from tests.gateway.conftest import TenantCreds, open_store, start_gateway
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.etcd_users import root_client
from tests.support.gateway import GatewayProcess, write_token_keys
from tests.support.tenants import root_gateway
from tests.support.threads import Waiter


def waits_answered(gateway: GatewayProcess, outcome: str = "ok") -> float:
    """``etha_gateway_waits_total{outcome=...}`` of one gateway replica."""
    pattern = re.compile(rf'^etha_gateway_waits_total\{{outcome="{outcome}"\}} (\S+)$', re.M)
    match = pattern.search(gateway.metrics())
    return float(match.group(1)) if match else 0.0


def started(fn: Callable[[], object]) -> Waiter:
    waiter = Waiter(fn)
    waiter.start()
    return waiter


def finished(waiter: Waiter, timeout: float = 20.0) -> object:
    waiter.join(timeout)
    assert not waiter.is_alive(), "the wait did not return"
    if waiter.error is not None:
        raise waiter.error
    return waiter.result


@pytest.fixture
def creds(tenant: Callable[..., TenantCreds]) -> TenantCreds:
    return tenant()


@pytest.fixture
def store(gateway: GatewayProcess, creds: TenantCreds) -> EtcdKVStore:
    return open_store([gateway.endpoint], creds)


def test_key_and_value_waits_are_answered_by_the_gateway(
    gateway: GatewayProcess, store: EtcdKVStore, creds: TenantCreds
) -> None:
    before = waits_answered(gateway)
    setter = open_store([gateway.endpoint], creds, component="default")
    key_wait = started(lambda: store.wait_for_key("k/exists", timeout=15))
    value_wait = started(lambda: store.wait_for_value("k/value", "ready", timeout=15))
    time.sleep(0.3)
    assert key_wait.is_alive() and value_wait.is_alive()
    setter.set("k/exists", "anything")
    setter.set("k/value", "not-yet")
    time.sleep(0.2)
    assert value_wait.is_alive(), "a value filter must not accept another value"
    setter.set("k/value", "ready")
    assert finished(key_wait) == b"anything"
    assert finished(value_wait) == b"ready"
    assert coordination_supported(store.client)
    assert waits_answered(gateway) >= before + 2


def test_keys_that_exist_before_the_call_count(gateway: GatewayProcess, store: EtcdKVStore) -> None:
    """Keys written before the wait (the direct path's "read at R") are seen at once."""
    for i in range(5):
        store.set(f"b/0/rank:{i}/ready", "1")
    store.set("b/0/rank:9/other", "1")  # matches the prefix, not the pattern
    before = waits_answered(gateway)
    got = store.wait_for_keys("b/0/rank:*/ready", 5, timeout=10)
    assert got == [f"b/0/rank:{i}/ready" for i in range(5)]
    assert waits_answered(gateway) == before + 1


def test_barrier_returns_every_matched_key_sorted(
    gateway: GatewayProcess, creds: TenantCreds
) -> None:
    n = 12
    stores = [open_store([gateway.endpoint], creds) for _ in range(3)]
    before = waits_answered(gateway)
    waiters = [
        started(lambda s=s: s.wait_for_keys("bar/*/x/*/ready", n, value="go", timeout=20))
        for s in stores
    ]
    time.sleep(0.3)
    for i in range(n):
        stores[i % 3].set(f"bar/r{i}/x/{i % 2}/ready", "go")
        stores[0].set(f"bar/r{i}/y/ready", "go")  # second star part missing: no match
    expected = sorted(f"bar/r{i}/x/{i % 2}/ready" for i in range(n))
    for waiter in waiters:
        assert finished(waiter) == expected
    assert waits_answered(gateway) >= before + 3


def test_a_wait_is_never_answered_from_a_state_older_than_the_call(
    gateway: GatewayProcess, store: EtcdKVStore
) -> None:
    """Delete a key and wait for it at once: the gateway's mirror may not have seen the
    delete yet, and must not answer from before it."""
    keeper = started(lambda: store.wait_for_key("fresh/never", timeout=30))  # keeps the watch
    try:
        for i in range(15):
            store.set(f"fresh/k{i}", "v")
            assert store.wait_for_key(f"fresh/k{i}", timeout=5) == b"v"
            store.delete(f"fresh/k{i}")
            with pytest.raises(KVTimeoutError):
                store.wait_for_key(f"fresh/k{i}", timeout=0.3)
            store.set(f"fresh/k{i}", "w")
            assert store.wait_for_value(f"fresh/k{i}", "w", timeout=5) == b"w"
    finally:
        store.set("fresh/never", "done")
        finished(keeper)


def test_timeout_names_what_was_seen(gateway: GatewayProcess, store: EtcdKVStore) -> None:
    store.set("t/rank:0/ready", "1")
    store.set("t/rank:1/ready", "1")
    before = waits_answered(gateway, "timeout")
    started_at = time.monotonic()
    with pytest.raises(KVTimeoutError) as info:
        store.wait_for_keys("t/rank:*/ready", 3, timeout=1.0)
    elapsed = time.monotonic() - started_at
    assert isinstance(info.value, TimeoutError)
    assert 1.0 <= elapsed < 10, elapsed  # (2 shared cores: generous upper bound)
    assert "2 of 3 keys matched" in str(info.value), info.value
    assert waits_answered(gateway, "timeout") == before + 1


def test_compaction_during_a_wait(
    gateway: GatewayProcess, store: EtcdKVStore, root: EtcdClient
) -> None:
    waiter = started(lambda: store.wait_for_keys("c/*/ready", 4, timeout=20))
    time.sleep(0.3)
    for i in range(2):
        store.set(f"c/{i}/ready", "1")
    revision = root.range(b"x").header.revision
    root.call("KV", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True))
    for i in range(2, 4):
        store.set(f"c/{i}/ready", "1")
    assert finished(waiter) == [f"c/{i}/ready" for i in range(4)]
    # and a new wait after the compaction still sees everything
    assert store.wait_for_keys("c/*/ready", 4, timeout=5) == [f"c/{i}/ready" for i in range(4)]


def raw_wait(endpoint: str, creds: TenantCreds, request: object, timeout: float = 5) -> object:
    """One Coordination.Wait with the tenant's token, straight on a channel."""
    with grpc.insecure_channel(endpoint) as channel:
        login = etcdrpc.AuthStub(channel).Authenticate(
            etcdrpc.AuthenticateRequest(name=creds.username, password=creds.secret), timeout=10
        )
        token = (("token", login.token),)
        return api.wait_stub(channel)(request, timeout=timeout, metadata=token)


def test_a_pattern_outside_the_tenant_is_refused(
    gateway: GatewayProcess, tenant: Callable[..., TenantCreds]
) -> None:
    mine, other = tenant(), tenant()
    victim = open_store([gateway.endpoint], other)
    victim.set("secret/rank:0/ready", "1")
    attacks = [
        # another tenant's prefix
        (f"{other.prefix}/", f"{other.prefix}/*"),
        # a range that starts inside and ends past the tenant (the prefix range of "t-")
        (f"{mine.prefix}"[:2].encode().decode(), f"{mine.prefix}"[:2] + "*"),
        # the registry
        ("!etha/", "!etha/*"),
    ]
    for key, pattern in attacks:
        prefix = key.encode()
        request = api.WaitRequest(
            mode=api.MODE_KEYS, key=prefix, range_end=prefix_range_end(prefix),
            pattern=pattern.encode(), count=1,
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            raw_wait(gateway.endpoint, mine, request)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED, (key, info.value)
        assert info.value.details() == "etcdserver: permission denied"
    # a pattern that does not start with its range is malformed, not a way out
    inside = f"{mine.prefix}/a".encode()
    request = api.WaitRequest(
        mode=api.MODE_KEYS, key=inside, range_end=prefix_range_end(inside),
        pattern=f"{other.prefix}/*".encode(), count=1,
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        raw_wait(gateway.endpoint, mine, request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # and through the library: the same PermissionDeniedError as etcd gives
    store = open_store([gateway.endpoint], mine)
    with pytest.raises(PermissionDeniedError):
        store.client.call(
            "Coordination", "Wait",
            api.WaitRequest(mode=api.MODE_KEY, key=f"{other.prefix}/secret".encode()),
            timeout=2,
        )  # fmt: skip


def test_waiters_count_against_the_watches_quota(
    gateway: GatewayProcess, tenant: Callable[..., TenantCreds]
) -> None:
    creds = tenant(quotas={"watches": 2})
    store = open_store([gateway.endpoint], creds)
    holders = [started(lambda i=i: store.wait_for_key(f"q/{i}", timeout=20)) for i in range(2)]
    time.sleep(0.5)
    with pytest.raises(QuotaExceededError) as info:
        store.wait_for_key("q/third", timeout=5)
    assert info.value.quota == "watches"
    for i in range(2):
        store.set(f"q/{i}", "x")
    for holder in holders:
        assert finished(holder) == b"x"
    assert store.wait_for_key("q/0", timeout=5) == b"x"  # the slots were given back


def test_plain_etcd_falls_back_to_watches_once(
    etcd_auth: EtcdCluster, root: EtcdClient, namespace: str
) -> None:
    client = root_client(etcd_auth)
    store = EtcdKVStore(namespace, endpoints=(), client=client)
    try:
        assert coordination_supported(client)
        store.set("a/rank:0/ready", "1")
        assert store.wait_for_keys("a/rank:*/ready", 1, timeout=5) == ["a/rank:0/ready"]
        assert not coordination_supported(client)  # UNIMPLEMENTED, remembered
        with pytest.raises(KVTimeoutError):
            store.wait_for_keys("a/rank:*/ready", 2, timeout=0.3)
    finally:
        store.close()
        client.close()


@pytest.fixture
def two_replicas(etcd_auth: EtcdCluster, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    keys = write_token_keys(tmp_path / "shared.keys")
    replicas: list[GatewayProcess] = []
    try:
        for name in ("gw-a", "gw-b"):
            replicas.append(start_gateway(etcd_auth, tmp_path, token_key_file=keys, name=name))
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def test_waiters_survive_a_replica_sigkill(
    two_replicas: list[GatewayProcess], creds: TenantCreds
) -> None:
    """100 waiters on replica A; A is SIGKILLed; every waiter completes via B."""
    a, b = two_replicas
    store = open_store([a.endpoint, b.endpoint], creds, timeout=30)
    store.set("probe", "1")
    n = 100
    waiters = [
        started(lambda i=i: store.wait_for_keys(f"s/{i % 4}/rank:*/ready", 3, timeout=60))
        for i in range(n)
    ]
    deadline = time.monotonic() + 20
    while waits_pending(a) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert waits_pending(a) == n, "the waiters should all be on replica A"
    a.kill()
    writer = open_store([b.endpoint], creds)
    for group in range(4):
        for rank in range(3):
            writer.set(f"s/{group}/rank:{rank}/ready", "1")
    for i, waiter in enumerate(waiters):
        assert finished(waiter, 60) == [f"s/{i % 4}/rank:{r}/ready" for r in range(3)]
    assert waits_answered(b) >= n


def waits_pending(gateway: GatewayProcess) -> float:
    total = 0.0
    for match in re.finditer(
        r"^etha_gateway_waits_pending\{[^}]*\} (\S+)$", gateway.metrics(), re.M
    ):
        total += float(match.group(1))
    return total


def test_many_waiters_one_condition_share_one_answer(
    gateway: GatewayProcess, creds: TenantCreds
) -> None:
    """40 threads of one barrier: all released with the same keys."""
    n = 40
    store = open_store([gateway.endpoint], creds)
    results: list[object] = []
    lock = threading.Lock()

    def rank(i: int) -> None:
        store.set(f"many/rank:{i}/ready", "1")
        got = store.wait_for_keys("many/rank:*/ready", n, timeout=20)
        with lock:
            results.append(got)

    threads = [started(lambda i=i: rank(i)) for i in range(n)]
    for thread in threads:
        finished(thread)
    expected = sorted(f"many/rank:{i}/ready" for i in range(n))
    assert results == [expected] * n


def etcd_watch_requests(cluster: EtcdCluster) -> float:
    """Messages etcd has received on Watch streams (creates, cancels, progress requests)."""
    import urllib.request

    text = urllib.request.urlopen(f"{cluster.urls[0]}/metrics", timeout=10).read().decode()  # noqa: S310
    pattern = re.compile(r"^grpc_server_msg_received_total\{([^}]*)\} (\S+)$", re.M)
    return sum(
        float(m.group(2)) for m in pattern.finditer(text) if 'grpc_method="Watch"' in m.group(1)
    )


def test_a_replica_with_no_waiters_sends_etcd_nothing(
    gateway: GatewayProcess, store: EtcdKVStore, etcd_auth: EtcdCluster
) -> None:
    """Freshness rounds stop when no waiter needs them (no progress-request ping-pong)."""
    for i in range(3):
        store.set(f"idle/{i}", "1")
        store.wait_for_key(f"idle/{i}", timeout=5)
    time.sleep(0.5)
    before = etcd_watch_requests(etcd_auth)
    time.sleep(1.5)
    assert etcd_watch_requests(etcd_auth) == before


def test_a_revoked_tenant_s_waits_end_at_once(
    gateway: GatewayProcess, tenant: Callable[..., TenantCreds], root: EtcdClient
) -> None:
    from tests.support.gateway import revoke_tenant

    creds = tenant()
    store = open_store([gateway.endpoint], creds)
    store.set("r/warm", "1")
    waiter = started(lambda: store.wait_for_key("r/never", timeout=30))
    time.sleep(0.5)
    assert waiter.is_alive()
    revoke_tenant(root, creds.username)
    waiter.join(10)
    assert not waiter.is_alive(), "a revoked tenant's wait must not run on to its timeout"
    assert isinstance(waiter.error, PermissionDeniedError), waiter.error
    store.close(cleanup=False)  # the tenant cannot delete its keys any more


def test_same_results_and_errors_as_the_watch_path(
    gateway: GatewayProcess, creds: TenantCreds, etcd_auth: EtcdCluster
) -> None:
    """The same calls on the same keys: through the gateway, and with watches on etcd."""
    via_gateway = open_store([gateway.endpoint], creds)
    client = root_client(etcd_auth)
    direct = EtcdKVStore(creds.prefix, "default", endpoints=(), client=client)
    try:
        for i in range(4):
            via_gateway.set(f"same/a{i}/x/b{i % 2}/ok", "yes" if i != 2 else "no")
        via_gateway.set("same/key", "v1")
        calls: list[Callable[[EtcdKVStore], object]] = [
            lambda s: s.wait_for_key("same/key", timeout=5),
            lambda s: s.wait_for_value("same/key", "v1", timeout=5),
            lambda s: s.wait_for_keys("same/*/x/*/ok", 3, value="yes", timeout=5),
            lambda s: s.wait_for_keys("same/a*", 2, value="yes", timeout=5),
        ]
        for call in calls:
            assert call(via_gateway) == call(direct)
        assert coordination_supported(via_gateway.client)
        assert not coordination_supported(client)  # plain etcd: watches
        for store in (via_gateway, direct):
            with pytest.raises(KVTimeoutError) as info:
                store.wait_for_keys("same/*/x/*/ok", 4, value="yes", timeout=0.5)
            assert "4 keys matching" in str(info.value)
            assert "3 of 4 keys matched" in str(info.value)
            with pytest.raises(KVTimeoutError):
                store.wait_for_value("same/key", "v2", timeout=0.3)
    finally:
        direct.close(cleanup=False)
        client.close()


def test_compaction_while_the_gateway_was_cut_off_reloads_its_view(tmp_path: Path) -> None:
    """The gateway's watch cannot resume (its revision was compacted while etcd restarted
    and the gateway was stopped): it reads the range again, and the pending wait ends
    with the keys written meanwhile."""
    import signal

    from tests.support.gateway import register_tenant

    with (
        etcd_cluster(tmp_path / "etcd", auth=True) as cluster,
        root_client(cluster) as root,
        root_gateway(cluster, tmp_path / "gw") as gateway,
    ):
        username, secret, prefix = register_tenant(root)
        creds = TenantCreds(username, secret, prefix)
        store = open_store([gateway.endpoint], creds, timeout=30)
        store.set("c/0/ready", "1")
        waiter = started(lambda: store.wait_for_keys("c/*/ready", 3, timeout=60))
        deadline = time.monotonic() + 20
        while waits_pending(gateway) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waits_pending(gateway) == 1, "the wait should be on the gateway"
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGSTOP)
        try:
            for i in (1, 2):
                root.put(f"{prefix}/default/c/{i}/ready".encode(), b"1")
            for i in range(20):
                root.put(f"{prefix}/default/noise".encode(), str(i).encode())
            revision = root.range(b"x").header.revision
            root.call("KV", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True))
            member = cluster.nodes[0]
            member.stop()  # the gateway's stream breaks; its token is gone with etcd's memory
            member.start()
            cluster.wait_healthy()
        finally:
            gateway.process.send_signal(signal.SIGCONT)
        assert finished(waiter, 60) == [f"c/{i}/ready" for i in range(3)]
        assert "compacted; reloading" in gateway.log_tail(200), gateway.log_tail(40)
        for creds_store in creds.opened:
            creds_store.close(cleanup=False)
