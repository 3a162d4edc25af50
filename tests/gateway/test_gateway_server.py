"""The gateway end to end: real etcd with auth, the real gateway process, etha's own client.

Tenants are hostile here: every isolation test tries to break out, with etha's client
and with raw etcd requests (nested Txns, from-key watches, admin calls).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from pyetcd import etcdrpc

from etha.gateway.tenancy import TENANTS_PREFIX
from etha.kvstore import KVTimeoutError, PermissionDeniedError
from etha.kvstore.etcd import note_no_coordination
from etha.kvstore.etcd_client import EtcdClient
from etha.kvstore.etcdv3.watch import Watcher
from tests.gateway.conftest import TenantCreds, open_store, start_gateway, tenant_client
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.gateway import GatewayProcess, register_tenant, revoke_tenant

pytestmark = pytest.mark.timeout(120)

Factory = Callable[..., TenantCreds]


def test_tenant_puts_gets_deletes_and_waits_through_the_gateway(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    creds = tenant()
    store = open_store([gateway.endpoint], creds)
    store.set("rank/0", "ready")
    assert store.get("rank/0") == b"ready"
    # The data really is in etcd, under the tenant's prefix.
    assert root.range(f"{creds.prefix}/default/rank/0".encode()).kvs[0].value == b"ready"
    assert store.delete("rank/0") is True
    assert store.get("rank/0") is None

    other = open_store([gateway.endpoint], creds)
    threading.Timer(0.5, lambda: other.set("late", "v")).start()
    assert store.wait_for_key("late", timeout=20) == b"v"
    threading.Timer(0.3, lambda: [other.set(f"r/{i}", "1") for i in range(3)]).start()
    found = store.wait_for_keys("r/*", expected_count=3, timeout=20)
    assert sorted(found) == ["r/0", "r/1", "r/2"]


def test_txn_and_raw_watch_ids_are_preserved(gateway: GatewayProcess, tenant: Factory) -> None:
    creds = tenant()
    base = f"{creds.prefix}/c/".encode()
    with tenant_client([gateway.endpoint], creds) as client:
        txn = etcdrpc.TxnRequest(
            compare=[
                etcdrpc.Compare(
                    key=base + b"k",
                    target=etcdrpc.Compare.VERSION,
                    result=etcdrpc.Compare.EQUAL,
                    version=0,
                )
            ],
            success=[
                etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=base + b"k", value=b"1"))
            ],
            failure=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=base + b"k"))],
        )
        first = client.txn(txn)
        second = client.txn(txn)
        assert first.succeeded and not second.succeeded
        assert second.responses[0].response_range.kvs[0].value == b"1"
        # Headers do not leak etcd's identity.
        assert first.header.member_id == 0
        # The client's watch hub picks its own ids (field 7); the gateway keeps them.
        revision = client.range(base + b"w").header.revision
        watcher = client.watch_hub.watch(base + b"w", b"", revision + 1)
        try:
            client.put(base + b"w", b"x")
            events = watcher.get(timeout=10)
            assert events is not None and events[0].kv.value == b"x"
        finally:
            watcher.cancel()


def test_wrong_password_and_unknown_user_are_refused(
    gateway: GatewayProcess, tenant: Factory
) -> None:
    creds = tenant()
    bad = TenantCreds(creds.username, creds.secret + "x", creds.prefix)
    with pytest.raises(PermissionDeniedError, match="authentication failed"):
        open_store([gateway.endpoint], bad).set("k", "v")
    nobody = TenantCreds("etha-nobody", creds.secret, creds.prefix)
    with pytest.raises(PermissionDeniedError, match="authentication failed"):
        open_store([gateway.endpoint], nobody).set("k", "v")


def _raw_stub(gateway: GatewayProcess, service: str) -> tuple[grpc.Channel, object]:
    channel = grpc.insecure_channel(gateway.endpoint)
    stub = getattr(etcdrpc, f"{service}Stub")(channel)
    return channel, stub


def _login(gateway: GatewayProcess, creds: TenantCreds) -> tuple[tuple[str, str], ...]:
    channel, auth = _raw_stub(gateway, "Auth")
    with channel:
        response = auth.Authenticate(  # type: ignore[attr-defined]
            etcdrpc.AuthenticateRequest(name=creds.username, password=creds.secret), timeout=10
        )
    return (("token", response.token),)


def _forge(token: str, username: str) -> str:
    """Tenant A's token with B's name in the payload and A's signature."""
    version, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["u"] = username
    raw = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{version}.{raw}.{signature}"


