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

Not supported: ``queue_push``/``queue_pop``/``queue_len`` (torch's trampoline for
Python stores does not forward them, so C++ callers could never reach an
implementation; torch raises ``NotImplementedError``).

Every key lives at ``{namespace}/{component}/[{scope}/]{torch key}``: inside the
namespace prefix that the operator grants to the job's credentials and deletes when the
job ends. Nothing is written anywhere else.
"""

from __future__ import annotations

import ctypes
import gc
import operator
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TypeVar

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
from etha.kvstore.etcd import gateway_add
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from etha.kvstore.keys import validate_key, validate_name

#: etcd's default ``--max-txn-ops``.
MAX_TXN_OPS = 128
DEFAULT_COMPONENT = "torch"
#: torch's own default store timeout (c10d ``kDefaultTimeout``). ``ETHA_KV_TIMEOUT`` is the
#: deadline of one etcd request, not of a wait for another rank.
DEFAULT_TIMEOUT = timedelta(seconds=300)
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
_MOD = etcdrpc.Compare.MOD
_CREATE = etcdrpc.Compare.CREATE
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
        component: str = DEFAULT_COMPONENT,
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
        try:
            self._client.put(
                self._key(key), _as_bytes(value, "value"), timeout=self._request_timeout()
            )
        except KVStoreError as exc:
            raise _store_error(f"set({key!r})", exc) from exc

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
        ops = [
            etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k, value=v))
            for k, v in latest.items()
        ]
        try:
            for start in range(0, len(ops), MAX_TXN_OPS):
                self._client.txn(
                    etcdrpc.TxnRequest(success=ops[start : start + MAX_TXN_OPS]),
                    timeout=self._request_timeout(),
                )
        except KVStoreError as exc:
            raise _store_error(f"multi_set of {len(keys)} keys", exc) from exc

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        full = [self._key(k) for k in keys]
        if full:
            self._wait_values(full, self._current_timeout(timeout))

    def check(self, keys: Sequence[str]) -> bool:
        full = [self._key(k) for k in keys]
        try:
            present, _ = self._read(full, self._request_timeout(), keys_only=True)
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
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=full, value=desired))
        read = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=full))
        try:
            while True:
                # A VALUE compare never succeeds on a missing key (etcd's rule), so an
                # existing key holding exactly ``expected`` is the only way this succeeds.
                response = self._client.txn(
                    etcdrpc.TxnRequest(
                        compare=[
                            etcdrpc.Compare(result=_EQUAL, target=_VALUE, key=full, value=expected)
                        ],
                        success=[put],
                        failure=[read],
                    ),
                    timeout=self._request_timeout(),
                )
                if response.succeeded:
                    return desired
                kvs = response.responses[0].response_range.kvs
                if kvs:
                    return bytes(kvs[0].value)
                if expected:
                    # TCPStore: a missing key with a non-empty expectation is not created,
                    # and the expected value is returned.
                    return expected
                response = self._client.txn(
                    etcdrpc.TxnRequest(
                        compare=[
                            etcdrpc.Compare(
                                result=_EQUAL, target=_CREATE, key=full, create_revision=0
                            )
                        ],
                        success=[put],
                        failure=[read],
                    ),
                    timeout=self._request_timeout(),
                )
                if response.succeeded:
                    return desired
                # Created concurrently: compare against the new value.
        except KVStoreError as exc:
            raise _store_error(f"compare_set({key!r})", exc) from exc

    def delete_key(self, key: str) -> bool:
        try:
            return self._client.delete_range(self._key(key), timeout=self._request_timeout()) > 0
        except KVStoreError as exc:
            raise _store_error(f"delete_key({key!r})", exc) from exc

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
        self, key: str, update: Callable[[bytes | None], tuple[bytes, _T]]
    ) -> _T:
        """Apply ``update(current) -> (new_value, result)`` atomically; return the result."""
        full = self._key(key)
        read = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=full))
        try:
            response = self._client.range(full, timeout=self._request_timeout())
            kv = response.kvs[0] if response.kvs else None
            losses = 0
            while True:
                new_value, result = update(None if kv is None else bytes(kv.value))
                if kv is None:
                    compare = etcdrpc.Compare(
                        result=_EQUAL, target=_CREATE, key=full, create_revision=0
                    )
                else:
                    compare = etcdrpc.Compare(
                        result=_EQUAL, target=_MOD, key=full, mod_revision=kv.mod_revision
                    )
                txn = self._client.txn(
                    etcdrpc.TxnRequest(
                        compare=[compare],
                        success=[
                            etcdrpc.RequestOp(
                                request_put=etcdrpc.PutRequest(key=full, value=new_value)
                            )
                        ],
                        failure=[read],
                    ),
                    timeout=self._request_timeout(),
                )
                if txn.succeeded:
                    return result
                # Lost the race: the failure branch already read the winner's value.
                kvs = txn.responses[0].response_range.kvs
                kv = kvs[0] if kvs else None
                losses += 1
                if losses >= _BACKOFF_AFTER:
                    # Contended key: a short random backoff lets one writer through
                    # instead of every writer failing every round.
                    time.sleep(random.uniform(0, min(_BACKOFF_BASE * 2**losses, _BACKOFF_CAP)))
        except KVStoreError as exc:
            raise _store_error(f"update of {key!r}", exc) from exc

    def _read(
        self, keys: Iterable[bytes], timeout: float, *, keys_only: bool = False
    ) -> tuple[dict[bytes, bytes], int]:
        """The present keys among ``keys`` and the lowest revision the reads were at."""
        unique = list(dict.fromkeys(keys))
        values: dict[bytes, bytes] = {}
        if len(unique) == 1:
            response = self._client.range(unique[0], keys_only=keys_only, timeout=timeout)
            for kv in response.kvs:
                values[bytes(kv.key)] = bytes(kv.value)
            return values, int(response.header.revision)
        revision = 0
        for start in range(0, len(unique), MAX_TXN_OPS):
            ops = [
                etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=k, keys_only=keys_only))
                for k in unique[start : start + MAX_TXN_OPS]
            ]
            response = self._client.txn(etcdrpc.TxnRequest(success=ops), timeout=timeout)
            rev = int(response.header.revision)
            revision = rev if revision == 0 else min(revision, rev)
            for op in response.responses:
                for kv in op.response_range.kvs:
                    values[bytes(kv.key)] = bytes(kv.value)
        return values, revision

    def _timeout_error(self, timeout: float, missing: Iterable[bytes]) -> dist.DistStoreError:
        names = ", ".join(sorted(self._name(k) for k in missing))
        hub = self._client._hub
        # A wait that ran out while etcd was unreachable should say so.
        state = "" if hub is None or hub.connected else f"; {hub.describe()}"
        return dist.DistStoreError(
            f"wait timeout after {round(timeout * 1000)}ms, keys: {names}"
            f" (etha store prefix {self._prefix_str!r}{state})"
        )

    def _wait_values(self, keys: list[bytes], timeout: float) -> dict[bytes, bytes]:
        """Block until every key exists; return their values. Watches, never polls."""
        deadline = time.monotonic() + timeout
        try:
            return self._wait_values_inner(keys, timeout, deadline)
        except KVStoreError as exc:
            if isinstance(exc, TimeoutError):
                # A wait ran out inside etha (for example while reconnecting).
                raise self._timeout_error(timeout, keys) from exc
            raise _store_error(f"wait for {len(keys)} keys", exc) from exc

    def _wait_values_inner(
        self, keys: list[bytes], timeout: float, deadline: float
    ) -> dict[bytes, bytes]:
        wanted = set(keys)
        while True:
            values, revision = self._read(wanted, self._request_timeout(deadline))
            missing = wanted - values.keys()
            if not missing:
                return values
            if time.monotonic() >= deadline:
                raise self._timeout_error(timeout, missing)
            if len(missing) == 1:
                start, end = next(iter(missing)), None
            else:
                start = _common(missing)
                end = prefix_range_end(start)
            outcome = _watch_until(self._client, start, end, revision + 1, wanted, values, deadline)
            if outcome is None:
                raise self._timeout_error(timeout, wanted - values.keys())
            if outcome:
                return values
            # False: the watch was compacted or restarted; read again and re-watch.


def _common(keys: Iterable[bytes]) -> bytes:
    ordered = sorted(keys)
    first, last = ordered[0], ordered[-1]
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _watch_until(
    client: EtcdClient,
    key: bytes,
    range_end: bytes | None,
    start_revision: int,
    wanted: set[bytes],
    values: dict[bytes, bytes],
    deadline: float,
) -> bool | None:
    """Apply watch events to ``values`` until every wanted key is present.

    :returns: True when complete, None on timeout, False when the caller must re-read
    """
    from etha.kvstore.etcd_watch import DELETE, WatchCompacted

    watcher = client.watch_hub.watch(key, range_end, start_revision)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                events = watcher.get(remaining)
            except WatchCompacted:
                return False
            if events is None:
                return None
            for event in events:
                name = bytes(event.kv.key)
                if name not in wanted:
                    continue
                if event.type == DELETE:
                    values.pop(name, None)
                else:
                    values[name] = bytes(event.kv.value)
            if len(values) == len(wanted):
                return True
    finally:
        watcher.cancel()


__all__ = ["DEFAULT_COMPONENT", "MAX_TXN_OPS", "EthaStore"]
