"""etha.gateway.confine against a brute-force oracle (hypothesis, no server).

The oracle knows nothing of the module's reasoning: it enumerates a small universe of
byte strings (fixed ones around the tenant's bounds plus every key and range end the
example names), computes which of them a request can select under etcd's range rules,
and allows the request iff its key is a non-empty key inside ``[<p>/, <p>0)`` and every
selected key is inside. The universe always holds the request's own key and the
tenant's ``end``, which are the witnesses of any escape (a selection that starts
outside contains its key; one that runs past ``end`` contains ``end``), so the finite
check is exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from pyetcd import etcdrpc

from etha.gateway.confine import (
    COMPACTED_MESSAGE,
    PERMISSION_DENIED_MESSAGE,
    REASONS,
    Denied,
    check_delete_range,
    check_put,
    check_range,
    check_range_request,
    check_txn,
    check_watch_create,
)
from etha.gateway.tenancy import tenant_range
from tests.support.protobuf_wire import varint

PREFIXES = ["a", "ns-1", "x.y", "t-0123abcd", "Z:9_"]

FIXED_UNIVERSE = [
    b"\0",
    b"\x01",
    b"-",
    b"/",
    b"0",
    b"a",
    b"z",
    b"\x7f",
    b"\xff",
    b"\xff\xff\xff\xff",
    b"!etha/registry/tenants/x",
]


def universe(prefix: str, *named: bytes) -> set[bytes]:
    start, end = tenant_range(prefix)
    p = prefix.encode()
    around = [
        p,
        p + b".",
        start,
        start + b"\0",
        start + b"k",
        start + b"\xff\xff",
        end,
        end + b"\0",
        end + b"k",
        p[:-1] + bytes([p[-1] + 1]),
        p[:-1] + bytes([p[-1] - 1]) + b"\xff",
    ]
    return {*FIXED_UNIVERSE, *around, *(k for k in named if k)}


def selected(key: bytes, range_end: bytes, keys: Iterable[bytes]) -> set[bytes]:
    """etcd's rule, by enumeration."""
    if range_end == b"":
        return {key} if key else set()
    if range_end == b"\0":
        return {k for k in keys if k >= key}
    return {k for k in keys if key <= k < range_end}


def oracle_allows(prefix: str, key: bytes, range_end: bytes) -> bool:
    start, end = tenant_range(prefix)
    if not key or not start <= key < end:
        return False
    return all(start <= k < end for k in selected(key, range_end, universe(prefix, key, range_end)))


def keys_for(prefix: str) -> st.SearchStrategy[bytes]:
    start, end = tenant_range(prefix)
    p = prefix.encode()
    anchors = [b"", p, start, end, p + b".", p[:-1], b"\xff\xff", start + b"\xff\xff"]
    inside = st.builds(lambda t: start + t, st.binary(max_size=4))
    return st.one_of(
        inside,
        inside,
        st.sampled_from([b"", b"\0", p, start, end, end + b"\0", start[:-1], b"\xff" * 8]),
        st.builds(lambda a, t: a + t, st.sampled_from(anchors), st.binary(max_size=3)),
        st.builds(
            lambda a, n, t: a + b"\xff" * n + t,
            st.sampled_from(anchors),
            st.integers(1, 6),
            st.sampled_from([b"", b"\0", b"\xff"]),
        ),
        st.binary(max_size=6),
    )


prefixes = st.sampled_from(PREFIXES)


