"""Hostile tenant A against the real gateway: every attack class is refused, nothing moves.

Tenants come from the real operator in gateway mode (tests/gateway/hostile.py): A owns
``<r>/``, B owns ``<r>.b/`` (just below A's range), C owns ``<r>0/`` (just above; A's
range end is C's bare prefix). A talks to the gateway with raw ``pyetcd.etcdrpc``
messages on a plain grpc channel (nothing in etha's client can soften an attack), and
after every attack root reads etcd DIRECTLY: the whole keyspace (B's and C's keys, the
registry, raw keys around A's bounds) byte- and revision-identical, no alarm, auth still
enabled, the same users, roles, leases and members, revision 1 still readable (nothing
compacted), the same etcd version (no downgrade).
"""

from __future__ import annotations

import base64
import json
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from pyetcd import etcdrpc
from pyetcd.etcdrpc import rpc_pb2

from etha.gateway import confine
from etha.gateway.tenancy import TENANTS_PREFIX, tenant_key
from etha.gateway.tokens import TokenSigner, load_keys
from etha.kvstore import gateway_api
from tests.gateway.hostile import CALL_TIMEOUT, World, make_world
from tests.support.protobuf_wire import varint

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

DENIED = (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
NO_USER = (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty")
BAD_TOKEN = (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
AUTH_FAILED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    "etcdserver: authentication failed, invalid user ID or password",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from make_world(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def lease_id(world: World) -> int:
    """A lease root owns, holding a victim key: a target for Lease attacks."""
    lease = world.root.call("Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=3600)).ID
    key = b"root/leased"
    world.root.call(
        "KV", "Put", etcdrpc.PutRequest(key=key, value=b"held by root's lease", lease=lease)
    )
    world.sentinels[key] = b"held by root's lease"
    return int(lease)


@pytest.fixture
def before(world: World, lease_id: int) -> Any:
    state = world.state()
    assert f"{lease_id:x}" in state.leases, state.leases  # root's lease, and only it
    assert "found 1 leases" in state.leases, state.leases
    return state


def _raw(w: World, path: str, payload: bytes, token: str | None, kind: str = "unary") -> Any:
    """One RPC on a fresh channel to the gateway; returns the raw response (bytes)."""
    metadata = (("token", token),) if token is not None else ()
    same: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    with w.channel() as channel:
        if kind == "unary":
            fn = channel.unary_unary(path, request_serializer=same, response_deserializer=same)
            return fn(payload, metadata=metadata, timeout=CALL_TIMEOUT)
        if kind == "unary_stream":
            fn = channel.unary_stream(path, request_serializer=same, response_deserializer=same)
            return list(fn(payload, metadata=metadata, timeout=CALL_TIMEOUT))
        fn = channel.stream_stream(path, request_serializer=same, response_deserializer=same)
        return list(fn(iter([payload]), metadata=metadata, timeout=CALL_TIMEOUT))


def _path(service: str, method: str) -> str:
    if service == "Coordination":
        return f"/{gateway_api.SERVICE}/{method}"
    return f"/etcdserverpb.{service}/{method}"


def refused(
    w: World,
    service: str,
    method: str,
    request: Any,
    token: str | None,
    expected: tuple[grpc.StatusCode, str] | tuple[tuple[grpc.StatusCode, str], ...] = DENIED,
    kind: str = "unary",
) -> grpc.StatusCode:
    """Send the attack; it must fail with one of ``expected`` (etcd's code and message)."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    options = expected if isinstance(expected[0], tuple) else (expected,)
    with pytest.raises(grpc.RpcError) as info:
        _raw(w, _path(service, method), payload, token, kind)
    error: Any = info.value
    got = (error.code(), error.details())
    assert any(
        got[0] is code and (message is None or got[1] == message)
        for code, message in options  # type: ignore[misc]
    ), f"{service}.{method}: {got}"
    return error.code()  # type: ignore[no-any-return]


# -- KV: ranges, writes, nested Txns, compares ---------------------------------------------


def _escaping_ranges(w: World) -> dict[str, tuple[bytes, bytes]]:
    a, b, c = w.a, w.b, w.c
    p = a.prefix.encode()
    return {
        "from_key": (a.start, b"\0"),
        "from_key_inside": (a.key("zzz"), b"\0"),
        "empty_key": (b"", b""),
        "empty_key_to_end": (b"", a.end),
        "empty_key_from_key": (b"", b"\0"),
        "one_past_end": (a.start, a.end + b"\0"),
        "into_c": (a.start, c.end),
        "to_ff": (a.key("x"), b"\xff\xff\xff\xff\xff"),
        "whole_keyspace": (b"\0", b"\0"),
        "bare_prefix_below": (p, b""),
        "just_below_into_a": (p + b".", a.key("z")),
        "b_key": (b.key("default/secret"), b""),
        "b_range": (b.start, b.end),
        "c_range": (c.start, c.end),
        "range_end_key": (a.end, b""),
        "registry": (TENANTS_PREFIX, TENANTS_PREFIX[:-1] + b"0"),
        "registry_record_of_b": (tenant_key(b.creds.username), b""),
    }


ESCAPES = [
    "from_key",
    "from_key_inside",
    "empty_key",
    "empty_key_to_end",
    "empty_key_from_key",
    "one_past_end",
    "into_c",
    "to_ff",
    "whole_keyspace",
    "bare_prefix_below",
    "just_below_into_a",
    "b_key",
    "b_range",
    "c_range",
    "range_end_key",
    "registry",
    "registry_record_of_b",
]


@pytest.mark.parametrize("name", ESCAPES)
def test_escaping_range_is_refused_in_every_request_shape(
    world: World, before: Any, name: str
) -> None:
    key, end = _escaping_ranges(world)[name]
    token = world.login(world.a)
    rng = etcdrpc.RangeRequest(key=key, range_end=end)
    dr = etcdrpc.DeleteRangeRequest(key=key, range_end=end, prev_kv=True)
    cmp_ = etcdrpc.Compare(
        key=key,
        range_end=end,
        target=etcdrpc.Compare.CREATE,
        result=etcdrpc.Compare.GREATER,
        create_revision=0,
    )
    inside = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=world.a.key("k"), value=b"x"))
    for method, request in [
        ("Range", rng),
        ("Range", etcdrpc.RangeRequest(key=key, range_end=end, count_only=True)),
        ("Range", etcdrpc.RangeRequest(key=key, range_end=end, revision=1)),
        ("DeleteRange", dr),
        ("Txn", etcdrpc.TxnRequest(success=[etcdrpc.RequestOp(request_range=rng)])),
        ("Txn", etcdrpc.TxnRequest(failure=[etcdrpc.RequestOp(request_delete_range=dr)])),
        ("Txn", etcdrpc.TxnRequest(compare=[cmp_], success=[inside], failure=[inside])),
    ]:
        refused(world, "KV", method, request, token)
    world.assert_untouched(before)


def _put_targets(w: World) -> dict[str, etcdrpc.PutRequest]:
    a, b, c = w.a, w.b, w.c
    own = tenant_key(a.creds.username)
    forged_record = json.loads(w.root.range(own).kvs[0].value)
    forged_record["prefix"] = b.prefix  # A claims B's prefix
    return {
        "b_key": etcdrpc.PutRequest(key=b.key("default/secret"), value=b"pwned", prev_kv=True),
        "c_key": etcdrpc.PutRequest(key=c.key("default/secret"), value=b"pwned"),
        "bare_prefix": etcdrpc.PutRequest(key=a.prefix.encode(), value=b"pwned"),
        "range_end_key": etcdrpc.PutRequest(key=a.end, value=b"pwned"),
        "empty_key": etcdrpc.PutRequest(key=b"", value=b"pwned"),
        "own_record": etcdrpc.PutRequest(key=own, value=json.dumps(forged_record).encode()),
        "new_record": etcdrpc.PutRequest(key=tenant_key("etha-evil"), value=b"{}"),
        "with_roots_lease": etcdrpc.PutRequest(key=a.key("k"), value=b"v", lease=0),
        "ignore_value_b": etcdrpc.PutRequest(key=b.key("default/secret"), ignore_value=True),
    }


PUTS = [
    "b_key",
    "c_key",
    "bare_prefix",
    "range_end_key",
    "empty_key",
    "own_record",
    "new_record",
    "with_roots_lease",
    "ignore_value_b",
]


@pytest.mark.parametrize("name", PUTS)
def test_put_outside_the_prefix_or_with_a_lease_is_refused(
    world: World, before: Any, lease_id: int, name: str
) -> None:
    request = _put_targets(world)[name]
    if name == "with_roots_lease":
        request.lease = lease_id  # A attaches its own key to root's lease
    token = world.login(world.a)
    refused(world, "KV", "Put", request, token)
    refused(
        world,
        "KV",
        "Txn",
        etcdrpc.TxnRequest(success=[etcdrpc.RequestOp(request_put=request)]),
        token,
    )
    world.assert_untouched(before)


def _nested(leaf: etcdrpc.RequestOp, depth: int, branch: str) -> etcdrpc.TxnRequest:
    txn = etcdrpc.TxnRequest(success=[leaf])
    for level in range(depth):
        wrapped = etcdrpc.RequestOp(request_txn=txn)
        txn = (
            etcdrpc.TxnRequest(success=[wrapped])
            if (branch == "success") ^ (level % 2 == 1)
            else etcdrpc.TxnRequest(failure=[wrapped])
        )
    return txn


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("op", ["read", "write", "delete"])
def test_nested_txn_touching_another_tenant_is_refused(
    world: World, before: Any, depth: int, op: str
) -> None:
    victim = world.b.key("default/secret")
    leaf = {
        "read": etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=victim)),
        "write": etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=victim, value=b"pwned")),
        "delete": etcdrpc.RequestOp(
            request_delete_range=etcdrpc.DeleteRangeRequest(key=victim, prev_kv=True)
        ),
    }[op]
    token = world.login(world.a)
    for branch in ("success", "failure"):
        refused(world, "KV", "Txn", _nested(leaf, depth, branch), token)
    # Outer compares and ops that are A's own do not launder the nested one.
    txn = _nested(leaf, depth, "success")
    txn.compare.append(etcdrpc.Compare(key=world.a.key("k"), target=etcdrpc.Compare.VERSION))
    refused(world, "KV", "Txn", txn, token)
    world.assert_untouched(before)


def test_compare_on_another_tenants_key_is_not_an_oracle(world: World, before: Any) -> None:
    """A Txn whose compare reads B's value, and whose branches write A's own key."""
    token = world.login(world.a)
    flag = world.a.key("oracle")

    def txn(compare: etcdrpc.Compare) -> etcdrpc.TxnRequest:
        return etcdrpc.TxnRequest(
            compare=[compare],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=flag, value=b"yes"))],
            failure=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=flag, value=b"no"))],
        )

    victim = world.b.key("default/secret")
    for compare in [
        etcdrpc.Compare(
            key=victim,
            target=etcdrpc.Compare.VALUE,
            result=etcdrpc.Compare.EQUAL,
            value=b"B's secret",
        ),
        etcdrpc.Compare(key=victim, target=etcdrpc.Compare.VERSION, result=etcdrpc.Compare.GREATER),
        etcdrpc.Compare(key=victim, target=etcdrpc.Compare.LEASE, result=etcdrpc.Compare.EQUAL),
        # a compare range that starts inside A and runs into C
        etcdrpc.Compare(
            key=world.a.start,
            range_end=world.c.end,
            target=etcdrpc.Compare.CREATE,
            result=etcdrpc.Compare.GREATER,
        ),
        etcdrpc.Compare(
            key=world.a.start,
            range_end=b"\0",
            target=etcdrpc.Compare.MOD,
            result=etcdrpc.Compare.LESS,
            mod_revision=2**40,
        ),
    ]:
        refused(world, "KV", "Txn", txn(compare), token)
    assert not world.root.range(flag).kvs, "a refused Txn wrote its branch"
    world.assert_untouched(before)


# -- cluster-wide calls -----------------------------------------------------------------


def _member_id(w: World) -> int:
    [member] = w.root.call("Cluster", "MemberList", etcdrpc.MemberListRequest()).members
    return int(member.ID)


def _admin_calls(w: World, lease_id: int) -> list[tuple[str, str, Any, str]]:
    """(service, method, request, kind): every admin RPC, with hostile arguments."""
    member = _member_id(w)
    revision = int(w.root.range(b"x").header.revision)
    a_user, b_user = w.a.creds.username, w.b.creds.username
    everything = etcdrpc.Permission(
        permType=etcdrpc.Permission.READWRITE, key=b"\0", range_end=b"\0"
    )
    calls: list[tuple[str, str, Any, str]] = [
        ("KV", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True), "unary"),
        ("KV", "Compact", etcdrpc.CompactionRequest(revision=1), "unary"),
        (
            "Maintenance",
            "Alarm",
            etcdrpc.AlarmRequest(
                action=etcdrpc.AlarmRequest.ACTIVATE, memberID=member, alarm=etcdrpc.NOSPACE
            ),
            "unary",
        ),
        (
            "Maintenance",
            "Alarm",
            etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.ACTIVATE, memberID=member, alarm=2),
            "unary",
        ),  # CORRUPT
        (
            "Maintenance",
            "Alarm",
            etcdrpc.AlarmRequest(
                action=etcdrpc.AlarmRequest.ACTIVATE, memberID=0, alarm=etcdrpc.NOSPACE
            ),
            "unary",
        ),
        (
            "Maintenance",
            "Alarm",
            etcdrpc.AlarmRequest(
                action=etcdrpc.AlarmRequest.DEACTIVATE, memberID=member, alarm=etcdrpc.NOSPACE
            ),
            "unary",
        ),
        ("Maintenance", "Alarm", etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET), "unary"),
        ("Maintenance", "Defragment", etcdrpc.DefragmentRequest(), "unary"),
        ("Maintenance", "Hash", etcdrpc.HashRequest(), "unary"),
        ("Maintenance", "HashKV", etcdrpc.HashKVRequest(revision=0), "unary"),
        ("Maintenance", "Snapshot", etcdrpc.SnapshotRequest(), "unary_stream"),
        ("Maintenance", "MoveLeader", etcdrpc.MoveLeaderRequest(targetID=member), "unary"),
        # Downgrade (etcd 3.5; not in the bundled descriptors): action ENABLE, version 3.4.0
        ("Maintenance", "Downgrade", b"\x08\x01\x12\x053.4.0", "unary"),
        (
            "Cluster",
            "MemberAdd",
            etcdrpc.MemberAddRequest(peerURLs=["http://127.0.0.1:9"]),
            "unary",
        ),
        ("Cluster", "MemberRemove", etcdrpc.MemberRemoveRequest(ID=member), "unary"),
        (
            "Cluster",
            "MemberUpdate",
            etcdrpc.MemberUpdateRequest(ID=member, peerURLs=["http://127.0.0.1:9"]),
            "unary",
        ),
        ("Cluster", "MemberPromote", b"\x08" + varint(member), "unary"),
        ("Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=60), "unary"),
        ("Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=60, ID=lease_id), "unary"),
        ("Lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id), "unary"),
        ("Lease", "LeaseKeepAlive", etcdrpc.LeaseKeepAliveRequest(ID=lease_id), "stream_stream"),
        (
            "Lease",
            "LeaseTimeToLive",
            etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=True),
            "unary",
        ),
        ("Lease", "LeaseLeases", b"", "unary"),
        ("Auth", "AuthEnable", etcdrpc.AuthEnableRequest(), "unary"),
        ("Auth", "AuthDisable", etcdrpc.AuthDisableRequest(), "unary"),
        ("Auth", "AuthStatus", b"", "unary"),
        ("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(name="evil", password="evil"), "unary"),
        ("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(name=a_user, password="evil"), "unary"),
        ("Auth", "UserGet", etcdrpc.AuthUserGetRequest(name="root"), "unary"),
        ("Auth", "UserList", etcdrpc.AuthUserListRequest(), "unary"),
        ("Auth", "UserDelete", etcdrpc.AuthUserDeleteRequest(name="root"), "unary"),
        (
            "Auth",
            "UserChangePassword",
            etcdrpc.AuthUserChangePasswordRequest(name="root", password="pwned"),
            "unary",
        ),
        (
            "Auth",
            "UserChangePassword",
            etcdrpc.AuthUserChangePasswordRequest(name=b_user, password="pwned"),
            "unary",
        ),
        (
            "Auth",
            "UserChangePassword",
            etcdrpc.AuthUserChangePasswordRequest(name=a_user, password="pwned"),
            "unary",
        ),
        (
            "Auth",
            "UserGrantRole",
            etcdrpc.AuthUserGrantRoleRequest(user=a_user, role="root"),
            "unary",
        ),
        (
            "Auth",
            "UserRevokeRole",
            etcdrpc.AuthUserRevokeRoleRequest(name="root", role="root"),
            "unary",
        ),
        ("Auth", "RoleAdd", etcdrpc.AuthRoleAddRequest(name="evil"), "unary"),
        ("Auth", "RoleGet", etcdrpc.AuthRoleGetRequest(role="root"), "unary"),
        ("Auth", "RoleList", etcdrpc.AuthRoleListRequest(), "unary"),
        ("Auth", "RoleDelete", etcdrpc.AuthRoleDeleteRequest(role="root"), "unary"),
        (
            "Auth",
            "RoleGrantPermission",
            etcdrpc.AuthRoleGrantPermissionRequest(name="root", perm=everything),
            "unary",
        ),
        (
            "Auth",
            "RoleRevokePermission",
            etcdrpc.AuthRoleRevokePermissionRequest(role="root", key=b"\0", range_end=b"\0"),
            "unary",
        ),
    ]
    return calls


#: Services and methods the bundled descriptors define; every other admin method
#: (Downgrade, MemberPromote, LeaseLeases, AuthStatus) is one the gateway does not
#: serve at all: UNIMPLEMENTED, never forwarded.
KNOWN = {(s.name, m.name) for s in rpc_pb2.DESCRIPTOR.services_by_name.values() for m in s.methods}
#: Admin methods by name, so that a new RPC in the descriptors fails the coverage test.
OPEN_TO_TENANTS = {
    ("KV", "Range"),
    ("KV", "Put"),
    ("KV", "DeleteRange"),
    ("KV", "Txn"),
    ("Watch", "Watch"),
    ("Watch", "Progress"),
    ("Auth", "Authenticate"),
    ("Maintenance", "Status"),
    ("Cluster", "MemberList"),
}


def test_the_admin_list_covers_every_rpc_of_etcds_api(world: World, lease_id: int) -> None:
    attacked = {(s, m) for s, m, _, _ in _admin_calls(world, lease_id)}
    assert attacked >= KNOWN - OPEN_TO_TENANTS, sorted(KNOWN - OPEN_TO_TENANTS - attacked)


@pytest.mark.parametrize("service", ["KV", "Maintenance", "Cluster", "Lease", "Auth"])
def test_every_admin_call_is_refused(
    world: World, before: Any, lease_id: int, service: str
) -> None:
    token = world.login(world.a)
    calls = [c for c in _admin_calls(world, lease_id) if c[0] == service]
    assert calls
    for svc, method, request, kind in calls:
        expected: Any = (
            DENIED
            if (svc, method) in KNOWN
            else (
                DENIED,
                (grpc.StatusCode.UNIMPLEMENTED, None),
            )
        )
        refused(world, svc, method, request, token, expected, kind)
    world.assert_untouched(before)
    # Root's password still logs in (UserChangePassword did nothing).
    assert world.cluster.etcdctl("user", "get", "root").returncode == 0


def test_status_and_member_list_describe_the_gateway_not_etcd(world: World, before: Any) -> None:
    token = world.login(world.a)
    md = (("token", token),)
    etcd_status = world.root.call("Maintenance", "Status", etcdrpc.StatusRequest())
    member = _member_id(world)
    with world.channel() as channel:
        status = etcdrpc.MaintenanceStub(channel).Status(
            etcdrpc.StatusRequest(), metadata=md, timeout=CALL_TIMEOUT
        )
        members = etcdrpc.ClusterStub(channel).MemberList(
            etcdrpc.MemberListRequest(), metadata=md, timeout=CALL_TIMEOUT
        )
        kv = etcdrpc.KVStub(channel).Range(
            etcdrpc.RangeRequest(key=world.a.key("k")), metadata=md, timeout=CALL_TIMEOUT
        )
    assert etcd_status.header.member_id == member and etcd_status.dbSize > 0  # what would leak
    for header in (status.header, members.header, kv.header):
        assert header.member_id == 0
        assert header.cluster_id != etcd_status.header.cluster_id
        assert header.raft_term == 0
    assert status.dbSize == 0 and status.leader == 0 and status.raftIndex == 0
    assert status.raftTerm == 0
    assert [m.clientURLs for m in members.members] == [[f"http://{world.gateway.endpoint}"]]
    assert all(m.name == "etha-gateway" and not m.peerURLs for m in members.members)
    assert all(member != m.ID for m in members.members)
    world.assert_untouched(before)


# -- watches -------------------------------------------------------------------------------


class RawWatch:
    """A raw Watch stream to the gateway: send requests, read responses with a timeout."""

    def __init__(self, w: World, token: str | None) -> None:
        self.channel = w.channel()
        self.requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        metadata = (("token", token),) if token is not None else ()
        self.call = etcdrpc.WatchStub(self.channel).Watch(
            iter(self.requests.get, None), metadata=metadata
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as exc:
            self.responses.put(exc)
        self.responses.put(None)

    def create(self, key: bytes, range_end: bytes = b"", **fields: Any) -> None:
        create = etcdrpc.WatchCreateRequest(key=key, range_end=range_end, **fields)
        self.requests.put(etcdrpc.WatchRequest(create_request=create))

    def next(self, timeout: float = CALL_TIMEOUT) -> Any:
        return self.responses.get(timeout=timeout)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.reader.join(timeout=CALL_TIMEOUT)
        self.channel.close()


@pytest.mark.parametrize("name", ESCAPES)
def test_escaping_watch_is_refused_and_streams_nothing(
    world: World, before: Any, name: str
) -> None:
    """An escaping create, then A's own watch; root writes victims, then A's own key."""
    key, end = _escaping_ranges(world)[name]
    watch = RawWatch(world, world.login(world.a))
    try:
        watch.create(key, end, prev_kv=True, start_revision=1)  # history too, if it leaked
        refusal = watch.next()
        assert not isinstance(refusal, Exception), refusal
        assert refusal.created and refusal.canceled, refusal
        assert "permission denied" in refusal.cancel_reason
        assert not refusal.events
        watch.create(world.a.start, world.a.end)
        created = watch.next()
        assert created.created and not created.canceled, created
        # Writes a leaking watch would see: below, above, other tenants, then A's own.
        probes = {
            world.b.key("probe"): b"b",
            world.c.key("probe"): b"c",
            world.a.prefix.encode() + b".probe": b"below",
            world.a.end + b"probe": b"above",
        }
        for probe, value in probes.items():
            world.root.put(probe, value)
        marker = world.a.key(f"marker-{name}")
        world.root.put(marker, b"m")
        seen: list[bytes] = []
        deadline = time.monotonic() + CALL_TIMEOUT
        while marker not in seen:
            response = watch.next(timeout=max(0.1, deadline - time.monotonic()))
            assert response is not None and not isinstance(response, Exception), response
            seen.extend(ev.kv.key for ev in response.events)
            for ev in response.events:
                assert world.a.start <= ev.kv.key < world.a.end, f"leaked {ev.kv.key!r}"
                if ev.HasField("prev_kv") and ev.prev_kv.key:
                    assert world.a.start <= ev.prev_kv.key < world.a.end
    finally:
        watch.close()
    for probe in (*probes, marker):
        world.root.delete_range(probe)
    world.assert_untouched(before)


def test_watch_without_or_with_a_forged_token_is_refused(world: World) -> None:
    for token, expected in [(None, NO_USER), ("etha1.e30.AAAA", BAD_TOKEN)]:
        watch = RawWatch(world, token)
        try:
            watch.create(world.a.start, world.a.end)
            ending = watch.next()
            assert isinstance(ending, grpc.RpcError), ending
            assert (ending.code(), ending.details()) == expected  # type: ignore[attr-defined]
        finally:
            watch.close()


# -- server-side waits and counters --------------------------------------------------------


def test_waits_and_adds_outside_the_prefix_are_refused(world: World, before: Any) -> None:
    token = world.login(world.a)
    victim = world.b.key("default/secret")
    W, A = gateway_api.WaitRequest, gateway_api.AddRequest
    for request in [
        W(mode=gateway_api.MODE_KEY, key=victim),
        W(mode=gateway_api.MODE_VALUE, key=victim, value=b"B's secret", has_value=True),
        W(
            mode=gateway_api.MODE_KEYS,
            key=world.b.start,
            range_end=world.b.end,
            pattern=world.b.start + b"*",
            count=1,
        ),
        W(
            mode=gateway_api.MODE_KEYS,
            key=world.a.start,
            range_end=b"\0",
            pattern=world.a.start + b"*",
            count=1,
        ),
        W(mode=gateway_api.MODE_KEY, key=tenant_key(world.b.creds.username)),
    ]:
        refused(
            world,
            "Coordination",
            "Wait",
            request,
            token,
            (DENIED, (grpc.StatusCode.INVALID_ARGUMENT, None)),
        )
    for key in [victim, world.a.end, tenant_key(world.a.creds.username), b""]:
        refused(
            world,
            "Coordination",
            "Add",
            A(key=key, delta=1),
            token,
            (DENIED, (grpc.StatusCode.INVALID_ARGUMENT, None)),
        )
    world.assert_untouched(before)


# -- identity: anonymous, forged, expired, revoked, someone else's ------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _forged_tokens(w: World) -> dict[str, str]:
    real = w.login(w.a)
    version, payload, signature = real.split(".")
    body = json.loads(_unb64(payload))
    keys = load_keys(str(w.gateway.token_key_file))
    a_rev = w.record_revision(w.a)
    past = TokenSigner(keys, ttl=60, clock=lambda: time.time() - 3600)

    def altered(**changes: Any) -> str:
        return f"{version}.{_b64(json.dumps({**body, **changes}).encode())}.{signature}"

    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    return {
        "bad_mac": f"{version}.{payload}.{flipped}",
        "payload_other_user": altered(u=w.b.creds.username),
        "payload_later_expiry": altered(exp=body["exp"] + 10**6),
        "payload_other_revision": altered(r=body["r"] + 1),
        "other_key": TokenSigner([secrets.token_urlsafe(32).encode()]).issue(
            w.a.creds.username, a_rev
        ),
        "truncated": real[:-6],
        "truncated_half": real[: len(real) // 2],
        "no_signature": f"{version}.{payload}",
        "empty_parts": "etha1..",
        "just_version": "etha1",
        "other_version": f"etha2.{payload}.{signature}",
        "etcd_simple_token": "abcdefghijklmnop.42",
        "huge": "etha1." + "A" * 5000 + ".AAAA",
        "expired": past.issue(w.a.creds.username, a_rev),
        # signed with the real key, but for names the registry does not hold
        "real_key_root": TokenSigner(keys).issue("root", a_rev),
        "real_key_stale_revision": TokenSigner(keys).issue(w.a.creds.username, a_rev - 1),
    }


TOKENS = [
    "bad_mac",
    "payload_other_user",
    "payload_later_expiry",
    "payload_other_revision",
    "other_key",
    "truncated",
    "truncated_half",
    "no_signature",
    "empty_parts",
    "just_version",
    "other_version",
    "etcd_simple_token",
    "huge",
    "expired",
    "real_key_root",
    "real_key_stale_revision",
]


def _identity_probes(w: World) -> list[tuple[str, str, Any, str]]:
    """Calls that would succeed with A's real token (A's own keys) or are harmless reads."""
    own = w.a.key("default/secret")
    return [
        ("KV", "Range", etcdrpc.RangeRequest(key=own), "unary"),
        ("KV", "Put", etcdrpc.PutRequest(key=own, value=b"forged"), "unary"),
        ("KV", "DeleteRange", etcdrpc.DeleteRangeRequest(key=own), "unary"),
        (
            "KV",
            "Txn",
            etcdrpc.TxnRequest(
                success=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=own))]
            ),
            "unary",
        ),
        ("KV", "Compact", etcdrpc.CompactionRequest(revision=1), "unary"),
        ("Maintenance", "Status", etcdrpc.StatusRequest(), "unary"),
        ("Maintenance", "Alarm", etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET), "unary"),
        ("Cluster", "MemberList", etcdrpc.MemberListRequest(), "unary"),
        ("Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=5), "unary"),
        ("Auth", "UserList", etcdrpc.AuthUserListRequest(), "unary"),
        (
            "Coordination",
            "Wait",
            gateway_api.WaitRequest(mode=gateway_api.MODE_KEY, key=own),
            "unary",
        ),
        ("Coordination", "Add", gateway_api.AddRequest(key=w.a.key("n"), delta=1), "unary"),
    ]


def test_the_real_keys_issue_a_working_token_for_a(world: World) -> None:
    """Control for the forged-token test: a token minted with the gateway's key works."""
    token = TokenSigner(load_keys(str(world.gateway.token_key_file))).issue(
        world.a.creds.username, world.record_revision(world.a)
    )
    with world.channel() as channel:
        etcdrpc.KVStub(channel).Range(
            etcdrpc.RangeRequest(key=world.a.key("x")),
            metadata=(("token", token),),
            timeout=CALL_TIMEOUT,
        )


def test_anonymous_calls_are_refused(world: World, before: Any) -> None:
    for service, method, request, kind in _identity_probes(world):
        refused(world, service, method, request, None, NO_USER, kind)
        refused(world, service, method, request, "", NO_USER, kind)
    world.assert_untouched(before)


@pytest.mark.parametrize("name", TOKENS)
def test_forged_and_expired_tokens_are_refused(world: World, before: Any, name: str) -> None:
    token = _forged_tokens(world)[name]
    for service, method, request, kind in _identity_probes(world):
        refused(world, service, method, request, token, BAD_TOKEN, kind)
    world.assert_untouched(before)


def test_another_tenants_valid_token_cannot_touch_our_prefix(world: World) -> None:
    """B (a valid tenant) against A's keys: as refused as A against B's."""
    own = world.a.key("default/secret")
    before = world.state()
    token_b = world.login(world.b)
    refused(world, "KV", "Range", etcdrpc.RangeRequest(key=own), token_b)
    refused(world, "KV", "Put", etcdrpc.PutRequest(key=own, value=b"B was here"), token_b)
    refused(world, "KV", "DeleteRange", etcdrpc.DeleteRangeRequest(key=own), token_b)
    refused(
        world,
        "KV",
        "Txn",
        etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=own, target=etcdrpc.Compare.VALUE, value=b"A's own")]
        ),
        token_b,
    )
    refused(world, "Coordination", "Add", gateway_api.AddRequest(key=own, delta=1), token_b)
    watch = RawWatch(world, token_b)
    try:
        watch.create(world.a.start, world.a.end)
        refusal = watch.next()
        assert refusal.created and refusal.canceled, refusal
    finally:
        watch.close()
    world.assert_untouched(before)


def test_a_revoked_tenants_token_and_password_stop_working(world: World) -> None:
    doomed = world.provision("doomed", f"{world.a.prefix}-doomed")
    token = world.login(doomed)
    own = doomed.key("k")
    with world.channel() as channel:  # works before the revocation
        etcdrpc.KVStub(channel).Put(
            etcdrpc.PutRequest(key=own, value=b"v"), metadata=(("token", token),), timeout=10
        )
    world.deprovision(doomed)
    before = world.state()
    for service, method, request, kind in [
        ("KV", "Range", etcdrpc.RangeRequest(key=own), "unary"),
        ("KV", "Put", etcdrpc.PutRequest(key=own, value=b"after"), "unary"),
        ("Maintenance", "Status", etcdrpc.StatusRequest(), "unary"),
    ]:
        refused(world, service, method, request, token, BAD_TOKEN, kind)
    refused(
        world,
        "Auth",
        "Authenticate",
        etcdrpc.AuthenticateRequest(name=doomed.creds.username, password=doomed.creds.secret),
        None,
        AUTH_FAILED,
    )
    world.assert_untouched(before)


def test_a_reused_prefix_does_not_reveal_the_previous_owners_history(world: World) -> None:
    """KVNamespace 1 owns prefix P, writes, is deleted (keys and record go); KVNamespace
    2 claims P. etcd still holds P's old revisions until it compacts: 2 must not read
    them (Range at a revision, inside a Txn, or a watch replaying history)."""
    prefix = f"{world.a.prefix}-reused"
    first = world.provision("first-owner", prefix)
    token = world.login(first)
    secret = first.key("secret")
    with world.channel() as channel:
        written = etcdrpc.KVStub(channel).Put(
            etcdrpc.PutRequest(key=secret, value=b"the first owner's secret"),
            metadata=(("token", token),),
            timeout=CALL_TIMEOUT,
        )
    old = int(written.header.revision)
    world.deprovision(first)
    assert not world.root.range(secret).kvs  # the operator cleaned the keys...
    assert world.root.range(secret, revision=old).kvs  # ...but etcd keeps the history
    second = world.provision("second-owner", prefix)
    token = world.login(second)
    compacted = (grpc.StatusCode.OUT_OF_RANGE, confine.COMPACTED_MESSAGE)
    before = world.state()
    refused(world, "KV", "Range", etcdrpc.RangeRequest(key=secret, revision=old), token, compacted)
    refused(
        world,
        "KV",
        "Range",
        etcdrpc.RangeRequest(key=second.start, range_end=second.end, revision=1),
        token,
        compacted,
    )
    op = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=secret, revision=old))
    refused(world, "KV", "Txn", etcdrpc.TxnRequest(success=[op]), token, compacted)
    watch = RawWatch(world, token)
    try:
        watch.create(second.start, second.end, start_revision=1, prev_kv=True)
        refusal = watch.next()
        assert refusal.canceled and not refusal.events, refusal
    finally:
        watch.close()
    # The second owner's own present is fully readable, history from its creation too.
    floor = world.record_created(second)
    with world.channel() as channel:
        now = etcdrpc.KVStub(channel).Range(
            etcdrpc.RangeRequest(key=second.start, range_end=second.end, revision=floor),
            metadata=(("token", token),),
            timeout=CALL_TIMEOUT,
        )
    assert not now.kvs
    world.assert_untouched(before)
    world.deprovision(second)


