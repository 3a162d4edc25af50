"""The isolation oracle: whatever tenant A sends, only A's range changes and A sees only A.

hypothesis generates request shapes (Range, Put, DeleteRange, Txn with compares and
nested ops, Watch creates) over keys chosen around A's bounds, the neighbours' ranges
(B just below, C just above: tests/gateway/hostile.py), the registry and the ends of the
keyspace. Each is sent by A through the real gateway. Root snapshots the WHOLE keyspace
straight from etcd before and after, and the test asserts:

1. every key that changed lies in A's range ``[<r>/, <r>0)``;
2. every key in every response to A (kvs, prev_kv(s), nested Txn responses, watch
   events and their prev_kv) lies in A's range, and a Range's ``count`` counts only
   keys root sees in A's selection;
3. the gateway refuses exactly the requests :mod:`etha.gateway.confine` refuses (with
   the tenant's history floor), so the model proven in test_confine.py is the one the
   server enforces.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pyetcd import etcdrpc

from etha.gateway import confine
from etha.gateway.tenancy import TENANTS_PREFIX
from tests.gateway.hostile import CALL_TIMEOUT, World, make_world

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

#: Weighted towards A's own range, so that allowed requests (whose answers and writes
#: the oracle checks) are common, not only refusals.
ANCHORS = [
    *["a_start"] * 12,
    "a_end",
    "a_bare",
    "b_start",
    "b_end",
    "c_start",
    "c_end",
    "registry",
    "low",
    "high",
    "empty",
]
SUFFIXES = st.one_of(
    st.sampled_from([b"", b"", b"k", b"default/secret", b"\0", b"\xff", b"\xff\xff", b"z"]),
    st.binary(max_size=3),
)
Sym = tuple[str, bytes]  # (anchor, suffix): resolved against the world's prefixes
keys = st.tuples(st.sampled_from(ANCHORS), SUFFIXES)
ends = st.one_of(
    st.sampled_from([("empty", b""), ("empty", b"\0"), ("a_end", b""), ("a_start", b"\xff")]),
    keys,
)


def _resolve(w: World, sym: Sym) -> bytes:
    anchor, suffix = sym
    base = {
        "a_start": w.a.start,
        "a_end": w.a.end,
        "a_bare": w.a.prefix.encode(),
        "b_start": w.b.start,
        "b_end": w.b.end,
        "c_start": w.c.start,
        "c_end": w.c.end,
        "registry": TENANTS_PREFIX,
        "low": b"\0",
        "high": b"\xff\xff\xff",
        "empty": b"",
    }[anchor]
    return base + suffix


range_ops = st.tuples(
    st.just("range"),
    keys,
    ends,
    st.fixed_dictionaries(
        {
            "keys_only": st.booleans(),
            "count_only": st.booleans(),
            "limit": st.sampled_from([0, 0, 1, 2]),
            "revision": st.sampled_from([0, 0, 0, 1]),
        }
    ),
)
put_ops = st.tuples(
    st.just("put"),
    keys,
    st.fixed_dictionaries(
        {
            "lease": st.sampled_from([0, 0, 0, 0, 1]),
            "prev_kv": st.booleans(),
            "ignore_value": st.sampled_from([False, False, False, True]),
            "value": st.binary(max_size=8),
        }
    ),
)
delete_ops = st.tuples(st.just("delete"), keys, ends, st.booleans())


def _txn(depth: int) -> st.SearchStrategy[Any]:
    ops: st.SearchStrategy[Any] = st.one_of(range_ops, put_ops, delete_ops)
    if depth > 0:  # a nested Txn is always refused: keep it to one op in five
        ops = st.one_of(ops, ops, ops, ops, _txn(depth - 1))
    compares = st.lists(
        st.tuples(keys, ends, st.sampled_from(["version", "value", "create", "mod"])), max_size=1
    )
    return st.tuples(st.just("txn"), compares, st.lists(ops, max_size=3), st.lists(ops, max_size=3))


watch_ops = st.tuples(st.just("watch"), keys, ends, st.sampled_from([0, 1]), st.booleans())
requests = st.one_of(range_ops, put_ops, delete_ops, _txn(2), _txn(2), watch_ops)


def _build(w: World, shape: Any) -> tuple[str, Any]:
    kind = shape[0]
    if kind == "range":
        _, k, e, opts = shape
        return "Range", etcdrpc.RangeRequest(key=_resolve(w, k), range_end=_resolve(w, e), **opts)
    if kind == "put":
        _, k, opts = shape
        return "Put", etcdrpc.PutRequest(key=_resolve(w, k), **opts)
    if kind == "delete":
        _, k, e, prev = shape
        return "DeleteRange", etcdrpc.DeleteRangeRequest(
            key=_resolve(w, k), range_end=_resolve(w, e), prev_kv=prev
        )
    if kind == "txn":
        _, compares, success, failure = shape
        txn = etcdrpc.TxnRequest()
        for k, e, target in compares:
            compare = etcdrpc.Compare(key=_resolve(w, k), range_end=_resolve(w, e))
            if target == "version":
                compare.target, compare.result, compare.version = (
                    etcdrpc.Compare.VERSION,
                    etcdrpc.Compare.GREATER,
                    0,
                )
            elif target == "value":
                compare.target, compare.value = etcdrpc.Compare.VALUE, b"B's secret"
            elif target == "create":
                compare.target, compare.result = etcdrpc.Compare.CREATE, etcdrpc.Compare.GREATER
            else:
                compare.target, compare.result, compare.mod_revision = (
                    etcdrpc.Compare.MOD,
                    etcdrpc.Compare.LESS,
                    2**40,
                )
            txn.compare.append(compare)
        for branch, ops in ((txn.success, success), (txn.failure, failure)):
            for op in ops:
                method, request = _build(w, op)
                field = {
                    "Range": "request_range",
                    "Put": "request_put",
                    "DeleteRange": "request_delete_range",
                    "Txn": "request_txn",
                }[method]
                branch.append(etcdrpc.RequestOp(**{field: request}))
        return "Txn", txn
    _, k, e, start, prev = shape
    return "Watch", etcdrpc.WatchCreateRequest(
        key=_resolve(w, k), range_end=_resolve(w, e), start_revision=start, prev_kv=prev
    )


def _confine_allows(w: World, method: str, request: Any) -> bool:
    floor = {"floor": w.record_created(w.a)}
    check = {
        "Range": confine.check_range_request,
        "Put": confine.check_put,
        "DeleteRange": confine.check_delete_range,
        "Txn": confine.check_txn,
        "Watch": confine.check_watch_create,
    }[method]
    try:
        check(w.a.start, w.a.end, request, **({} if method in ("Put", "DeleteRange") else floor))
    except confine.Denied:
        return False
    return True


def _response_keys(message: Any) -> Iterator[bytes]:
    """Every key anywhere in a KV response (nested Txn responses included)."""
    for kv in getattr(message, "kvs", ()):
        yield kv.key
    for kv in getattr(message, "prev_kvs", ()):
        yield kv.key
    if hasattr(message, "prev_kv") and message.HasField("prev_kv"):
        yield message.prev_kv.key
    for result in getattr(message, "responses", ()):
        which = result.WhichOneof("response")
        if which is not None:
            yield from _response_keys(getattr(result, which))


def _selection_count(w: World, snapshot: dict[bytes, Any], request: Any) -> int:
    key, end = request.key, request.range_end
    if end == b"":
        return int(key in snapshot)
    return sum(1 for k in snapshot if key <= k and (end == b"\0" or k < end))


def _watch(w: World, token: str, create: Any) -> tuple[bool, list[bytes]]:
    """Create one watch; root writes probes around A; returns (refused, keys seen)."""
    channel = w.channel()
    requests: queue.Queue[Any] = queue.Queue()
    responses: queue.Queue[Any] = queue.Queue()
    call = etcdrpc.WatchStub(channel).Watch(iter(requests.get, None), metadata=(("token", token),))

    def read() -> None:
        try:
            for response in call:
                responses.put(response)
        except grpc.RpcError as exc:
            responses.put(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[bytes] = []
    try:
        requests.put(etcdrpc.WatchRequest(create_request=create))
        first = responses.get(timeout=CALL_TIMEOUT)
        assert not isinstance(first, Exception), first
        assert first.created, first
        if first.canceled:  # refused: by the gateway, or by etcd (e.g. an empty range)
            assert not first.events
            return "permission denied" in first.cancel_reason, seen
        probes = [w.b.key("probe"), w.c.key("probe"), w.a.end + b"p", w.a.key("probe")]
        for probe in probes:
            w.root.put(probe, b"p")
        for probe in probes:
            w.root.delete_range(probe)
        while True:
            try:
                response = responses.get(timeout=0.4)
            except queue.Empty:
                break
            assert not isinstance(response, Exception), response
            for ev in response.events:
                seen.append(ev.kv.key)
                if ev.HasField("prev_kv") and ev.prev_kv.key:
                    seen.append(ev.prev_kv.key)
        return False, seen
    finally:
        requests.put(None)
        call.cancel()
        reader.join(timeout=CALL_TIMEOUT)
        channel.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for w in make_world(tmp_path_factory.mktemp("oracle")):
        for i in range(4):  # data for A's reads to return
            w.root.put(w.a.key(f"seed/{i}"), f"v{i}".encode())
        yield w


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(shape=requests)
def test_every_change_and_every_answer_stays_inside_as_range(world: World, shape: Any) -> None:
    w = world
    inside = lambda key: w.a.start <= key < w.a.end  # noqa: E731
    method, request = _build(w, shape)
    allowed = _confine_allows(w, method, request)
    token = w.login(w.a)
    before = w.keyspace()
    if method == "Watch":
        refused, seen = _watch(w, token, request)
        outside = [k for k in seen if not inside(k)]
        assert not outside, f"a watch streamed keys outside A: {outside}"
        assert refused == (not allowed)
        after = w.keyspace()  # the probes were put and deleted again
        event(f"Watch: {'refused' if refused else 'allowed'}")
    else:
        try:
            with w.channel() as channel:
                response = getattr(etcdrpc.KVStub(channel), method)(
                    request, metadata=(("token", token),), timeout=CALL_TIMEOUT
                )
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            refusal = code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE)
            assert refusal == (not allowed), (
                code,
                exc.details(),  # type: ignore[attr-defined]
            )
            event(f"{method}: {code.name}")
        else:
            assert allowed, f"the gateway allowed what confine refuses: {request}"
            outside = [k for k in _response_keys(response) if not inside(k)]
            assert not outside, f"a response carried keys outside A: {outside}"
            if method == "Range" and not request.revision:
                assert response.count == _selection_count(w, before, request)
            event(f"{method}: OK")
        after = w.keyspace()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert all(inside(k) for k in changed), f"keys outside A changed: {sorted(changed)}"
    for key, value in w.sentinels.items():
        if not inside(key):
            assert after.get(key, (None,))[0] == value, f"{key!r} was changed or deleted"