def test_a_token_of_tenant_a_is_refused_for_bs_keys(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    a, b = tenant(), tenant()
    b_store = open_store([gateway.endpoint], b)
    b_store.set("secret", "b-data")
    token_a = _login(gateway, a)
    b_key = f"{b.prefix}/default/secret".encode()
    channel, kv = _raw_stub(gateway, "KV")
    with channel:
        attempts = [
            ("Range", etcdrpc.RangeRequest(key=b_key)),
            ("Range", etcdrpc.RangeRequest(key=f"{a.prefix}/".encode(), range_end=b"\0")),
            ("Range", etcdrpc.RangeRequest(key=f"{a.prefix}/".encode(), range_end=b"\x7f")),
            ("Put", etcdrpc.PutRequest(key=b_key, value=b"mine")),
            ("DeleteRange", etcdrpc.DeleteRangeRequest(key=b_key)),
            (
                "Txn",
                etcdrpc.TxnRequest(
                    success=[
                        etcdrpc.RequestOp(
                            request_txn=etcdrpc.TxnRequest(
                                success=[
                                    etcdrpc.RequestOp(
                                        request_put=etcdrpc.PutRequest(key=b_key, value=b"x")
                                    )
                                ]
                            )
                        )
                    ]
                ),
            ),
            ("Compact", etcdrpc.CompactionRequest(revision=1)),
        ]
        for method, request in attempts:
            with pytest.raises(grpc.RpcError) as err:
                getattr(kv, method)(request, metadata=token_a, timeout=10)
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, method
            assert err.value.details() == "etcdserver: permission denied"
        # No token at all / a forged one: etcd's own answers.
        with pytest.raises(grpc.RpcError) as err:
            kv.Range(etcdrpc.RangeRequest(key=b_key), timeout=10)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "etcdserver: user name is empty"
        forged = _forge(token_a[0][1], b.username)
        with pytest.raises(grpc.RpcError) as err:
            kv.Range(etcdrpc.RangeRequest(key=b_key), metadata=(("token", forged),), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # Admin services are closed to tenants.
    for service, method, request in [
        ("Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=60)),
        ("Maintenance", "Alarm", etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.DEACTIVATE)),
        ("Maintenance", "Defragment", etcdrpc.DefragmentRequest()),
        ("Cluster", "MemberRemove", etcdrpc.MemberRemoveRequest(ID=1)),
        ("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(name="evil", password="x")),
        ("Auth", "AuthDisable", etcdrpc.AuthDisableRequest()),
    ]:
        channel, stub = _raw_stub(gateway, service)
        with channel, pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(request, metadata=token_a, timeout=10)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, method
    assert b_store.get("secret") == b"b-data"
    assert root.range(b_key).kvs[0].value == b"b-data"


def test_from_key_watch_outside_the_prefix_is_refused_and_the_stream_lives_on(
    gateway: GatewayProcess, tenant: Factory
) -> None:
    a, b = tenant(), tenant()
    with tenant_client([gateway.endpoint], a) as client:
        hub = client.watch_hub
        escape = hub.watch(f"{a.prefix}/".encode(), b"\0", 0)
        with pytest.raises(PermissionDeniedError):
            escape.get(timeout=10)
        other = hub.watch(f"{b.prefix}/".encode(), f"{b.prefix}0".encode(), 0)
        with pytest.raises(PermissionDeniedError):
            other.get(timeout=10)
        revision = client.range(f"{a.prefix}/k".encode()).header.revision
        mine = hub.watch(f"{a.prefix}/k".encode(), b"", revision + 1)
        client.put(f"{a.prefix}/k".encode(), b"1")
        events = mine.get(timeout=10)
        assert events is not None and events[0].kv.value == b"1"
        mine.cancel()


def test_cluster_and_status_describe_the_gateway(gateway: GatewayProcess, tenant: Factory) -> None:
    creds = tenant()
    with tenant_client([gateway.endpoint], creds) as client:
        members = client.call("Cluster", "MemberList", etcdrpc.MemberListRequest()).members
        assert [list(m.clientURLs) for m in members] == [[f"http://{gateway.endpoint}"]]
        status = client.call("Maintenance", "Status", etcdrpc.StatusRequest())
        assert status.version.startswith("3.5")
        assert status.dbSize == 0 and status.leader == 0


def assert_locked_out(client: EtcdClient, watcher: Watcher, key: bytes) -> None:
    """The open watch ends (within 20 s) and the next put is refused, both as denied."""
    deadline = time.monotonic() + 20
    with pytest.raises(PermissionDeniedError):
        while time.monotonic() < deadline:
            watcher.get(timeout=1)
    with pytest.raises(PermissionDeniedError):
        client.put(key, b"3")


def test_revocation_fails_the_next_call_and_ends_an_open_watch(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    creds = tenant()
    key = f"{creds.prefix}/default/alive".encode()
    with tenant_client([gateway.endpoint], creds, timeout=10) as client:
        client.put(key, b"1")
        revision = client.range(key).header.revision
        watcher = client.watch_hub.watch(key, b"", revision + 1)
        client.put(key, b"2")
        events = watcher.get(timeout=10)  # the watch is open and live
        assert events is not None and events[0].kv.value == b"2"
        revoke_tenant(root, creds.username)
        # The gateway ends the stream; the client cannot log in again; the watch fails.
        assert_locked_out(client, watcher, key)
    assert root.range(key).kvs[0].value == b"2"


def test_expired_token_is_renewed_transparently(
    etcd_auth: EtcdCluster, tmp_path: Path, tenant: Factory
) -> None:
    gw = start_gateway(etcd_auth, tmp_path, env={"ETHA_GATEWAY_TOKEN_TTL": "2"})
    try:
        creds = tenant()
        store = open_store([gw.endpoint], creds)
        store.set("k", "1")
        time.sleep(3.0)  # the token has expired
        store.set("k", "2")
        assert store.get("k") == b"2"
        # At least one log-in after the first (a slow machine may expire a token twice).
        logins = re.search(r'etha_gateway_logins_total\{outcome="ok"\} ([0-9.]+)', gw.metrics())
        assert logins is not None and float(logins.group(1)) >= 2
        store.close()
    finally:
        gw.stop()


def test_metrics_count_requests_and_denials_without_secrets_or_keys(
    gateway: GatewayProcess, tenant: Factory
) -> None:
    creds = tenant()
    store = open_store([gateway.endpoint], creds)
    key_name = f"metric-key-{uuid.uuid4().hex[:8]}"
    store.set(key_name, "value-xyz")
    token = _login(gateway, creds)
    channel, kv = _raw_stub(gateway, "KV")
    with channel, pytest.raises(grpc.RpcError):
        kv.Range(etcdrpc.RangeRequest(key=b"elsewhere/x"), metadata=token, timeout=10)  # type: ignore[attr-defined]
    text = gateway.metrics()
    assert re.search(
        rf'etha_gateway_requests_total{{code="OK",method="Put",tenant="{creds.username}"}} [1-9]',
        text,
    )
    assert re.search(
        rf'etha_gateway_denials_total{{reason="key_outside_prefix",'
        rf'tenant="{creds.username}"}} 1\.0',
        text,
    )
    for secret in (creds.secret, token[0][1], key_name, "value-xyz", creds.prefix):
        assert secret not in text


def test_sigterm_exits_cleanly(etcd_auth: EtcdCluster, tmp_path: Path) -> None:
    gw = start_gateway(etcd_auth, tmp_path)
    assert gw.stop() == 0


def test_invalid_records_are_ignored_and_logged_without_their_content(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    marker = "f" * 60 + "zzzz"  # not a valid hash: must not be logged
    broken = {
        TENANTS_PREFIX + b"etha-broken1": b"not json at all " + marker.encode(),
        TENANTS_PREFIX + b"etha-broken2": json.dumps(
            {"version": 1, "username": "etha-broken2", "prefix": "p", "secret_sha256": marker}
        ).encode(),
        TENANTS_PREFIX + b"etha-broken3": json.dumps(
            {"version": 1, "username": "etha-other", "prefix": "p", "secret_sha256": "0" * 64}
        ).encode(),
    }
    try:
        for key, value in broken.items():
            root.put(key, value)
        creds = tenant()  # written after the broken ones: the registry is still live
        store = open_store([gateway.endpoint], creds)
        store.set("k", "v")
        assert store.get("k") == b"v"
        bad = TenantCreds("etha-broken2", marker, "p")
        with pytest.raises(PermissionDeniedError):
            open_store([gateway.endpoint], bad).set("k", "v")
        deadline = time.monotonic() + 10
        while "etha-broken3" not in gateway.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = gateway.log_tail(200)
        assert "etha-broken1" in log and "etha-broken3" in log
        assert marker not in log
    finally:
        for key in broken:
            root.delete_range(key)


def test_etha_waits_on_watches_work_through_the_watch_proxy(
    gateway: GatewayProcess, tenant: Factory
) -> None:
    """With server-side waits switched off on the client, etha waits with its own watches."""
    creds = tenant()
    store = open_store([gateway.endpoint], creds)
    note_no_coordination(store.client)
    writer = open_store([gateway.endpoint], creds)
    threading.Timer(0.5, lambda: writer.set("late", "v")).start()
    assert store.wait_for_key("late", timeout=20) == b"v"
    threading.Timer(0.3, lambda: [writer.set(f"r/{i}/ready", "1") for i in range(4)]).start()
    assert store.wait_for_keys("r/*/ready", expected_count=4, timeout=20) == [
        f"r/{i}/ready" for i in range(4)
    ]
    threading.Timer(0.3, lambda: writer.set("phase", "two")).start()
    assert store.wait_for_value("phase", "two", timeout=20) == b"two"
    with pytest.raises(KVTimeoutError):
        store.wait_for_key("never", timeout=0.5)
    assert 'method="Watch.create"' in gateway.metrics()


def test_health_endpoints(gateway: GatewayProcess) -> None:
    base = gateway.metrics_url.rsplit("/", 1)[0]
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=5) as response:  # noqa: S310
            assert response.status == 200


def test_gateway_keeps_its_own_etcd_token_fresh(tmp_path: Path, tenant: Factory) -> None:
    """etcd expires the gateway's token (TTL 2 s) while it idles; new watches still work."""
    with etcd_cluster(tmp_path / "etcd", auth=True, auth_token_ttl=2) as cluster:
        root = EtcdClient(cluster.endpoints, username="root", password=cluster.root_password)
        gw = start_gateway(cluster, tmp_path / "gw")
        try:
            username, secret, prefix = register_tenant(root)
            creds = TenantCreds(username, secret, prefix)
            time.sleep(5)  # idle: etcd has expired the token the gateway logged in with
            with tenant_client([gw.endpoint], creds) as client:
                key = f"{prefix}/k".encode()
                revision = client.range(key).header.revision
                time.sleep(3)  # idle again
                watcher = client.watch_hub.watch(key, b"", revision + 1)
                client.put(key, b"v")
                events = watcher.get(timeout=15)
                assert events is not None and events[0].kv.value == b"v"
                watcher.cancel()
        finally:
            gw.stop()
            root.close()


def test_record_changes_retire_tokens_and_a_new_secret_ends_old_streams(
    gateway: GatewayProcess, tenant: Factory, root: EtcdClient
) -> None:
    creds = tenant()
    key = f"{creds.prefix}/k".encode()
    with tenant_client([gateway.endpoint], creds) as client:
        client.put(key, b"1")
        revision = client.range(key).header.revision
        watcher = client.watch_hub.watch(key, b"", revision + 1)
        # A quota change rewrites the record: tokens are retired (the client logs in
        # again by itself), but the open watch keeps running.
        register_tenant(
            root, creds.prefix, username=creds.username, secret=creds.secret, quotas={"keys": 50}
        )
        time.sleep(0.5)
        client.put(key, b"2")
        events = watcher.get(timeout=10)
        assert events is not None and events[-1].kv.value == b"2"
        # A new secret: the old one no longer logs in, and the open watch ends.
        register_tenant(root, creds.prefix, username=creds.username, quotas={"keys": 50})
        assert_locked_out(client, watcher, key)
    assert root.range(key).kvs[0].value == b"2"
