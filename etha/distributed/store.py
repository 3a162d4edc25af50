"""A ``torch.distributed.Store`` on etcd, inside one etha namespace.

:class:`EthaStore` implements the c10d store contract the way torch's own stores behave
(checked side by side with a real ``TCPStore`` in ``tests/test_distributed_store.py``):

* ``set`` writes; ``get``, ``multi_get`` and ``wait`` block until every key exists, up
  to the store timeout (or the given one), then raise ``DistStoreError`` naming the
  missing keys. Blocking is driven by etcd watches, never by polling.
* ``add`` and ``append`` are atomic read-modify-write loops: one etcd transaction that
  compares the key's ``mod_revision`` (or its absence) and puts the new value.
* ``compare_set`` follows TCPStore: a missing key is set only when the expected value
  is empty (and the desired value is returned); a missing key with a non-empty expected
  value is left alone and the *expected* value is returned; an existing key is replaced
  when its value equals the expected one, else its current value is returned.
* ``check``, ``delete_key``, ``num_keys``, ``list_keys``, ``set_timeout``, ``multi_set``.
* Values up to :data:`MAX_VALUE_BYTES` (128 MiB); those over one chunk (1 MiB) are kept
  in chunks outside the store's key range and switched by one manifest transaction, so
  a reader never sees a torn value (see "chunked values" below and docs/torch.md).

Not supported: ``queue_push``/``queue_pop``/``queue_len`` (torch's trampoline for
Python stores does not forward them, so C++ callers could never reach an
implementation; torch raises ``NotImplementedError``).

Every key lives at ``{namespace}/{component}/[{scope}/]{torch key}`` (and the chunks of
large values next to the store's range, at ``{namespace}/{component}/[{scope}]!/...``):
inside the namespace prefix that the operator grants to the job's credentials and
deletes when the job ends. Nothing is written anywhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import operator
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist
from pyetcd import etcdrpc
from torch._C._distributed_c10d import PrefixStore as _PrefixStore
from torch._C._distributed_c10d import Store as _C10dStore

from etha.kvstore.config import EtcdConfig, parse_env
from etha.kvstore.errors import (
    ConfigurationError,
    InvalidKeyError,
    KVStoreError,
    UnavailableError,
)
from etha.kvstore.etcdv3.client import (
    MAX_TXN_OPS,
    EtcdClient,
    delete_op,
    prefix_range_end,
    present,
    put_op,
)
from etha.kvstore.etcdv3.store import gateway_add
from etha.kvstore.etcdv3.wait import REREAD, Reread, View, wait
from etha.kvstore.etcdv3.watch import PUT
from etha.kvstore.keys import validate_key, validate_name

#: The component an :class:`EthaStore` uses by default (``{namespace}/torch/...``).
STORE_COMPONENT = "torch"
#: The former name of :data:`STORE_COMPONENT` (kept for imports).
DEFAULT_COMPONENT = STORE_COMPONENT
#: torch's own default store timeout (c10d ``kDefaultTimeout``). ``ETHA_KV_TIMEOUT`` is the
#: deadline of one etcd request, not of a wait for another rank.
DEFAULT_TIMEOUT = timedelta(seconds=300)
#: Values up to this size are stored in their key; larger ones in chunks of this size
#: (etcd refuses requests over 1.5 MiB by default).
CHUNK_BYTES = 1024 * 1024
#: The largest value the store accepts: 128 chunks. Every replacement of a value also
#: stays in etcd's history until compaction, so far larger values belong elsewhere.
MAX_VALUE_BYTES = 128 * CHUNK_BYTES
#: Bytes of an etcd request left for keys, compares and framing when sizing chunks and
#: multi_set batches (the client's check_size is the one check; this only plans below it).
_REQUEST_HEADROOM = 65536
#: The smallest chunk (when the client's max_request_bytes is configured very low); it
#: keeps the chunk count, and the 5-digit chunk index, bounded.
_MIN_CHUNK_BYTES = 4096
#: The value of a key whose data is in chunks starts with this (then
#: ``{generation} {size} {count}``). A small value that starts with it is chunked too, so
#: a stored value is a manifest exactly when it starts with the mark.
_CHUNKED_MARK = b"\x00etha-chunked-v1\x00"
#: Chunks fetched per read of a chunked value (4 MiB per response).
_CHUNKS_PER_READ = 4
#: multi_set re-sends a transaction whose chunks a concurrent writer removed this often.
_MULTI_SET_ATTEMPTS = 5
#: The shortest deadline given to one etcd request (a wait with almost no time left
#: still gets one read).
_MIN_REQUEST_TIMEOUT = 0.05

_T = TypeVar("_T")
#: Backoff of a read-modify-write that keeps losing its compare-and-swap: after this many
#: losses, sleep a random time up to base * 2**losses, capped.
_BACKOFF_AFTER = 2
_BACKOFF_BASE = 0.0005
_BACKOFF_CAP = 0.02
_EQUAL = etcdrpc.Compare.EQUAL
_VALUE = etcdrpc.Compare.VALUE


def _as_bytes(value: str | bytes | bytearray | memoryview, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, got {type(value).__name__}")


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _int64_argument(value: object) -> int:
    """``value`` as torch's bindings convert an ``int64_t`` argument, else TypeError."""
    if isinstance(value, (float, str, bytes)) or not hasattr(value, "__index__"):
        raise TypeError(
            f"add() takes an int, got {type(value).__name__} {value!r}; pass an integer amount"
        )
    amount = operator.index(value)
    if not _INT64_MIN <= amount <= _INT64_MAX:
        raise TypeError(f"add() amount {amount} does not fit in a signed 64-bit integer")
    return amount


