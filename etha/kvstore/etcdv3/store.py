"""The etcd v3 backend of :class:`~etha.kvstore.base.KVStore`.

Keys are stored as ``{namespace}/{component}/{key}`` (UTF-8); values are stored as the
bytes given (``set`` stores the UTF-8 encoding of its str), so ``get`` and
``get_bytes`` return the same thing. Waits read at a revision ``R`` and then watch
from ``R + 1`` on the client's shared watch stream: no polling, and no event between
the read and the watch is missed. Connected to an etha gateway, a wait is one
``Coordination.Wait`` call instead (the gateway evaluates it on its own watch, so a
barrier of N costs O(N), not N watchers times N events); plain etcd answers that call
UNIMPLEMENTED once per client, which then keeps using watches. See
``docs/etcd-backend.md``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyetcd import etcdrpc

from etha.kvstore import gateway_api as _gw
from etha.kvstore import keys as _keys
from etha.kvstore.base import (
    CheckedWaitsKVStore,
    KeysWait,
    check_bytes_value,
    check_str_value,
)
from etha.kvstore.config import (
    DEFAULT_COMPONENT,
    DEFAULT_TIMEOUT,
    Endpoint,
    EtcdConfig,
    tls_wanted,
)
from etha.kvstore.errors import (
    InvalidArgumentError,
    KVStoreError,
    KVTimeoutError,
    PermissionDeniedError,
    StoreClosedError,
    UnavailableError,
)
from etha.kvstore.etcdv3.client import MAX_TXN_OPS, EtcdClient, delete_op, normalize_endpoints
from etha.kvstore.etcdv3.wait import KeyView, PatternView, View, show, wait

#: Validated keys remembered per store object (rounds of a job reuse their keys).
_KEY_CACHE_SIZE = 4096
#: A gateway wait is given this much more than the caller's timeout, so that the
#: gateway's own answer (which says what it saw) arrives before gRPC's deadline.
_GATEWAY_MARGIN = 0.5

#: Clients whose server answered ``Coordination`` UNIMPLEMENTED (plain etcd): they wait
#: with watches from then on; no second try.
_NO_COORDINATION: weakref.WeakSet[EtcdClient] = weakref.WeakSet()
_NO_COORDINATION_LOCK = threading.Lock()


def coordination_supported(client: EtcdClient) -> bool:
    """False once ``client``'s server answered the Coordination service UNIMPLEMENTED."""
    return client not in _NO_COORDINATION


def note_no_coordination(client: EtcdClient) -> None:
    """Remember that ``client`` talks to plain etcd (no gateway extension)."""
    with _NO_COORDINATION_LOCK:
        _NO_COORDINATION.add(client)


T = TypeVar("T")


def gateway_add(client: EtcdClient, key: bytes, delta: int) -> int | None:
    """Add ``delta`` to the decimal integer at the full ``key`` through a gateway.

    The gateway batches concurrent adds of a key into one compare-and-swap transaction
    (``Coordination.Add``; see docs/gateway.md), so N concurrent callers cost O(N), not
    the O(N^2) transactions of N clients each looping on their own compare-and-swap.

    :returns: the new value; None when the server is plain etcd (remembered for the
        client: the caller then does its own compare-and-swap)
    :raises KVStoreError: the gateway's refusal (``code`` "FAILED_PRECONDITION": the key
        holds no integer), or UnavailableError when the answer was lost and the add may
        or may not have been applied (it is never re-sent)
    """
    if not coordination_supported(client):
        return None
    try:
        response = client.call("Coordination", "Add", _gw.AddRequest(key=key, delta=delta))
    except KVStoreError as exc:
        if exc.code == "UNIMPLEMENTED":
            note_no_coordination(client)
            return None
        raise
    return int(response.value)