def _decide(call: object) -> bool:
    """True if the check allowed the request, False if it raised a proper Denied."""
    assert callable(call)
    try:
        call()
    except Denied as exc:
        assert exc.code == grpc.StatusCode.PERMISSION_DENIED
        assert exc.message == PERMISSION_DENIED_MESSAGE
        assert exc.reason in REASONS
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(data=st.data(), prefix=prefixes)
def test_range_is_allowed_iff_the_oracle_selects_only_tenant_keys(
    data: st.DataObject, prefix: str
) -> None:
    start, end = tenant_range(prefix)
    key = data.draw(keys_for(prefix), label="key")
    range_end = data.draw(st.one_of(st.sampled_from([b"", b"\0"]), keys_for(prefix)), label="end")
    expected = oracle_allows(prefix, key, range_end)
    event("allowed" if expected else "refused")
    assert _decide(lambda: check_range(start, end, key, range_end)) == expected
    rr = etcdrpc.RangeRequest(key=key, range_end=range_end, limit=3, revision=5)
    assert _decide(lambda: check_range_request(start, end, rr)) == expected
    dr = etcdrpc.DeleteRangeRequest(key=key, range_end=range_end, prev_kv=True)
    assert _decide(lambda: check_delete_range(start, end, dr)) == expected
    wc = etcdrpc.WatchCreateRequest(key=key, range_end=range_end, prev_kv=True, filters=[0])
    assert _decide(lambda: check_watch_create(start, end, wc)) == expected


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_boundary_cases_by_name(prefix: str) -> None:
    start, end = tenant_range(prefix)
    p = prefix.encode()
    allowed = [
        (start, b""),  # the prefix key itself, "<p>/"
        (start, end),  # the whole tenant range
        (start + b"k", b""),
        (start + b"\xff\xff", end),
        (start + b"k", start + b"k\0"),
        (start + b"z", start + b"a"),  # range_end <= key: etcd selects nothing
    ]
    refused = [
        (b"", b""),  # empty key
        (b"", end),
        (start, b"\0"),  # from-key: every key >= <p>/
        (start + b"\xff", b"\0"),
        (start, end + b"\0"),  # one key past the range
        (start, b"\xff"),
        (p, b""),  # the prefix without its slash
        (p, end),  # starts just below the range
        (end, b""),  # "<p>0", first key past the range
        (end, end + b"\0"),
        (p[:-1] + bytes([p[-1] - 1]) + b"\xff", end),
    ]
    for key, range_end in allowed:
        check_range(start, end, key, range_end)
        assert oracle_allows(prefix, key, range_end), (key, range_end)
    for key, range_end in refused:
        with pytest.raises(Denied):
            check_range(start, end, key, range_end)
        assert not oracle_allows(prefix, key, range_end), (key, range_end)


@settings(max_examples=500, deadline=None)
@given(data=st.data(), prefix=prefixes, lease=st.sampled_from([0, 0, 1, -1, 2**62]))
def test_put_is_allowed_iff_its_key_is_inside_and_it_has_no_lease(
    data: st.DataObject, prefix: str, lease: int
) -> None:
    start, end = tenant_range(prefix)
    key = data.draw(keys_for(prefix))
    request = etcdrpc.PutRequest(key=key, value=b"v", lease=lease, prev_kv=True)
    expected = oracle_allows(prefix, key, b"") and lease == 0
    assert _decide(lambda: check_put(start, end, request)) == expected
    if oracle_allows(prefix, key, b"") and lease:
        with pytest.raises(Denied) as info:
            check_put(start, end, request)
        assert info.value.reason == "lease"


# A Txn shape: (compares, success ops, failure ops); an op is ("range"|"delete", key,
# end), ("put", key, lease), ("txn", shape) or ("empty",).
def _ops(prefix: str, depth: int) -> st.SearchStrategy[tuple[object, ...]]:
    k = keys_for(prefix)
    ends = st.one_of(st.sampled_from([b"", b"\0"]), k)
    leaf = st.one_of(
        st.tuples(st.just("range"), k, ends),
        st.tuples(st.just("delete"), k, ends),
        st.tuples(st.just("put"), k, st.sampled_from([0, 0, 0, 7])),
        st.tuples(st.just("empty")),
    )
    if depth == 0:
        return leaf
    return st.one_of(leaf, st.tuples(st.just("txn"), _txns(prefix, depth - 1)))


def _txns(prefix: str, depth: int) -> st.SearchStrategy[tuple[object, ...]]:
    k = keys_for(prefix)
    compares = st.lists(st.tuples(k, st.one_of(st.sampled_from([b"", b"\0"]), k)), max_size=3)
    ops = st.lists(_ops(prefix, depth), max_size=4)
    return st.tuples(compares, ops, ops)


