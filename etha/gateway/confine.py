"""Request confinement: may a tenant send this etcd request? (pure: no I/O, no server).

A tenant owns the byte range ``[start, end)`` = ``[<prefix>/, <prefix>0)`` (see
:func:`etha.gateway.tenancy.tenant_range`). Every check here follows etcd's own range
rules, so that what the gateway allows is exactly what etcd then selects:

* ``range_end == b""``: the single key ``key``;
* ``range_end == b"\\0"``: every key ``>= key`` (the "from key" form). It reaches the
  top of the keyspace, so it ALWAYS escapes a tenant range and is always refused;
* otherwise ``[key, range_end)``; when ``range_end <= key`` etcd selects nothing.

A request is allowed iff its ``key`` is inside the tenant range (an empty key is
outside) and every key it can select is inside too. Requiring the named key to be
inside even when the selection is empty costs a tenant nothing and keeps the rule
simple to audit; it is what etcd's RBAC does as well.

Beyond ranges:

* ``Put`` with a lease is refused (reason ``lease``): tenants have no leases, and a
  lease id names a cluster-wide object another tenant may own.
* ``Txn``: every compare (``key`` and ``compare.range_end``, same rules) and every op
  of ``success`` and ``failure`` is checked. A nested ``request_txn`` is refused
  outright (reason ``nested_txn``), at any depth: etcd 3.5 does not permission-check
  nested Txns, etha's clients never send them, and refusing them keeps one flat list of
  ops for quota accounting. An op with no request set is refused (``empty_op``). The
  128-ops limit is left to etcd, which refuses larger Txns itself.
* Watch creation: the range as above; ``start_revision``, ``progress_notify``,
  ``filters``, ``prev_kv``, ``watch_id`` and ``fragment`` are allowed.
* History from before the tenant existed is refused (reason ``revision_before_tenant``):
  a Range (also inside a Txn) at ``revision`` or a watch from ``start_revision`` below
  ``floor``, the revision at which the tenant's record was created. A prefix can be
  owned by a deleted KVNamespace first and by a new one later; until etcd compacts,
  the old revisions still hold the first owner's values, and reading them is reading
  another tenant's data. The answer is etcd's for a compacted revision (OUT_OF_RANGE
  "etcdserver: mvcc: required revision has been compacted"): for the tenant, that
  history does not exist. ``floor=0`` turns the check off.
* Fields this module does not know are refused (reason ``unknown_field``), at any
  depth: the gateway forwards the parsed message, so a field added to etcd's API after
  these checks were written would otherwise pass through unchecked. The one exception
  is ``WatchCreateRequest``'s ``watch_id`` (7) and ``fragment`` (8), which etcd 3.5
  defines but the bundled protobuf descriptors predate.

Every denial is :class:`Denied` with etcd's own code and message for the case
(``PERMISSION_DENIED``, ``"etcdserver: permission denied"``), so clients react as they
would to etcd, plus a short ``reason`` for metrics. ``reason`` never contains a key.
"""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from pyetcd import etcdrpc

#: etcd's message for a request outside the caller's permissions.
PERMISSION_DENIED_MESSAGE: Final = "etcdserver: permission denied"

#: ``range_end`` meaning "every key >= key" (etcd's from-key form).
FROM_KEY: Final = b"\0"

#: Field numbers etcd 3.5 defines on WatchCreateRequest that the bundled descriptors lack.
_WATCH_CREATE_EXTRA_FIELDS: Final = frozenset({7, 8})  # watch_id, fragment

#: etcd's message for a read of a compacted revision.
COMPACTED_MESSAGE: Final = "etcdserver: mvcc: required revision has been compacted"

#: The machine labels :attr:`Denied.reason` takes (stable: metric label values).
REASONS: Final = (
    "empty_key",
    "key_outside_prefix",
    "range_outside_prefix",
    "from_key_range",
    "lease",
    "nested_txn",
    "empty_op",
    "unknown_field",
    "revision_before_tenant",
)


class Denied(Exception):
    """A request the tenant may not send; the gateway answers it with ``code``/``message``.

    This is the gateway's internal signal, turned into a gRPC status before it leaves
    the server; library callers see etcd's error (``PermissionDeniedError``), never this.
    (It is not a ``KVStoreError``: there ``code`` is a status name string, here it is
    the ``grpc.StatusCode`` the servicer aborts with.)

    :param reason: one of :data:`REASONS`; safe as a metric label (never names a key)
    """

    code: grpc.StatusCode
    message: str
    reason: str

    def __init__(
        self,
        reason: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED,
        message: str = PERMISSION_DENIED_MESSAGE,
    ) -> None:
        super().__init__(f"{message} ({reason})")
        self.code = code
        self.message = message
        self.reason = reason