def _wrap_int64(total: int) -> int:
    """Two's-complement wrap-around, as torch's stores compute ``int64_t`` sums."""
    return (total - _INT64_MIN) % 2**64 + _INT64_MIN


def _seconds(timeout: timedelta | float | int) -> float:
    if isinstance(timeout, timedelta):
        return timeout.total_seconds()
    return float(timeout)


def _store_error(action: str, exc: KVStoreError) -> RuntimeError:
    """torch's error type for ``exc``, with etha's message.

    Unreachable etcd is ``DistNetworkError`` (what TCPStore raises when its server is
    gone); everything else is ``DistStoreError``. Both are ``RuntimeError``.
    """
    if isinstance(exc, UnavailableError):
        return dist.DistNetworkError(f"etha store: {action} failed: {exc}")
    return dist.DistStoreError(f"etha store: {action} failed: {exc}")


class _Stale(Exception):
    """A chunked value could not be read at its revision (compacted meanwhile): re-read."""


_delete_op = delete_op
_put_op = put_op


def _parse_manifest(stored: bytes) -> tuple[bytes, int, int] | None:
    """``(generation, size, count)`` of a well-formed manifest, else None."""
    parts = stored[len(_CHUNKED_MARK) :].split(b" ")
    if len(parts) != 3 or len(parts[0]) != 16 or not parts[1].isdigit():
        return None
    try:
        bytes.fromhex(parts[0].decode("ascii"))
        size, count = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if not 0 <= size <= MAX_VALUE_BYTES or not 0 < count <= MAX_VALUE_BYTES // _MIN_CHUNK_BYTES:
        return None
    return parts[0], size, count


# -- lifetime while torch holds the store ------------------------------------------------
#
# torch binds ``Store`` with an intrusive-pointer holder and a trampoline (``PythonStore``
# in torch/csrc/distributed/c10d/init.cpp). The Python object owns one reference to the
# C++ object; PrefixStore, process groups and clones own others, but nothing on the C++
# side owns the Python object. When the last Python reference goes, the Python half is
# freed, and the trampoline's ``get_overload(this, "set")`` finds no Python object:
# "INTERNAL ASSERT FAILED ... Not implemented". So an EthaStore whose Python references
# are gone while C++ still holds its C++ half resurrects itself (``__del__``) into
# ``_HELD_BY_TORCH``; after every garbage collection the stores that C++ no longer holds
# (C++ reference count back to 1, the Python holder's) are dropped there.


def _probe_cpp_refcount(obj: object) -> int | None:
    """The reference count of ``obj``'s C++ half, or None if it cannot be read safely.

    Reads pybind11's simple instance layout (value pointer, then the holder, which for an
    intrusive pointer is the same pointer) and c10's ``intrusive_ptr_target`` (vtable,
    then the reference count in the low 32 bits). :func:`_refcount_readable` checks the
    layout once per process before this is trusted.
    """
    word = ctypes.sizeof(ctypes.c_void_p)
    base = id(obj) + 2 * word  # after ob_refcnt and ob_type
    value = ctypes.c_void_p.from_address(base).value
    holder = ctypes.c_void_p.from_address(base + word).value
    if not value or value != holder:
        return None
    return int(ctypes.c_uint32.from_address(value + word).value)


_LAYOUT_CHECKED: bool | None = None


def _refcount_readable(sample: _C10dStore) -> bool:
    """Whether :func:`_probe_cpp_refcount` reads true counts in this torch (checked once).

    The probe must see 1 for a fresh store, 2 while a ``PrefixStore`` wraps it, then 1.
    """
    global _LAYOUT_CHECKED
    if _LAYOUT_CHECKED is None:
        try:
            before = _probe_cpp_refcount(sample)
            wrapper = _PrefixStore("etha-probe", sample)
            during = _probe_cpp_refcount(sample)
            del wrapper
            after = _probe_cpp_refcount(sample)
            _LAYOUT_CHECKED = (before, during, after) == (1, 2, 1)
        except Exception:  # any surprise means: do not trust the layout
            _LAYOUT_CHECKED = False
    return _LAYOUT_CHECKED