def _build(shape: tuple[object, ...]) -> etcdrpc.TxnRequest:
    compares, success, failure = shape
    txn = etcdrpc.TxnRequest()
    for key, range_end in compares:  # type: ignore[attr-defined]
        txn.compare.append(
            etcdrpc.Compare(
                key=key,
                range_end=range_end,
                target=etcdrpc.Compare.VERSION,
                result=etcdrpc.Compare.GREATER,
                version=0,
            )
        )
    for branch, ops in ((txn.success, success), (txn.failure, failure)):
        for op in ops:  # type: ignore[attr-defined]
            kind = op[0]
            if kind == "range":
                branch.append(
                    etcdrpc.RequestOp(
                        request_range=etcdrpc.RangeRequest(key=op[1], range_end=op[2])
                    )
                )
            elif kind == "delete":
                branch.append(
                    etcdrpc.RequestOp(
                        request_delete_range=etcdrpc.DeleteRangeRequest(key=op[1], range_end=op[2])
                    )
                )
            elif kind == "put":
                branch.append(
                    etcdrpc.RequestOp(
                        request_put=etcdrpc.PutRequest(key=op[1], value=b"v", lease=op[2])
                    )
                )
            elif kind == "txn":
                branch.append(etcdrpc.RequestOp(request_txn=_build(op[1])))
            else:
                branch.append(etcdrpc.RequestOp())
    return txn


def _txn_oracle(prefix: str, shape: tuple[object, ...]) -> bool:
    compares, success, failure = shape
    for key, range_end in compares:  # type: ignore[attr-defined]
        if not oracle_allows(prefix, key, range_end):
            return False
    for op in (*success, *failure):  # type: ignore[misc]
        kind = op[0]
        if kind in ("txn", "empty"):  # nested Txns refused at any depth; no empty ops
            return False
        if kind == "put":
            if op[2] != 0 or not oracle_allows(prefix, op[1], b""):
                return False
        elif not oracle_allows(prefix, op[1], op[2]):
            return False
    return True


def _depth(shape: tuple[object, ...]) -> int:
    _, success, failure = shape
    inner = [_depth(op[1]) for op in (*success, *failure) if op[0] == "txn"]  # type: ignore[misc]
    return 1 + max(inner, default=0)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), prefix=prefixes, depth=st.integers(0, 5))
def test_txn_is_allowed_iff_every_compare_and_op_is_and_none_is_nested(
    data: st.DataObject, prefix: str, depth: int
) -> None:
    start, end = tenant_range(prefix)
    shape = data.draw(_txns(prefix, depth))
    txn = _build(shape)
    # Through the wire, as the gateway sees it.
    txn = etcdrpc.TxnRequest.FromString(txn.SerializeToString())
    expected = _txn_oracle(prefix, shape)
    event(f"depth {_depth(shape)}: {'allowed' if expected else 'refused'}")
    assert _decide(lambda: check_txn(start, end, txn)) == expected


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("op", ["range", "put", "delete"])
def test_nested_txn_is_refused_even_when_everything_in_it_is_inside(depth: int, op: str) -> None:
    start, end = tenant_range("a")
    inner_key = start + b"mine"
    leaf = {
        "range": etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=inner_key)),
        "put": etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=inner_key, value=b"v")),
        "delete": etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=inner_key)),
    }[op]
    txn = etcdrpc.TxnRequest(success=[leaf])
    check_txn(start, end, txn)  # flat: allowed
    for _ in range(depth):
        txn = etcdrpc.TxnRequest(failure=[etcdrpc.RequestOp(request_txn=txn)])
    with pytest.raises(Denied) as info:
        check_txn(start, end, txn)
    assert info.value.reason == "nested_txn"


def test_compare_range_end_is_checked() -> None:
    start, end = tenant_range("a")
    inside = etcdrpc.Compare(key=start, range_end=end, target=etcdrpc.Compare.VERSION)
    check_txn(start, end, etcdrpc.TxnRequest(compare=[inside]))
    for key, range_end, reason in (
        (start, b"\0", "from_key_range"),
        (start, end + b"\0", "range_outside_prefix"),
        (b"b/secret", b"", "key_outside_prefix"),
        (b"", b"", "empty_key"),
    ):
        compare = etcdrpc.Compare(key=key, range_end=range_end, target=etcdrpc.Compare.VALUE)
        with pytest.raises(Denied) as info:
            check_txn(start, end, etcdrpc.TxnRequest(compare=[compare]))
        assert info.value.reason == reason


def _with_unknown(message: bytes, field: int) -> bytes:
    return message + varint(field << 3 | 0) + b"\x01"  # varint field `field` = 1


