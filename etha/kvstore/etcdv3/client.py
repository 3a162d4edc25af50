"""The etcd v3 client: unary calls, their size check, error mapping and compare-and-swap.

One :class:`EtcdClient` is a :class:`~etha.kvstore.etcdv3.transport.Transport` (one gRPC
channel per endpoint, the auth token, failover) plus the shared
:class:`~etha.kvstore.etcdv3.watch.WatchHub`. It is thread-safe. :meth:`EtcdClient.shared`
hands out one ref-counted client per process and configuration, so that many stores
reuse one authenticated channel and one watch stream.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc
from pyetcd import etcdrpc

from etha.kvstore.config import EtcdConfig
from etha.kvstore.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    InvalidValueError,
    KVStoreError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
)
from etha.kvstore.etcdv3.transport import (
    DEFAULT_MAX_REQUEST_BYTES,
    UNARY_SERVICES,
    CallObserver,
    Connection,
    Transport,
    normalize_endpoints,
    prefix_range_end,
)
from etha.kvstore.etcdv3.watch import WatchHub

#: etcd wraps each request in an internal raft request (a header of a few dozen bytes)
#: and compares *that* with ``--max-request-bytes``; keep this much room so a request
#: accepted here is not refused by the server.
RAFT_OVERHEAD_BYTES = 128
#: etcd's default ``--max-txn-ops``.
MAX_TXN_OPS = 128

_TOO_LARGE = ("request is too large", "message larger than max", "exceeds maximum")
_NO_SPACE = "database space exceeded"
#: etcd reports a missing user, role or lease as "... not found" (mostly with code
#: FAILED_PRECONDITION), and a duplicate as "... already exists".
_NOT_FOUND = "not found"
_ALREADY_EXISTS = "already exists"
#: Trailing metadata an etha gateway adds to a quota refusal: the quota's name.
QUOTA_METADATA_KEY = "etha-quota"

_EQUAL = etcdrpc.Compare.EQUAL
_GREATER = etcdrpc.Compare.GREATER
_MOD = etcdrpc.Compare.MOD
_CREATE = etcdrpc.Compare.CREATE


class CasResult(NamedTuple):
    """The outcome of :meth:`EtcdClient.compare_and_put`."""

    #: True when the put was applied
    succeeded: bool
    #: the transaction's revision (the put's ``mod_revision`` when it succeeded)
    revision: int
    #: on failure: the key's current ``KeyValue`` as read in the same transaction (None
    #: when it does not exist); on success None
    current: Any


def absent(key: bytes) -> Any:
    """A Txn compare that holds while ``key`` does not exist."""
    return etcdrpc.Compare(result=_EQUAL, target=_CREATE, key=key, create_revision=0)


def present(key: bytes) -> Any:
    """A Txn compare that holds while ``key`` exists."""
    return etcdrpc.Compare(result=_GREATER, target=_CREATE, key=key, create_revision=0)


def unchanged(key: bytes, mod_revision: int) -> Any:
    """A Txn compare that holds while ``key`` was last written at ``mod_revision``."""
    return etcdrpc.Compare(result=_EQUAL, target=_MOD, key=key, mod_revision=mod_revision)


def put_op(key: bytes, value: bytes) -> Any:
    """A Txn operation that puts ``value`` at ``key``."""
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value))


def delete_op(key: bytes, range_end: bytes | None = None) -> Any:
    """A Txn operation that deletes ``key`` (or ``[key, range_end)``)."""
    request = etcdrpc.DeleteRangeRequest(key=key)
    if range_end is not None:
        request.range_end = range_end
    return etcdrpc.RequestOp(request_delete_range=request)


def range_op(key: bytes) -> Any:
    """A Txn operation that reads ``key``."""
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))


class EtcdClient(Transport):
    """Thread-safe etcd v3 client; one per process per config is enough (see :meth:`shared`).

    Takes the arguments of :class:`~etha.kvstore.etcdv3.transport.Transport`: among them
    ``max_request_bytes`` (larger requests are refused here with
    :class:`InvalidValueError` before anything is sent) and ``on_call``, an observer told
    of every call (how long it took, how it failed), e.g. for metrics.
    """

    _shared_lock = threading.Lock()
    _shared_clients: dict[tuple[Any, ...], EtcdClient] = {}
    _hub: WatchHub | None = None
    _shared_key: tuple[Any, ...] | None = None
    _refs = 0

    # -- construction and lifetime -----------------------------------------------------

    @classmethod
    def from_config(cls, config: EtcdConfig, *, on_call: CallObserver | None = None) -> EtcdClient:
        """A new (unshared) client for ``config``; ``on_call`` as for :class:`Transport`."""
        return cls(config.endpoints, on_call=on_call, **config.connection())

    @staticmethod
    def _config_key(config: EtcdConfig) -> tuple[Any, ...]:
        # Namespace and component are not part of the connection; the pid keeps a forked
        # child from reusing its parent's channels.
        return (os.getpid(), config.endpoints, *config.connection().values())

    @classmethod
    def shared(cls, config: EtcdConfig) -> EtcdClient:
        """The process-wide client for ``config``'s connection settings, ref-counted.

        Every call must be paired with one :meth:`release`; the client closes when the
        last holder releases it.
        """
        key = cls._config_key(config)
        with cls._shared_lock:
            client = cls._shared_clients.get(key)
            if client is None or client.closed:
                client = cls.from_config(config)
                client._shared_key = key
                cls._shared_clients[key] = client
            client._refs += 1
            return client

    def release(self) -> None:
        """Drop one reference taken by :meth:`shared`; close on the last one.

        On a client that was not obtained from :meth:`shared` this is :meth:`close`.
        """
        with EtcdClient._shared_lock:
            if self._shared_key is not None:
                self._refs -= 1
                if self._refs > 0:
                    return
                if EtcdClient._shared_clients.get(self._shared_key) is self:
                    del EtcdClient._shared_clients[self._shared_key]
        self.close()

    def close(self) -> None:
        """Stop the watch hub (joining its thread) and close every channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            hub, self._hub = self._hub, None
        if hub is not None:
            hub.close()
        self._close_channels()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        endpoints = ",".join(str(e) for e in self._endpoints)
        return (
            f"EtcdClient(endpoints={endpoints!r}, username={self.username!r},"
            f" tls={self.tls}, closed={self._closed})"
        )

    @property
    def watch_hub(self) -> WatchHub:
        """The client's one watch stream, created on first use."""
        hub = self._hub
        if hub is not None:
            return hub
        with self._lock:
            self.check_open()
            if self._hub is None:
                self._hub = WatchHub(self)
            return self._hub

    def watch_trouble(self) -> str | None:
        """What is wrong with the watch stream (for error messages), or None when it is
        connected or was never started."""
        hub = self._hub
        return None if hub is None or hub.connected else hub.describe()

    # -- calls ---------------------------------------------------------------------------

    def call(self, service: str, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Unary RPC, e.g. ``call("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(...))``.

        ``service`` is one of KV, Lease, Cluster, Maintenance, Auth. The auth token goes
        as ``token`` metadata; an expired or invalid token causes one new login; an
        ``UNAVAILABLE`` endpoint is failed over to the next one (with backoff once all
        were tried) until ``timeout`` (default: the client's) runs out.

        With several endpoints, a member that does not answer in time is left too: a
        call that leaves the same state when repeated (reads, puts, deletes, a Txn
        without compares) gives each attempt a third of ``timeout`` or of the client's
        timeout, whichever is shorter (at least 1 s), and retries on the next member;
        any call that times out moves later calls to the next member. A Txn with
        compares is never re-sent after it may have arrived.

        :raises InvalidValueError: the serialized request exceeds ``max_request_bytes``
            (nothing is sent), or the server refused it as too large
        :raises PermissionDeniedError: bad credentials, or the user may not do this
        :raises UnavailableError: no endpoint answered within the timeout
        :raises KVTimeoutError: the request did not complete within the timeout
        :raises KVStoreError: any other server error (its message is kept)
        """
        if service not in UNARY_SERVICES:
            raise InvalidArgumentError(
                f"etcd service {service!r} is not one of {sorted(UNARY_SERVICES)}"
            )
        self.check_size(request, f"{service}.{method}")
        return self.send(service, method, request, timeout)

    def check_size(self, request: Any, what: str, subject: str = "") -> None:
        """Refuse ``request`` before sending when etcd would refuse it as too large.

        The one size check of the etcd backend: the serialized request plus etcd's raft
        header must fit in ``max_request_bytes``.

        :param what: the call (``"KV.Put"``); ``subject`` what it carries, for the message
        :raises InvalidValueError: the request is too large
        """
        size = request.ByteSize()
        if size + RAFT_OVERHEAD_BYTES > self.max_request_bytes:
            raise InvalidValueError(
                f"etcd {what} request{subject} is {size} bytes; the server limit is"
                f" {self.max_request_bytes} bytes (--max-request-bytes, less"
                f" {RAFT_OVERHEAD_BYTES} bytes of overhead): store smaller values or use"
                " shorter keys"
            )

    def _map_error(
        self,
        service: str,
        method: str,
        exc: grpc.RpcError,
        conn: Connection,
    ) -> KVStoreError:
        """Map a server's refusal to etha's error types (the one place that reads etcd's
        messages: etcd reports most refusals as UNKNOWN with a message)."""
        code: grpc.StatusCode = exc.code()
        details: str = exc.details() or ""
        quota = _quota_name(exc)
        where = f"etcd {service}.{method} at {conn.endpoint}"
        if quota is not None and code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            # An etha gateway's per-tenant quota: the message says which and what to do.
            return QuotaExceededError(f"{where}: {details}", quota=quota)
        if _NO_SPACE in details:
            return QuotaExceededError(
                f"{where}: etcd is full ({details}): its database reached --quota-backend-bytes;"
                " the etcd operator must compact, defragment and disarm the NOSPACE alarm"
                " (or raise the quota) before writes succeed again",
                quota="etcd_space",
            )
        if code is grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
            who = f"user {self.username!r}" if self.username else "this client"
            return PermissionDeniedError(
                f"{where}: permission denied for {who} ({details}); ask for a role that"
                " grants this key range"
            )
        if "authentication failed" in details or code is grpc.StatusCode.UNAUTHENTICATED:
            return PermissionDeniedError(
                f"{where}: authentication failed for user {self.username!r} ({details});"
                " check the username and password (ETHA_KV_USERNAME/ETHA_KV_PASSWORD)"
            )
        if code is grpc.StatusCode.NOT_FOUND or _NOT_FOUND in details:
            return NotFoundError(f"{where}: {details}")
        if code is grpc.StatusCode.ALREADY_EXISTS or _ALREADY_EXISTS in details:
            return AlreadyExistsError(f"{where}: {details}")
        if any(t in details for t in _TOO_LARGE):
            return InvalidValueError(
                f"{where}: the server refused the request as too large ({details});"
                " store smaller values"
            )
        return KVStoreError(f"{where} failed: {code.name}: {details}")

    # -- convenience wrappers --------------------------------------------------------------

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        keys_only: bool = False,
        count_only: bool = False,
        limit: int = 0,
        revision: int = 0,
        serializable: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """``KV.Range``: one key, or ``[key, range_end)``; returns the RangeResponse."""
        if range_end or keys_only or count_only or limit or revision or serializable:
            request = etcdrpc.RangeRequest(
                key=key,
                range_end=range_end or b"",
                keys_only=keys_only,
                count_only=count_only,
                limit=limit,
                revision=revision,
                serializable=serializable,
            )
        else:
            # One key at the latest revision, the hot path of get(): only the key is set.
            request = etcdrpc.RangeRequest(key=key)
        self.check_size(request, "KV.Range", f" for key {key[:80]!r}")
        return self.send("KV", "Range", request, timeout)

    def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> Any:
        """``KV.Put``; returns the PutResponse.

        :raises InvalidValueError: key and value exceed ``max_request_bytes`` (not sent)
        """
        request = etcdrpc.PutRequest(key=key, value=value)
        self.check_size(request, "KV.Put", f" of {len(value)} bytes to {key[:80]!r}")
        return self.send("KV", "Put", request, timeout)

    def delete_range(
        self, key: bytes, range_end: bytes | None = None, *, timeout: float | None = None
    ) -> int:
        """``KV.DeleteRange``; returns the number of keys deleted."""
        request = etcdrpc.DeleteRangeRequest(key=key)
        if range_end:
            request.range_end = range_end
        self.check_size(request, "KV.DeleteRange", f" for key {key[:80]!r}")
        return int(self.send("KV", "DeleteRange", request, timeout).deleted)

    def txn(self, request: Any, *, timeout: float | None = None) -> Any:
        """``KV.Txn`` (at most 128 operations by default); returns the TxnResponse."""
        return self.call("KV", "Txn", request, timeout=timeout)

    def compare_and_put(
        self,
        key: bytes,
        value: bytes,
        mod_revision: int | None,
        *,
        compare: Sequence[Any] = (),
        also: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> CasResult:
        """Put ``value`` at ``key`` if the key is unchanged: one etcd transaction.

        :param mod_revision: the key's ``mod_revision`` as read; None: put only if the
            key does not exist
        :param compare: further compares the transaction needs (all must hold)
        :param also: further operations applied with the put (after it)
        :returns: whether it was applied, the transaction's revision, and on failure
            the key's current ``KeyValue`` (None if absent), read in the same transaction
        :raises UnavailableError: the answer was lost; the put may or may not have been
            applied (it is never re-sent): read the key before retrying
        """
        guard = absent(key) if mod_revision is None else unchanged(key, mod_revision)
        response = self.txn(
            etcdrpc.TxnRequest(
                compare=[guard, *compare],
                success=[put_op(key, value), *also],
                failure=[range_op(key)],
            ),
            timeout=timeout,
        )
        revision = int(response.header.revision)
        if response.succeeded:
            return CasResult(True, revision, None)
        kvs = response.responses[0].response_range.kvs
        return CasResult(False, revision, kvs[0] if kvs else None)


def _quota_name(exc: grpc.RpcError) -> str | None:
    """The ``etha-quota`` trailing metadata of a gateway's quota refusal, if any."""
    trailing = getattr(exc, "trailing_metadata", None)
    try:
        metadata = trailing() if trailing is not None else None
    except Exception:  # a failed call without a server answer has none
        return None
    for key, value in metadata or ():
        if key == QUOTA_METADATA_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_TXN_OPS",
    "QUOTA_METADATA_KEY",
    "RAFT_OVERHEAD_BYTES",
    "CallObserver",
    "CasResult",
    "EtcdClient",
    "absent",
    "delete_op",
    "normalize_endpoints",
    "prefix_range_end",
    "present",
    "put_op",
    "range_op",
    "unchanged",
]