_HELD_BY_TORCH: set[EthaStore] = set()
_held_lock = threading.Lock()


def _held_by_cpp(store: EthaStore) -> bool:
    """True while C++ (a PrefixStore, a process group) holds the store's C++ half."""
    if _LAYOUT_CHECKED:
        count = _probe_cpp_refcount(store)
        return count is None or count > 1
    # Unknown layout (a future torch): hold it while any process group exists.
    return bool(dist.is_initialized())


def _release_unheld(phase: str, info: object) -> None:
    """gc callback: let go of the stores that C++ no longer holds."""
    if phase != "stop" or not _HELD_BY_TORCH:
        return
    with _held_lock:
        candidates = list(_HELD_BY_TORCH)
    for store in candidates:
        # 4 references: the set, the list, this loop variable and getrefcount's argument.
        # A store someone took back from torch (PrefixStore.underlying_store) stays held.
        if not _held_by_cpp(store) and sys.getrefcount(store) <= 4:
            with _held_lock:
                _HELD_BY_TORCH.discard(store)
    del candidates


gc.callbacks.append(_release_unheld)


class EthaStore(_C10dStore):
    """A c10d ``Store`` whose keys live in etcd under one etha namespace.

    :param config: the etcd configuration; default: :func:`etha.kvstore.parse_env`
        (the ``ETHA_KV_*`` variables the operator injects)
    :param component: the component under the namespace (``{ns}/{component}/...``);
        default ``"torch"``
    :param scope: an optional further path (``/``-separated segments with the key
        rules of :mod:`etha.kvstore.keys`, for example a run id) so that separate runs
        in one namespace never see each other's keys
    :param timeout: the store timeout for ``get``/``wait``/``multi_get``; default 300 s
        like torch's stores. ``set_timeout`` changes it later. (The config's ``timeout``
        bounds each etcd request.)
    :param client: an :class:`EtcdClient` to use instead of the process-wide shared one
        (the store then does not release it)

    The store stays alive while torch holds it, however it was built (also
    ``init_process_group(store=EthaStore(...))`` with no other reference), and is freed
    at the first garbage collection after torch lets go of it (the process group is
    destroyed): see ``_HELD_BY_TORCH``.
    """

    def __init__(
        self,
        config: EtcdConfig | None = None,
        *,
        component: str = STORE_COMPONENT,
        scope: str | None = None,
        timeout: timedelta | float | None = None,
        client: EtcdClient | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            parsed = parse_env()
            if not isinstance(parsed, EtcdConfig):
                raise ConfigurationError(
                    "EthaStore needs the etcd backend but ETHA_KV_BACKEND is"
                    f" {parsed.backend!r}; set ETHA_KV_BACKEND=etcd"
                )
            config = parsed
        self._config = config
        # The namespace prefix is what the credentials are granted: never leave it.
        namespace = validate_name(config.namespace, "namespace")
        self._component = validate_name(component, "component")
        if scope is not None:
            try:
                validate_key(scope)
            except InvalidKeyError as exc:
                raise InvalidKeyError(f"scope: {exc}") from None
        self._scope = scope
        prefix = f"{namespace}/{self._component}/"
        if self._scope is not None:
            prefix += f"{self._scope}/"
        self._prefix_str = prefix
        self._prefix = prefix.encode("utf-8")
        self._range_end = prefix_range_end(self._prefix)
        # Chunks live at "{prefix without its '/'}!/{hex key}/{generation}/{index}": inside
        # the namespace, outside the store's range ('!' sorts before '/', and no name or
        # scope may contain it), so num_keys/list_keys never see them. The hex form keeps
        # one key's chunk range from containing another key's ("a" and "a/b").
        self._chunk_root = self._prefix[:-1] + b"!/"
        super().set_timeout(
            DEFAULT_TIMEOUT if timeout is None else timedelta(seconds=_seconds(timeout))
        )
        _refcount_readable(self)
        if client is None:
            self._client = EtcdClient.shared(config)
            self._finalizer: weakref.finalize[[], EthaStore] | None = weakref.finalize(
                self, self._client.release
            )
        else:
            self._client = client
            self._finalizer = None
        # One chunk and its key must fit in one etcd request.
        self._chunk_bytes = min(
            CHUNK_BYTES, max(_MIN_CHUNK_BYTES, self._client.max_request_bytes - _REQUEST_HEADROOM)
        )

    def __del__(self) -> None:
        # The last Python reference is gone. If C++ still holds the store, stay alive
        # (resurrect into _HELD_BY_TORCH) so that its calls find the Python methods.
        try:
            if _held_by_cpp(self):
                with _held_lock:
                    _HELD_BY_TORCH.add(self)
        except Exception:  # never raise from a finalizer (interpreter shutdown)
            return

    # -- identity ---------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The etcd key prefix of this store, trailing ``/`` included."""
        return self._prefix_str

    @property
    def client(self) -> EtcdClient:
        return self._client

    def __repr__(self) -> str:
        return f"EthaStore(prefix={self._prefix_str!r}, timeout={self._get_timeout()})"

    def close(self) -> None:
        """Release the shared etcd client. Keys stay (the operator removes the namespace)."""
        if self._finalizer is not None:
            self._finalizer()

    def clone(self) -> EthaStore:
        """The store itself: it is thread-safe, so torch's per-thread clones can share it.

        A new Python object would not do: when only C++ holds it, pybind11 loses the
        Python half of the object and every call on the clone fails ("Not implemented").
        One consequence: ``set_timeout`` on a clone also changes the original.
        """
        return self

    def _key(self, key: str | bytes) -> bytes:
        return self._prefix + _as_bytes(key, "key")

    def _name(self, full: bytes) -> str:
        return full[len(self._prefix) :].decode("utf-8", errors="replace")

    def _get_timeout(self) -> timedelta:
        # The C++ base owns the timeout, so set_timeout() from C++ or Python both count.
        value: timedelta = self.timeout  # type: ignore[attr-defined]
        return value

    def _current_timeout(self, timeout: timedelta | float | None) -> float:
        return _seconds(self._get_timeout() if timeout is None else timeout)

    def _request_timeout(self, deadline: float | None = None) -> float:
        """The deadline of one etcd request: the store timeout (or what is left of a wait)
        if that is shorter than the client's request timeout (``ETHA_KV_TIMEOUT``)."""
        limit = _seconds(self._get_timeout())
        if deadline is not None:
            limit = deadline - time.monotonic()
        return max(_MIN_REQUEST_TIMEOUT, min(self._client.timeout, limit))

    def connect(self, timeout: timedelta | float | None = None) -> None:
        """Log in and read once, within ``timeout`` (default: the store timeout).

        The ``etha://`` handler calls this so that a rendezvous against unreachable
        endpoints fails within its timeout, like ``tcp://`` does.

        :raises torch.distributed.DistNetworkError: no endpoint answered in time
        :raises torch.distributed.DistStoreError: etcd refused (credentials, permissions)
        """
        seconds = max(_MIN_REQUEST_TIMEOUT, self._current_timeout(timeout))
        try:
            self._client.range(self._prefix, self._range_end, count_only=True, timeout=seconds)
        except KVStoreError as exc:
            raise _store_error(f"connecting to etcd within {seconds:g}s", exc) from exc

    # -- the c10d contract --------------------------------------------------------------

    def set(self, key: str, value: str | bytes) -> None:
        """Store ``value`` (up to :data:`MAX_VALUE_BYTES`; larger than one etcd request
        in chunks, see :meth:`_store`)."""
        full = self._key(key)
        data = _as_bytes(value, "value")
        action = f"set({key!r})"
        try:
            stored, generation = self._store(full, data, action)
            # No clean-up if this fails: the manifest may have been written (a lost
            # answer), and then these chunks are the value. The next write removes them.
            response = self._client.txn(
                etcdrpc.TxnRequest(
                    compare=self._chunks_compare(full, generation),
                    success=[_put_op(full, stored), *self._cleanup_ops(full, generation)],
                ),
                timeout=self._request_timeout(),
            )
            if not response.succeeded:
                # A write or delete of this key that started after this set removed its
                # chunks: that write comes later, so this value was overwritten. Done.
                self._drop_generation(full, generation)
        except KVStoreError as exc:
            raise _store_error(action, exc) from exc

    def get(self, key: str) -> bytes:
        full = self._key(key)
        return self._wait_values([full], self._current_timeout(None))[full]

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        full = [self._key(k) for k in keys]
        if not full:
            return []
        values = self._wait_values(full, self._current_timeout(None))
        return [values[k] for k in full]

    def multi_set(self, keys: Sequence[str], values: Sequence[str | bytes]) -> None:
        if len(keys) != len(values):
            # torch's stores raise DistStoreError here too.
            raise dist.DistStoreError(
                f"etha store: multi_set got {len(keys)} keys and {len(values)} values;"
                " pass one value per key"
            )
        # A key given twice keeps its last value, like TCPStore, HashStore and FileStore;
        # etcd refuses a transaction that puts one key twice.
        latest = {self._key(k): _as_bytes(v, "value") for k, v in zip(keys, values, strict=True)}
        action = f"multi_set of {len(keys)} keys"
        try:
            for batch in self._batches(latest):
                self._multi_set_batch(batch, action)
        except KVStoreError as exc:
            raise _store_error(action, exc) from exc

    def _batches(self, values: dict[bytes, bytes]) -> Iterator[dict[bytes, bytes]]:
        """``values`` in groups that fit one transaction (ops and request bytes)."""
        budget = self._client.max_request_bytes - _REQUEST_HEADROOM
        batch: dict[bytes, bytes] = {}
        ops = size = 0
        for full, data in values.items():
            inline = len(data) if self._is_inline(data) else 128
            cost = len(full) * 3 + inline + 256
            if batch and (ops + 3 > MAX_TXN_OPS or size + cost > budget):
                yield batch
                batch, ops, size = {}, 0, 0
            batch[full] = data
            ops += 3
            size += cost
        if batch:
            yield batch

    def _multi_set_batch(self, batch: dict[bytes, bytes], action: str) -> None:
        """Put ``batch`` in one transaction (chunks first); re-send if chunks vanished."""
        for _ in range(_MULTI_SET_ATTEMPTS):
            written: dict[bytes, bytes | None] = {}
            compare: list[Any] = []
            success: list[Any] = []
            try:
                for full, data in batch.items():
                    stored, generation = self._store(full, data, action)
                    written[full] = generation
                    compare += self._chunks_compare(full, generation)
                    success += [_put_op(full, stored), *self._cleanup_ops(full, generation)]
            except BaseException:
                for full, generation in written.items():
                    self._drop_generation(full, generation)
                raise
            # As in set(): no clean-up if the transaction fails without an answer.
            response = self._client.txn(
                etcdrpc.TxnRequest(compare=compare, success=success),
                timeout=self._request_timeout(),
            )
            if response.succeeded:
                return
            # A concurrent write of one of these keys removed chunks written here: that
            # write began after this one, so write all of them again, after it.
            for full, generation in written.items():
                self._drop_generation(full, generation)
        raise dist.DistStoreError(
            f"etha store: {action}: other writers replaced these keys"
            f" {_MULTI_SET_ATTEMPTS} times while their chunks were written; retry later"
        )

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        full = [self._key(k) for k in keys]
        if full:
            self._wait_values(full, self._current_timeout(timeout), resolve=False)

    def check(self, keys: Sequence[str]) -> bool:
        full = [self._key(k) for k in keys]
        try:
            present, _ = self._read(full, self._request_timeout(), resolve=False, keys_only=True)
        except KVStoreError as exc:
            raise _store_error(f"check of {len(full)} keys", exc) from exc
        return len(present) == len(set(full))

    def add(self, key: str, value: int) -> int:
        """Add ``value`` to the integer in ``key`` (a missing key counts as 0); return the sum.

        Like torch's stores: ``value`` must be an int (or have ``__index__``) in the signed
        64-bit range, else ``TypeError``; the sum wraps around on 64-bit overflow.
        """
        amount = _int64_argument(value)
        try:
            # Through an etha gateway: one batched compare-and-swap for concurrent adds.
            total = gateway_add(self._client, self._key(key), amount)
        except KVStoreError as exc:
            raise _store_error(f"add({key!r})", exc) from exc
        return self._add_cas(key, amount) if total is None else total

    def _add_cas(self, key: str, amount: int) -> int:
        """``add`` as a compare-and-swap loop on the key (see :meth:`_read_modify_write`)."""

        def update(current: bytes | None) -> tuple[bytes, int]:
            if current is None:
                return str(amount).encode(), amount
            try:
                total = _wrap_int64(int(current) + amount)
            except ValueError:
                raise dist.DistStoreError(
                    f"etha store: add({key!r}) needs an integer value but the key holds"
                    f" {current[:40]!r}; use a separate key for counters"
                ) from None
            return str(total).encode(), total

        return self._read_modify_write(key, update)

    def append(self, key: str, value: str | bytes) -> None:
        suffix = _as_bytes(value, "value")

        def update(current: bytes | None) -> tuple[bytes, None]:
            return (current or b"") + suffix, None

        self._read_modify_write(key, update)

    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        full = self._key(key)
        expected = _as_bytes(expected_value, "expected_value")
        desired = _as_bytes(desired_value, "desired_value")
        if not (self._is_inline(expected) and self._is_inline(desired)):
            return self._compare_set_chunked(key, expected, desired)
        success = [_put_op(full, desired), *self._cleanup_ops(full, None)]
        read = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=full))
        try:
            while True:
                # A VALUE compare never succeeds on a missing key (etcd's rule), so an
                # existing key holding exactly ``expected`` is the only way this succeeds.
                # (An inline ``expected`` never equals a manifest: see _CHUNKED_MARK.)
                response = self._client.txn(
                    etcdrpc.TxnRequest(
                        compare=[
                            etcdrpc.Compare(result=_EQUAL, target=_VALUE, key=full, value=expected)
                        ],
                        success=success,
                        failure=[read],
                    ),
                    timeout=self._request_timeout(),
                )
                if response.succeeded:
                    return desired
                kvs = response.responses[0].response_range.kvs
                if kvs:
                    try:
                        return self._resolve(
                            full, bytes(kvs[0].value), int(response.header.revision)
                        )
                    except _Stale:
                        continue
                if expected:
                    # TCPStore: a missing key with a non-empty expectation is not created,
                    # and the expected value is returned.
                    return expected
                created = self._client.compare_and_put(
                    full,
                    desired,
                    None,
                    also=self._cleanup_ops(full, None),
                    timeout=self._request_timeout(),
                )
                if created.succeeded:
                    return desired
                # Created concurrently: compare against the new value.
        except KVStoreError as exc:
            raise _store_error(f"compare_set({key!r})", exc) from exc

    def _compare_set_chunked(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """compare_set when either value is chunked: a read-modify-write of the value."""

        def update(current: bytes | None) -> tuple[bytes | None, bytes]:
            if current is None:
                return (desired, desired) if not expected else (None, expected)
            if current == expected:
                return desired, desired
            return None, current

        return self._read_modify_write(key, update)

    def delete_key(self, key: str) -> bool:
        """Delete the key and its chunks (one transaction); True if the key existed."""
        full = self._key(key)
        try:
            response = self._client.txn(
                etcdrpc.TxnRequest(success=[_delete_op(full), *self._cleanup_ops(full, None)]),
                timeout=self._request_timeout(),
            )
        except KVStoreError as exc:
            raise _store_error(f"delete_key({key!r})", exc) from exc
        return int(response.responses[0].response_delete_range.deleted) > 0

    def num_keys(self) -> int:
        try:
            response = self._client.range(
                self._prefix, self._range_end, count_only=True, timeout=self._request_timeout()
            )
        except KVStoreError as exc:
            raise _store_error("num_keys", exc) from exc
        return int(response.count)

    def list_keys(self) -> list[str]:
        try:
            response = self._client.range(
                self._prefix, self._range_end, keys_only=True, timeout=self._request_timeout()
            )
        except KVStoreError as exc:
            raise _store_error("list_keys", exc) from exc
        return [self._name(bytes(kv.key)) for kv in response.kvs]

    def has_extended_api(self) -> bool:
        return True

    # The trampoline dispatches C++ calls by the C++ method name (pybind11's
    # PYBIND11_OVERLOAD_PURE), so C++ callers such as PrefixStore reach these names.
    getNumKeys = num_keys
    deleteKey = delete_key

    # -- internals ----------------------------------------------------------------------

    def _read_modify_write(
        self, key: str, update: Callable[[bytes | None], tuple[bytes | None, _T]]
    ) -> _T:
        """Apply ``update(current) -> (new_value, result)`` atomically; return the result.

        ``new_value`` None: nothing to write. The compare-and-swap is on the key's
        ``mod_revision`` (or its absence), plus, for a chunked new value, on its first
        chunk still being there (see :meth:`_store`).
        """
        full = self._key(key)
        action = f"update of {key!r}"
        try:
            response = self._client.range(full, timeout=self._request_timeout())
            kv = response.kvs[0] if response.kvs else None
            revision = int(response.header.revision)
            losses = 0
            while True:
                try:
                    current = None if kv is None else self._resolve(full, bytes(kv.value), revision)
                except _Stale:
                    response = self._client.range(full, timeout=self._request_timeout())
                    kv = response.kvs[0] if response.kvs else None
                    revision = int(response.header.revision)
                    continue
                new_value, result = update(current)
                if new_value is None:
                    return result
                stored, generation = self._store(full, new_value, action)
                # As in set(): no clean-up if the transaction fails without an answer.
                outcome = self._client.compare_and_put(
                    full,
                    stored,
                    None if kv is None else int(kv.mod_revision),
                    compare=self._chunks_compare(full, generation),
                    also=self._cleanup_ops(full, generation),
                    timeout=self._request_timeout(),
                )
                if outcome.succeeded:
                    return result
                self._drop_generation(full, generation)
                # Lost the race: the transaction already read the winner's value.
                kv = outcome.current
                revision = outcome.revision
                losses += 1
                if losses >= _BACKOFF_AFTER:
                    # Contended key: a short random backoff lets one writer through
                    # instead of every writer failing every round.
                    time.sleep(random.uniform(0, min(_BACKOFF_BASE * 2**losses, _BACKOFF_CAP)))
        except KVStoreError as exc:
            raise _store_error(action, exc) from exc

    # -- chunked values ------------------------------------------------------------------
    #
    # A value larger than one chunk is written as chunks under a fresh generation id
    # first, then the key is set to a manifest ("{mark}{generation} {size} {count}") in
    # ONE transaction that also deletes every other generation of the key's chunks and
    # checks that this generation's first chunk is still there. Readers read the key at
    # revision R and the chunks AT R (etcd's MVCC): the manifest and its chunks always
    # belong together, and a replacement (a later revision) cannot tear or mix a value.
    # Every write of a key (set, delete, compare_set, add, append) deletes the key's
    # other chunk generations in its transaction, so a writer whose chunks vanished lost
    # to a later writer; its transaction fails on the first-chunk compare.

    def _is_inline(self, data: bytes) -> bool:
        return len(data) <= self._chunk_bytes and not data.startswith(_CHUNKED_MARK)

    def _chunk_dir(self, full: bytes) -> bytes:
        return self._chunk_root + full[len(self._prefix) :].hex().encode() + b"/"

    def _chunk_key(self, full: bytes, generation: bytes, index: int) -> bytes:
        return self._chunk_dir(full) + generation + b"/%05d" % index

    def _store(self, full: bytes, data: bytes, action: str) -> tuple[bytes, bytes | None]:
        """What to put in the key for ``data``, and the chunk generation written (if any)."""
        if self._is_inline(data):
            return data, None
        if len(data) > MAX_VALUE_BYTES:
            raise dist.DistStoreError(
                f"etha store: {action}: the value is {len(data)} bytes; the store holds at"
                f" most {MAX_VALUE_BYTES} bytes a value (MAX_VALUE_BYTES). Keep large data"
                " elsewhere (a shared volume, an object store) and store its location"
            )
        generation = os.urandom(8).hex().encode()
        step = self._chunk_bytes
        count = max(1, -(-len(data) // step))
        view = memoryview(data)
        try:
            for index in range(count):
                self._client.put(
                    self._chunk_key(full, generation, index),
                    bytes(view[index * step : (index + 1) * step]),
                    timeout=self._request_timeout(),
                )
        except BaseException:
            self._drop_generation(full, generation)
            raise
        return _CHUNKED_MARK + b"%s %d %d" % (generation, len(data), count), generation

    def _chunks_compare(self, full: bytes, generation: bytes | None) -> list[Any]:
        if generation is None:
            return []
        return [present(self._chunk_key(full, generation, 0))]

    def _cleanup_ops(self, full: bytes, keep: bytes | None) -> list[Any]:
        """Deletes of the key's chunks, except generation ``keep``."""
        directory = self._chunk_dir(full)
        end = prefix_range_end(directory)
        if keep is None:
            return [_delete_op(directory, end)]
        kept = directory + keep + b"/"
        return [_delete_op(directory, kept), _delete_op(prefix_range_end(kept), end)]

    def _drop_generation(self, full: bytes, generation: bytes | None) -> None:
        """Best effort: delete chunks that no manifest will point at."""
        if generation is None:
            return
        kept = self._chunk_dir(full) + generation + b"/"
        with contextlib.suppress(KVStoreError):
            self._client.delete_range(kept, prefix_range_end(kept), timeout=self._request_timeout())

    def _resolve(self, full: bytes, stored: bytes, revision: int) -> bytes:
        """The value behind ``stored`` (read at ``revision``): itself, or its chunks.

        :raises _Stale: the chunks cannot be read at ``revision`` any more (compacted)
        """
        if not stored.startswith(_CHUNKED_MARK):
            return stored
        manifest = _parse_manifest(stored)
        if manifest is None:
            raise dist.DistStoreError(
                f"etha store: {self._name(full)!r} holds a malformed chunk manifest"
                f" {stored[:60]!r}; set the key again"
            )
        generation, size, count = manifest
        directory = self._chunk_dir(full) + generation + b"/"
        end = prefix_range_end(directory)
        chunks: list[bytes] = []
        start = directory
        try:
            while len(chunks) < count:
                response = self._client.range(
                    start,
                    end,
                    revision=revision,
                    limit=_CHUNKS_PER_READ,
                    timeout=self._request_timeout(),
                )
                if not response.kvs:
                    break
                chunks.extend(bytes(kv.value) for kv in response.kvs)
                start = bytes(response.kvs[-1].key) + b"\0"
        except KVStoreError as exc:
            if exc.code == "OUT_OF_RANGE":  # revision compacted: read the key again
                raise _Stale() from exc
            raise
        data = b"".join(chunks)
        if len(chunks) != count or len(data) != size:
            raise dist.DistStoreError(
                f"etha store: {self._name(full)!r} at revision {revision} has {len(chunks)}"
                f" of {count} chunks ({len(data)} of {size} bytes); set the key again"
            )
        return data

    def _read(
        self,
        keys: Iterable[bytes],
        timeout: float,
        *,
        resolve: bool = True,
        keys_only: bool = False,
    ) -> tuple[dict[bytes, bytes], int]:
        """The present keys among ``keys`` and the lowest revision the reads were at.

        With ``resolve``, chunked values are read whole (at the revision of their key's
        read); else the stored values (manifests) are returned.
        """
        unique = list(dict.fromkeys(keys))
        while True:
            values: dict[bytes, bytes] = {}
            revision = 0
            try:
                for start in range(0, len(unique), MAX_TXN_OPS):
                    batch = unique[start : start + MAX_TXN_OPS]
                    if len(batch) == 1:
                        response = self._client.range(
                            batch[0], keys_only=keys_only, timeout=timeout
                        )
                        kvs = list(response.kvs)
                    else:
                        ops = [
                            etcdrpc.RequestOp(
                                request_range=etcdrpc.RangeRequest(key=k, keys_only=keys_only)
                            )
                            for k in batch
                        ]
                        response = self._client.txn(
                            etcdrpc.TxnRequest(success=ops), timeout=timeout
                        )
                        kvs = [kv for op in response.responses for kv in op.response_range.kvs]
                    rev = int(response.header.revision)
                    revision = rev if revision == 0 else min(revision, rev)
                    for kv in kvs:
                        name, value = bytes(kv.key), bytes(kv.value)
                        values[name] = self._resolve(name, value, rev) if resolve else value
                return values, revision
            except _Stale:
                continue

    def _timeout_error(self, timeout: float, missing: Iterable[bytes]) -> dist.DistStoreError:
        names = ", ".join(sorted(self._name(k) for k in missing))
        # A wait that ran out while etcd was unreachable should say so.
        trouble = self._client.watch_trouble()
        state = "" if trouble is None else f"; {trouble}"
        return dist.DistStoreError(
            f"wait timeout after {round(timeout * 1000)}ms, keys: {names}"
            f" (etha store prefix {self._prefix_str!r}{state})"
        )

    def _wait_values(
        self, keys: list[bytes], timeout: float, *, resolve: bool = True
    ) -> dict[bytes, bytes]:
        """Block until every key exists; return their values. Watches, never polls.

        Without ``resolve``, chunked values are returned as their manifests.
        """
        deadline = time.monotonic() + timeout
        try:
            return self._wait_values_inner(keys, timeout, deadline, resolve)
        except KVStoreError as exc:
            if isinstance(exc, TimeoutError):
                # A wait ran out inside etha (for example while reconnecting).
                raise self._timeout_error(timeout, keys) from exc
            raise _store_error(f"wait for {len(keys)} keys", exc) from exc

    def _wait_values_inner(
        self, keys: list[bytes], timeout: float, deadline: float, resolve: bool
    ) -> dict[bytes, bytes]:
        wanted = set(keys)

        def read() -> tuple[dict[bytes, bytes] | None, View[dict[bytes, bytes]], int]:
            values, revision = self._read(wanted, self._request_timeout(deadline), resolve=resolve)
            view = _ValuesView(wanted, values, resolve)
            return (values if view.complete() else None), view, revision

        def timed_out(view: View[dict[bytes, bytes]], _stream: str | None) -> Exception:
            assert isinstance(view, _ValuesView)
            return self._timeout_error(timeout, view.missing())

        return wait(self._client, read, deadline, timed_out)


class _ValuesView(View[dict[bytes, bytes]]):
    """The values of ``wanted`` keys; done when every one exists.

    A chunked value that arrives by watch is its manifest: the wait then reads again
    (:data:`REREAD`), so that its chunks are read at the revision of the manifest.
    """

    def __init__(self, wanted: set[bytes], values: dict[bytes, bytes], resolve: bool) -> None:
        self.wanted = wanted
        self.values = values
        self.resolve = resolve
        missing = wanted - values.keys()
        if len(missing) <= 1:
            self.key, self.range_end = (next(iter(missing)) if missing else b""), None
        else:
            self.key = _common(missing)
            self.range_end = prefix_range_end(self.key)

    def complete(self) -> bool:
        return len(self.values) == len(self.wanted)

    def missing(self) -> set[bytes]:
        # A copy: the hub's reader thread may be applying events meanwhile.
        return self.wanted - self.values.copy().keys()

    def apply(self, events: Iterable[Any]) -> dict[bytes, bytes] | Reread | None:
        values, wanted = self.values, self.wanted
        for event in events:
            name = bytes(event.kv.key)
            if name not in wanted:
                continue
            if event.type == PUT:
                values[name] = bytes(event.kv.value)
            else:
                values.pop(name, None)
        if len(values) != len(wanted):
            return None
        if self.resolve and any(v.startswith(_CHUNKED_MARK) for v in values.values()):
            return REREAD
        return values

    def seen(self) -> str:
        return f"{len(self.values)} of {len(self.wanted)} keys"


def _common(keys: Iterable[bytes]) -> bytes:
    ordered = sorted(keys)
    first, last = ordered[0], ordered[-1]
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


__all__ = ["MAX_TXN_OPS", "STORE_COMPONENT", "EthaStore"]