def _check_known_fields(message: Message, allowed_unknown: frozenset[int] = frozenset()) -> None:
    """Refuse a message (this level only) carrying fields outside its descriptor."""
    unknown = UnknownFieldSet(message)
    for index in range(len(unknown)):
        if unknown[index].field_number not in allowed_unknown:
            raise Denied("unknown_field")


def check_range(start: bytes, end: bytes, key: bytes, range_end: bytes) -> None:
    """Allow ``(key, range_end)`` only if it names and selects keys in ``[start, end)``.

    :raises Denied: ``empty_key``, ``key_outside_prefix``, ``from_key_range`` or
        ``range_outside_prefix``
    """
    if not key:
        raise Denied("empty_key")
    if not start <= key < end:
        raise Denied("key_outside_prefix")
    if range_end == b"":
        return
    if range_end == FROM_KEY:
        raise Denied("from_key_range")
    # [key, range_end) with start <= key: inside iff range_end <= end (or it is empty).
    if range_end > end:
        raise Denied("range_outside_prefix")


def check_revision(floor: int, revision: int) -> None:
    """Refuse a read of history older than the tenant (``0 < revision < floor``).

    :raises Denied: ``revision_before_tenant``, as etcd answers a compacted revision
    """
    if 0 < revision < floor:
        raise Denied(
            "revision_before_tenant",
            code=grpc.StatusCode.OUT_OF_RANGE,
            message=COMPACTED_MESSAGE,
        )


def check_range_request(
    start: bytes, end: bytes, request: etcdrpc.RangeRequest, *, floor: int = 0
) -> None:
    """``KV.Range``: the range, and no revision before ``floor`` (see the module doc).

    Limits, sorting and the revision filters are the tenant's business.
    """
    _check_known_fields(request)
    check_range(start, end, request.key, request.range_end)
    check_revision(floor, request.revision)


def check_put(start: bytes, end: bytes, request: etcdrpc.PutRequest) -> None:
    """``KV.Put``: the key must be inside; no lease (tenants have none).

    :raises Denied: as :func:`check_range`, or ``lease``
    """
    _check_known_fields(request)
    check_range(start, end, request.key, b"")
    if request.lease != 0:
        raise Denied("lease")


def check_delete_range(start: bytes, end: bytes, request: etcdrpc.DeleteRangeRequest) -> None:
    """``KV.DeleteRange``: the range, as :func:`check_range`."""
    _check_known_fields(request)
    check_range(start, end, request.key, request.range_end)


def _check_compare(start: bytes, end: bytes, compare: etcdrpc.Compare) -> None:
    # A compare reads its range (etcd applies compare.range_end like a Range's), so a
    # compare outside the prefix is an oracle on another tenant's keys.
    _check_known_fields(compare)
    check_range(start, end, compare.key, compare.range_end)


def _check_op(start: bytes, end: bytes, op: etcdrpc.RequestOp, floor: int) -> None:
    _check_known_fields(op)
    which = op.WhichOneof("request")
    if which == "request_range":
        check_range_request(start, end, op.request_range, floor=floor)
    elif which == "request_put":
        check_put(start, end, op.request_put)
    elif which == "request_delete_range":
        check_delete_range(start, end, op.request_delete_range)
    elif which == "request_txn":
        raise Denied("nested_txn")
    else:
        raise Denied("empty_op")


def check_txn(start: bytes, end: bytes, request: etcdrpc.TxnRequest, *, floor: int = 0) -> None:
    """``KV.Txn``: every compare and every op of both branches; nested Txns refused.

    :raises Denied: as the single-op checks, or ``nested_txn`` / ``empty_op``
    """
    _check_known_fields(request)
    for compare in request.compare:
        _check_compare(start, end, compare)
    for op in (*request.success, *request.failure):
        _check_op(start, end, op, floor)


def check_watch_create(
    start: bytes, end: bytes, request: etcdrpc.WatchCreateRequest, *, floor: int = 0
) -> None:
    """``Watch`` create: the range as :func:`check_range`; no ``start_revision`` < ``floor``.

    etcd turns an empty watch key into ``b"\\0"`` (the smallest key); here an empty key
    is refused like everywhere else.
    """
    _check_known_fields(request, _WATCH_CREATE_EXTRA_FIELDS)
    check_range(start, end, request.key, request.range_end)
    check_revision(floor, request.start_revision)


__all__ = [
    "COMPACTED_MESSAGE",
    "FROM_KEY",
    "PERMISSION_DENIED_MESSAGE",
    "REASONS",
    "Denied",
    "check_delete_range",
    "check_put",
    "check_range",
    "check_range_request",
    "check_revision",
    "check_txn",
    "check_watch_create",
]