class EtcdKVStore(CheckedWaitsKVStore):
    """KVStore on etcd v3.

    All stores of one process with the same connection settings share one
    :class:`EtcdClient` (one authenticated channel, one watch stream) through
    :meth:`EtcdClient.shared`; pass ``client`` to use a client you manage yourself
    (the store then never closes it).

    *Coordination keys* are the keys this store object wrote with :meth:`set` or
    :meth:`set_bytes` (and has not deleted since). ``close(cleanup=True)`` deletes exactly
    those keys; keys written by other store objects or processes are left alone.

    :param endpoints: ``"host:port"`` or ``"http(s)://host:port"``, a comma-separated
        string or a sequence of them
    :param tls: force TLS on or off; None (default) decides from the endpoint scheme and
        the TLS files given
    :param timeout: deadline of each request to etcd (failover and re-login included)
    """

    def __init__(
        self,
        namespace: str,
        component: str = DEFAULT_COMPONENT,
        *,
        endpoints: Sequence[str | Endpoint] | str,
        username: str | None = None,
        password: str | None = None,
        tls: bool | None = None,
        ca_file: str | None = None,
        ca_pem: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client: EtcdClient | None = None,
    ) -> None:
        super().__init__(namespace, component)
        self._lock = threading.Lock()
        self._tracked: set[bytes] = set()
        self._key_cache: dict[tuple[str, str | None], bytes] = {}
        self._closed = False
        if client is not None:
            self._client = client
            self._owns_client = False
        else:
            parsed, scheme_tls = normalize_endpoints(endpoints)
            if tls is None:
                tls = tls_wanted(scheme_tls, ca_file, ca_pem, cert_file)
            config = EtcdConfig(
                namespace=namespace,
                component=component,
                endpoints=tuple(parsed),
                username=username,
                password=password,
                tls=tls,
                ca_file=ca_file,
                ca_pem=ca_pem,
                cert_file=cert_file,
                key_file=key_file,
                timeout=float(timeout),
            )
            self._client = EtcdClient.shared(config)
            self._owns_client = True

    @classmethod
    def from_config(cls, config: EtcdConfig) -> EtcdKVStore:
        """Open a store for ``config`` (as parsed from ``ETHA_KV_*``)."""
        client = EtcdClient.shared(config)
        try:
            store = cls(config.namespace, config.component, endpoints=(), client=client)
        except BaseException:
            client.release()
            raise
        store._owns_client = True  # the shared reference taken above is the store's
        return store

    @property
    def client(self) -> EtcdClient:
        """The (possibly shared) low-level client of this store."""
        return self._client

    @property
    def coordination_keys(self) -> frozenset[str]:
        """The full keys that ``close(cleanup=True)`` would delete now."""
        with self._lock:
            return frozenset(k.decode() for k in self._tracked)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self!r} is closed; open a new store")

    # -- plain operations ----------------------------------------------------------------

    def get(self, key: str, *, component: str | None = None) -> bytes | None:
        """The value of ``key`` (bytes), or None if it does not exist."""
        self._check_open()
        full = self._key_bytes(key, component)
        kvs = self._client.range(full).kvs
        return kvs[0].value if kvs else None

    def get_bytes(self, key: str, *, component: str | None = None) -> bytes | None:
        """Same as :meth:`get` on etcd: values are stored as native bytes."""
        return self.get(key, component=component)

    def exists(self, key: str, *, component: str | None = None) -> bool:
        self._check_open()
        full = self._key_bytes(key, component)
        return bool(self._client.range(full, count_only=True).count)

    def set(self, key: str, value: str, *, component: str | None = None) -> None:
        """Store the UTF-8 encoding of ``value``; the key becomes a coordination key."""
        self._check_open()
        self._put(self._key_bytes(key, component), check_str_value(value))

    def set_bytes(self, key: str, data: bytes, *, component: str | None = None) -> None:
        """Store ``data`` as is; the key becomes a coordination key."""
        self._check_open()
        self._put(self._key_bytes(key, component), check_bytes_value(data))

    def _key_bytes(self, key: str, component: str | None) -> bytes:
        """The validated, encoded full key; validation is cached per store object."""
        try:
            return self._key_cache[(key, component)]
        except (KeyError, TypeError):  # TypeError: unhashable, and so invalid, input
            pass
        full = self._full_key(key, component).encode()
        cache = self._key_cache
        if len(cache) >= _KEY_CACHE_SIZE:
            cache.clear()
        cache[(key, component)] = full
        return full

    def _put(self, key: bytes, data: bytes) -> None:
        # The client refuses a put over --max-request-bytes before sending it.
        # Tracked before the put, so that a close() racing with this set still deletes
        # it; deleting a key whose put failed is harmless.
        with self._lock:
            new = key not in self._tracked
            self._tracked.add(key)
        try:
            self._client.put(key, data)
        except (PermissionDeniedError, InvalidArgumentError):
            # Refused for sure: nothing was written.
            if new:
                with self._lock:
                    self._tracked.discard(key)
            raise

    def delete(self, key: str, *, component: str | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        self._check_open()
        full = self._key_bytes(key, component)
        deleted = self._client.delete_range(full)
        with self._lock:
            self._tracked.discard(full)
        return deleted > 0

    # -- waits ---------------------------------------------------------------------------

    def _wait_for_value(self, full_key: str, want: bytes | None, timeout: float) -> bytes:
        """A read, then the watch from the read's revision (or the gateway's Wait).

        :raises KVTimeoutError: (a TimeoutError) when ``timeout`` seconds pass first
        """
        self._check_open()
        key = full_key.encode()
        if want is None:
            return self._wait(
                KeyView(key, None),
                timeout,
                f"key {full_key!r} to exist",
                _gw.WaitRequest(mode=_gw.MODE_KEY, key=key),
                lambda response: bytes(response.values[0]),
            )
        request = _gw.WaitRequest(mode=_gw.MODE_VALUE, key=key, value=want, has_value=True)
        what = f"key {full_key!r} to hold {show(want)}"
        return self._wait(KeyView(key, want), timeout, what, request, lambda _: want)

    def _wait_for_keys(self, wait: KeysWait) -> list[str]:
        """One prefix read (the pattern's literal prefix) plus a watch sees every key, so
        ``candidate_keys`` is ignored; ``*`` matches any characters, ``/`` included.

        :raises KVTimeoutError: (a TimeoutError) when the timeout passes first, saying how
            many keys were seen
        """
        self._check_open()
        comp_prefix, key_pattern = wait.prefix, wait.pattern
        count, want = wait.expected_count, wait.value
        prefix = (comp_prefix + _keys.literal_prefix(key_pattern)).encode()
        view = PatternView(prefix, len(comp_prefix.encode()), wait.regex, count, want, key_pattern)
        what = f"{count} keys matching {comp_prefix + key_pattern!r} to hold {show(want)}"
        strip = len(comp_prefix.encode())
        request = _gw.WaitRequest(
            mode=_gw.MODE_KEYS,
            key=prefix,
            range_end=view.range_end,
            pattern=(comp_prefix + key_pattern).encode(),
            count=count,
            value=want,
            has_value=True,
        )
        return self._wait(
            view,
            wait.timeout,
            what,
            request,
            lambda response: [k[strip:].decode("utf-8", "replace") for k in response.keys],
        )

    def _wait(
        self,
        view: View[T],
        timeout: float,
        what: str,
        request: Any = None,
        convert: Callable[[Any], T] | None = None,
    ) -> T:
        """Through a gateway: one ``Coordination.Wait``. Else read at revision R, then
        fold watch events from R + 1 until a result (:func:`etha.kvstore.etcdv3.wait.wait`).

        Each read starts a fresh view: after a compaction the old watch may still be
        folding into the old one.
        """
        deadline = time.monotonic() + timeout
        client = self._client
        if request is not None and convert is not None and coordination_supported(client):
            response = self._gateway_wait(request, timeout, what)
            if response is not None:
                return convert(response)

        def read() -> tuple[T | None, View[T], int]:
            remaining = deadline - time.monotonic()
            # A zero-timeout wait still gets one read.
            request_timeout = remaining if remaining > 0 else min(client.timeout, 1.0)
            try:
                response = client.range(view.key, view.range_end, timeout=request_timeout)
            except (UnavailableError, KVTimeoutError) as exc:
                if time.monotonic() < deadline:
                    raise
                raise KVTimeoutError(
                    f"timed out after {timeout:g}s waiting for {what}: {exc}"
                ) from exc
            loaded = view.fresh()
            return loaded.load(response.kvs), loaded, int(response.header.revision)

        def timed_out(seen: View[T], stream: str | None) -> KVTimeoutError:
            state = seen.seen() if stream is None else f"{seen.seen()}; {stream}"
            return KVTimeoutError(f"timed out after {timeout:g}s waiting for {what} ({state})")

        return wait(client, read, deadline, timed_out)

    def _gateway_wait(self, request: Any, timeout: float, what: str) -> Any | None:
        """``Coordination.Wait``; None when the server is plain etcd (remembered).

        A gateway replica that dies mid-wait is an UNAVAILABLE answer: the client
        re-issues the call on the next endpoint with the time left.
        """
        client = self._client
        try:
            return client.call("Coordination", "Wait", request, timeout=timeout + _GATEWAY_MARGIN)
        except KVStoreError as exc:
            if exc.code == "UNIMPLEMENTED":
                note_no_coordination(client)
                return None
            if isinstance(exc, KVTimeoutError) or (
                isinstance(exc, UnavailableError) and exc.code is None
            ):
                seen = exc.details if exc.details and "etha gateway" in exc.details else str(exc)
                raise KVTimeoutError(
                    f"timed out after {timeout:g}s waiting for {what} ({seen})"
                ) from exc
            raise

    # -- lifetime ------------------------------------------------------------------------

    def close(self, cleanup: bool = True) -> None:
        """Close the store; with ``cleanup`` delete its coordination keys first.

        Coordination keys are the keys this object wrote with :meth:`set` or
        :meth:`set_bytes` and did not delete. They are deleted in transactions of at most
        128 deletes. Then the shared client is released: when the last store of the
        process closes, its channels and watch thread are gone. Idempotent; any other
        method of a closed store raises :class:`StoreClosedError`.

        :raises KVStoreError: if the cleanup failed (the store is closed anyway)
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            tracked = sorted(self._tracked)
            self._tracked.clear()
        try:
            if cleanup and tracked:
                self._delete_keys(tracked)
        finally:
            if self._owns_client:
                self._client.release()

    def _delete_keys(self, keys: list[bytes]) -> None:
        for start in range(0, len(keys), MAX_TXN_OPS):
            chunk = keys[start : start + MAX_TXN_OPS]
            request = etcdrpc.TxnRequest(success=[delete_op(k) for k in chunk])
            try:
                self._client.txn(request)
            except KVStoreError as exc:
                raise type(exc)(
                    f"closing {self!r}: could not delete {len(keys)} coordination keys: {exc}"
                ) from exc


__all__ = [
    "MAX_TXN_OPS",
    "EtcdKVStore",
    "coordination_supported",
    "gateway_add",
    "note_no_coordination",
]