@pytest.mark.parametrize("field", [7, 8])
def test_watch_create_allows_watch_id_and_fragment(field: int) -> None:
    start, end = tenant_range("a")
    raw = _with_unknown(
        etcdrpc.WatchCreateRequest(key=start, range_end=end).SerializeToString(), field
    )
    check_watch_create(start, end, etcdrpc.WatchCreateRequest.FromString(raw))


@pytest.mark.parametrize(
    "kind",
    ["range", "put", "delete", "watch9", "compare", "txn", "requestop"],
)
def test_fields_the_gateway_does_not_know_are_refused(kind: str) -> None:
    start, end = tenant_range("a")
    key = start + b"k"
    calls = {
        "range": lambda raw: check_range_request(
            start, end, etcdrpc.RangeRequest.FromString(raw(etcdrpc.RangeRequest(key=key), 15))
        ),
        "put": lambda raw: check_put(
            start, end, etcdrpc.PutRequest.FromString(raw(etcdrpc.PutRequest(key=key), 7))
        ),
        "delete": lambda raw: check_delete_range(
            start,
            end,
            etcdrpc.DeleteRangeRequest.FromString(raw(etcdrpc.DeleteRangeRequest(key=key), 4)),
        ),
        "watch9": lambda raw: check_watch_create(
            start,
            end,
            etcdrpc.WatchCreateRequest.FromString(raw(etcdrpc.WatchCreateRequest(key=key), 9)),
        ),
        "compare": lambda raw: check_txn(
            start,
            end,
            etcdrpc.TxnRequest(
                compare=[etcdrpc.Compare.FromString(raw(etcdrpc.Compare(key=key), 20))]
            ),
        ),
        "txn": lambda raw: check_txn(
            start, end, etcdrpc.TxnRequest.FromString(raw(etcdrpc.TxnRequest(), 5))
        ),
        "requestop": lambda raw: check_txn(
            start,
            end,
            etcdrpc.TxnRequest(
                success=[
                    etcdrpc.RequestOp.FromString(
                        raw(
                            etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key)),
                            9,
                        )
                    )
                ]
            ),
        ),
    }
    with pytest.raises(Denied) as info:
        calls[kind](lambda message, field: _with_unknown(message.SerializeToString(), field))
    assert info.value.reason == "unknown_field"


@settings(max_examples=200, deadline=None)
@given(prefix=prefixes, tail=st.binary(max_size=4))
@example(prefix="a", tail=b"")
def test_every_other_tenant_key_is_refused(prefix: str, tail: bytes) -> None:
    """For every pair of distinct prefixes: B's keys are never inside A's range."""
    start, end = tenant_range(prefix)
    for other in PREFIXES:
        if other == prefix:
            continue
        other_start, _ = tenant_range(other)
        with pytest.raises(Denied):
            check_range(start, end, other_start + tail, b"")


@settings(max_examples=300, deadline=None)
@given(
    revision=st.integers(-3, 40),
    floor=st.integers(0, 30),
    kind=st.sampled_from(["range", "txn", "watch"]),
)
@example(revision=9, floor=10, kind="range")
@example(revision=10, floor=10, kind="watch")
@example(revision=0, floor=10, kind="txn")
def test_history_before_the_tenant_is_refused_as_compacted(
    revision: int, floor: int, kind: str
) -> None:
    """A reused prefix's old revisions hold the previous owner's data: below the floor,
    a read is answered as etcd answers a compacted revision."""
    start, end = tenant_range("a")
    key = start + b"k"
    if kind == "range":
        call = lambda: check_range_request(  # noqa: E731
            start, end, etcdrpc.RangeRequest(key=key, revision=revision), floor=floor
        )
    elif kind == "txn":
        op = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key, revision=revision))
        call = lambda: check_txn(  # noqa: E731
            start, end, etcdrpc.TxnRequest(failure=[op]), floor=floor
        )
    else:
        call = lambda: check_watch_create(  # noqa: E731
            start, end, etcdrpc.WatchCreateRequest(key=key, start_revision=revision), floor=floor
        )
    if 0 < revision < floor:
        with pytest.raises(Denied) as info:
            call()
        assert info.value.reason == "revision_before_tenant"
        assert info.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert info.value.message == COMPACTED_MESSAGE
    else:
        call()