def test_confinement_holds_while_etcd_has_a_nospace_alarm(world: World) -> None:
    """etcd 3.5 skips permission checks under NOSPACE; the gateway's checks are its own.

    Root raises the alarm on etcd (as a full disk would), A attacks with reads and a
    watch outside its prefix, root clears the alarm; nothing of B's was seen."""
    member = _member_id(world)
    alarm = etcdrpc.AlarmRequest(
        action=etcdrpc.AlarmRequest.ACTIVATE, memberID=member, alarm=etcdrpc.NOSPACE
    )
    before = world.state()
    token = world.login(world.a)
    victim = world.b.key("default/secret")
    world.root.call("Maintenance", "Alarm", alarm)
    try:
        assert world.state().alarms, "the alarm did not take"
        refused(world, "KV", "Range", etcdrpc.RangeRequest(key=victim), token)
        refused(
            world,
            "KV",
            "Range",
            etcdrpc.RangeRequest(key=world.a.start, range_end=b"\0"),
            token,
        )
        op = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=victim))
        refused(world, "KV", "Txn", etcdrpc.TxnRequest(success=[op]), token)
        watch = RawWatch(world, token)
        try:
            watch.create(world.b.start, world.b.end, start_revision=1)
            refusal = watch.next()
            assert refusal.canceled and not refusal.events, refusal
        finally:
            watch.close()
    finally:
        alarm.action = etcdrpc.AlarmRequest.DEACTIVATE
        world.root.call("Maintenance", "Alarm", alarm)
    world.assert_untouched(before)
