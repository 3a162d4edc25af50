"""The ``torch.distributed.TCPStore`` backend of :mod:`etha.kvstore`.

TCPStore is a flat in-memory map served by rank 0 of a job. It has no watches, no
prefix queries and no authentication, so this backend:

* stores ``set()`` values as their UTF-8 text and ``set_bytes()`` data as base64 (the interface
  says so); :meth:`TCPStoreKVStore.get` returns the stored bytes unchanged, so ``get()`` of
  ``set_bytes()`` data returns the base64 text, and :meth:`~TCPStoreKVStore.get_bytes`
  decodes it;
* reads a key with one ``compare_set`` round trip that never writes (TCPStore's ``get``
  blocks until its timeout on a missing key);
* waits by polling with bounded exponential backoff (1 ms doubling to 50 ms), and
  ``wait_for_keys`` needs the caller's ``candidate_keys`` because TCPStore cannot list
  keys by prefix cheaply;
* refuses what breaks a TCPStore connection for good: values over 8 MiB (after base64)
  and ``add()`` on non-integers (never called on user data);
* never reconnects: after the connection broke every call raises
  :class:`~etha.kvstore.errors.UnavailableError` at once. A restarted server has lost
  every key, so silently reconnecting would hide that loss.

torch is imported lazily, so ``import etha.kvstore`` works without it.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from etha.kvstore import keys as _keys
from etha.kvstore.base import (
    CheckedWaitsKVStore,
    KeysWait,
    check_bytes_value,
    check_str_value,
    check_timeout,
)
from etha.kvstore.config import DEFAULT_COMPONENT, DEFAULT_TIMEOUT, TCPStoreConfig
from etha.kvstore.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidValueError,
    KVStoreError,
    KVTimeoutError,
    StoreClosedError,
    UnavailableError,
)

if TYPE_CHECKING:
    # torch.distributed defines Store only when distributed support is compiled in.
    from torch._C._distributed_c10d import Store

__all__ = ["MAX_VALUE_BYTES", "TCPStoreKVStore"]

#: Largest stored value (after base64 for ``set_bytes``). The libuv TCPStore server drops
#: the connection of a client that sends a longer string, and that client never reconnects.
MAX_VALUE_BYTES = 8 * 1024 * 1024
#: Largest ``set_bytes`` payload: its base64 form must fit in :data:`MAX_VALUE_BYTES`.
MAX_BYTES_DATA = MAX_VALUE_BYTES // 4 * 3

_MAX_REQUEST_TIMEOUT = 365 * 24 * 3600.0
_POLL_START = 0.001
_POLL_MAX = 0.05
# compare_set(key, S, S) returns S when the key is missing and never writes anything, unless
# the stored value is S itself (then it writes S again: still no change). S is not UTF-8, so
# neither set() (UTF-8 text) nor set_bytes() (base64) can store it.
_MISSING = b"\xff\x00etha.kvstore:missing\xff"

_T = TypeVar("_T")


def _import_torch_distributed() -> Any:
    try:
        import torch.distributed as dist
    except ImportError as exc:
        raise ConfigurationError(
            f"the tcpstore backend needs torch ({exc}); install it with"
            " `pip install etha[tcpstore]` or use the etcd backend"
        ) from None
    return dist


# Barrier loops call wait_for_keys with the same candidates again and again; validating
# 64 keys costs more CPU than the TCPStore round trip itself, so validated lists are kept.
_CANDIDATE_CACHE_SIZE = 64
_candidate_cache: dict[tuple[str, tuple[object, ...]], tuple[str, ...]] = {}
_candidate_cache_lock = threading.Lock()


def _validate_candidates(candidate_keys: object, pattern: str) -> list[str]:
    """Return the distinct candidates in their given order; each must match ``pattern``."""
    if candidate_keys is None:
        raise InvalidArgumentError(
            "candidate_keys is required by the tcpstore backend: TCPStore cannot list keys"
            " by pattern, so pass the keys that may match (e.g. every rank's key)"
        )
    if isinstance(candidate_keys, (str, bytes)) or not isinstance(candidate_keys, Iterable):
        raise InvalidArgumentError(
            f"candidate_keys must be a list of keys, got {type(candidate_keys).__name__}"
        )
    given = tuple(candidate_keys)
    cache_key = (pattern, given)
    try:
        with _candidate_cache_lock:
            cached = _candidate_cache.get(cache_key)
        cacheable = True
    except TypeError:  # an unhashable candidate; validate_key names it below
        cached, cacheable = None, False
    if cached is not None:
        return list(cached)
    regex = _keys.compile_pattern(pattern)
    seen: dict[str, None] = {}
    for candidate in given:
        key = _keys.validate_key(candidate)
        if not regex.fullmatch(key):
            raise InvalidKeyError(
                f"candidate key {key!r} does not match the pattern {pattern!r};"
                " pass only keys the pattern can match"
            )
        seen[key] = None
    if cacheable:
        with _candidate_cache_lock:
            if len(_candidate_cache) >= _CANDIDATE_CACHE_SIZE:
                del _candidate_cache[next(iter(_candidate_cache))]
            _candidate_cache[cache_key] = tuple(seen)
    return list(seen)


class TCPStoreKVStore(CheckedWaitsKVStore):
    """A :class:`~etha.kvstore.base.KVStore` on ``torch.distributed.TCPStore``.

    Either wraps an existing torch store (``store=``; it is not closed by :meth:`close`
    beyond dropping the reference) or connects to ``host:port``: with ``is_server=True``
    this process hosts the server (rank 0; ``port=0`` picks a free port, see
    :attr:`port`) and every other process connects as a client. The server lives as long
    as the store object that created it: closing it takes the keys away from every client.

    Thread-safe: calls from several threads are serialised over the one connection,
    which TCPStore serialises anyway.

    :param timeout: seconds for connecting and for each request
    :ivar host: the server's host as given (or as the wrapped store reports it)
    :ivar port: the server's port; for a server started on port 0, the port it picked
    :raises ConfigurationError: torch is missing, or the arguments contradict each other
    :raises UnavailableError: the server cannot be reached (or, as server, the port bound)
    """

    def __init__(
        self,
        namespace: str,
        component: str = DEFAULT_COMPONENT,
        *,
        host: str | None = None,
        port: int | None = None,
        is_server: bool = False,
        world_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        store: Store | None = None,
    ) -> None:
        super().__init__(namespace, component)
        timeout = check_timeout(timeout)
        if not 0 < timeout <= _MAX_REQUEST_TIMEOUT:
            # torch turns the timeout into int64 milliseconds; a huge one would overflow.
            raise ConfigurationError(
                f"timeout must be more than 0 and at most {_MAX_REQUEST_TIMEOUT:g} seconds,"
                f" got {timeout:g}"
            )
        self._timeout = timeout
        self._lock = threading.RLock()
        self._closed = False
        self._broken: str | None = None
        dist = _import_torch_distributed()
        self._network_errors: tuple[type[BaseException], ...] = (dist.DistNetworkError,)
        self._store_errors: tuple[type[BaseException], ...] = (dist.DistStoreError,)
        if store is not None:
            if host is not None or port is not None or is_server or world_size is not None:
                raise ConfigurationError(
                    "pass either store= or host/port/is_server/world_size, not both"
                )
            self._store: Any = store
            self._owns_store = False
            self.host: str = str(getattr(store, "host", "") or "<wrapped store>")
            self.port = int(getattr(store, "port", 0) or 0)
            return
        self._owns_store = True
        if not isinstance(host, str) or not host:
            raise ConfigurationError("host is required: the TCPStore server's host name or IP")
        low = 0 if is_server else 1
        if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
            raise ConfigurationError(
                f"port must be an int between {low} and 65535, got {port!r}"
                + (" (0 picks a free port, server only)" if is_server else "")
            )
        if world_size is not None and (
            isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1
        ):
            raise ConfigurationError(f"world_size must be an int >= 1 or None, got {world_size!r}")
        self.host = host
        try:
            self._store = dist.TCPStore(
                host,
                port,
                world_size,
                bool(is_server),
                timeout=timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        except RuntimeError as exc:
            role = "start a TCPStore server on" if is_server else "connect to the TCPStore at"
            raise UnavailableError(
                f"could not {role} {host}:{port} within {timeout}s: {_first_line(exc)};"
                " check ETHA_KV_TCPSTORE_HOST/PORT and that rank 0 is running"
            ) from None
        self.port = int(self._store.port)

    @classmethod
    def from_config(cls, config: TCPStoreConfig) -> TCPStoreKVStore:
        """Open the store that ``config`` (e.g. from :func:`etha.kvstore.parse_env`) describes."""
        return cls(
            config.namespace,
            config.component,
            host=config.host,
            port=config.port,
            is_server=config.is_server,
            world_size=config.world_size,
            timeout=config.timeout,
        )

    # -- plumbing ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[Any], _T]) -> _T:
        """Run ``fn(store)`` under the lock, mapping torch errors to etha errors."""
        with self._lock:
            store = self._live_store()
            try:
                return fn(store)
            except self._network_errors as exc:
                self._broken = _first_line(exc)
                raise UnavailableError(
                    f"TCPStore {self.host}:{self.port} failed during {what}: {self._broken};"
                    " the connection is lost for good (is the rank-0 server still running?)"
                ) from None
            except self._store_errors as exc:
                text = _first_line(exc)
                if "timeout" in text.lower() or "timed out" in text.lower():
                    raise KVTimeoutError(
                        f"TCPStore {what} did not complete within its timeout: {text}"
                    ) from None
                raise KVStoreError(f"TCPStore {what} failed: {text}") from None
            except RuntimeError as exc:
                # torch reports a reset connection as a bare RuntimeError in some paths.
                self._broken = _first_line(exc)
                raise UnavailableError(
                    f"TCPStore {self.host}:{self.port} failed during {what}: {self._broken}"
                ) from None

    def _live_store(self) -> Any:
        if self._closed:
            raise StoreClosedError(f"{self!r} is closed; open a new store")
        if self._broken is not None:
            raise UnavailableError(
                f"the connection to TCPStore {self.host}:{self.port} broke earlier"
                f" ({self._broken}); open a new store once the server is back"
            )
        return self._store

    def _read(self, full_key: str) -> bytes | None:
        """The stored value, or None; one round trip, never blocks on a missing key."""
        value = self._call(
            f"get of {full_key!r}", lambda s: bytes(s.compare_set(full_key, _MISSING, _MISSING))
        )
        return None if value == _MISSING else value

    def _write(self, full_key: str, payload: bytes) -> None:
        if len(payload) > MAX_VALUE_BYTES:
            raise InvalidValueError(
                f"value for {full_key!r} is {len(payload)} bytes as stored; TCPStore drops the"
                f" connection above {MAX_VALUE_BYTES} bytes (set_bytes data: {MAX_BYTES_DATA});"
                " store large data elsewhere and put a reference in the store"
            )

        def do(store: Any) -> None:
            store.set(full_key, payload)
            # TCPStore's set() does not wait for a reply; a request on the same connection
            # does, so after it the write is visible to every client (and a dead server
            # is noticed here, not at the next call).
            store.check([full_key])

        self._call(f"set of {full_key!r}", do)

    # -- the KVStore interface -----------------------------------------------------------

    def set(self, key: str, value: str, *, component: str | None = None) -> None:
        """Store ``value`` as UTF-8 text; visible to every client when this returns."""
        full = self._full_key(key, component)
        self._write(full, check_str_value(value))

    def set_bytes(self, key: str, data: bytes, *, component: str | None = None) -> None:
        """Store binary data as base64 (at most :data:`MAX_BYTES_DATA` bytes of data)."""
        full = self._full_key(key, component)
        self._write(full, base64.b64encode(check_bytes_value(data)))

    def get(self, key: str, *, component: str | None = None) -> bytes | None:
        """The stored bytes (base64 text for ``set_bytes`` data), or None if missing."""
        return self._read(self._full_key(key, component))

    def get_bytes(self, key: str, *, component: str | None = None) -> bytes | None:
        """Data written with :meth:`set_bytes`, decoded; None if missing.

        :raises InvalidValueError: the value is not base64, i.e. not written by set_bytes
        """
        full = self._full_key(key, component)
        raw = self._read(full)
        if raw is None:
            return None
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidValueError(
                f"value of {key!r} is not base64: it was not written with set_bytes();"
                " read it with get()"
            ) from None

    def exists(self, key: str, *, component: str | None = None) -> bool:
        full = self._full_key(key, component)
        return bool(self._call(f"exists of {full!r}", lambda s: s.check([full])))

    def delete(self, key: str, *, component: str | None = None) -> bool:
        full = self._full_key(key, component)
        return bool(self._call(f"delete of {full!r}", lambda s: s.delete_key(full)))

    def _wait_for_value(self, full_key: str, want: bytes | None, timeout: float) -> bytes:
        """Poll until ``full_key`` exists (``want`` None) or holds ``want``; return the
        stored bytes.

        :raises KVTimeoutError: (a TimeoutError) if the key did not appear or match in time
        """
        last: list[bytes | None] = [None]

        def probe() -> bytes | None:
            last[0] = self._read(full_key)
            return last[0] if want is None or last[0] == want else None

        found = self._poll(timeout, probe)
        if found is not None:
            return found
        if want is None:
            raise KVTimeoutError(f"key {full_key!r} did not appear within {timeout}s")
        seen = "was missing" if last[0] is None else f"held another value ({len(last[0])} bytes)"
        raise KVTimeoutError(
            f"key {full_key!r} did not get the expected value within {timeout}s; it {seen}"
        )

    def _wait_for_keys(self, wait: KeysWait) -> list[str]:
        """Poll ``candidate_keys`` until ``wait.expected_count`` of them hold the value.

        ``candidate_keys`` (relative keys, each matching the pattern) is required.
        Each poll is one request for all candidates: ``check`` when every candidate is
        needed, ``list_keys`` otherwise; values are read (``multi_get``) only once enough
        candidates exist.

        :raises InvalidArgumentError: candidate_keys missing, or fewer than expected_count
        :raises KVTimeoutError: (a TimeoutError) naming the pattern and the progress
        """
        prefix, key_pattern = wait.prefix, wait.pattern
        count, want, timeout = wait.expected_count, wait.value, wait.timeout
        candidates = _validate_candidates(wait.candidate_keys, key_pattern)
        if count > len(candidates):
            raise InvalidArgumentError(
                f"expected_count {count} is more than the {len(candidates)} distinct"
                f" candidate_keys for {key_pattern!r}; it could never be reached"
            )
        fulls = [prefix + key for key in candidates]
        by_full = dict(zip(fulls, candidates, strict=True))
        progress = [0, 0]  # keys present, keys with the value, at the last poll
        deadline = time.monotonic() + timeout

        def probe() -> list[str] | None:
            if count == len(fulls):
                present = fulls if self._call("check", lambda s: s.check(fulls)) else []
            else:
                stored = set(self._call("list_keys", lambda s: s.list_keys()))
                present = [k for k in fulls if k in stored]
            progress[0] = len(present)
            if len(present) < count:
                return None
            values = self._multi_get(present, deadline)
            if values is None:  # a key vanished between the two requests: poll again
                return None
            matched = sorted(by_full[k] for k, v in zip(present, values, strict=True) if v == want)
            progress[1] = len(matched)
            return matched if len(matched) >= count else None

        found = self._poll(timeout, probe)
        if found is None:
            raise KVTimeoutError(
                f"wait_for_keys({prefix + key_pattern!r}) timed out after {timeout}s:"
                f" {progress[1]} of {count} needed keys had the expected value;"
                f" {progress[0]} of {len(fulls)} candidate keys existed"
            )
        return found

    def _multi_get(self, fulls: list[str], deadline: float) -> list[bytes] | None:
        """Values of keys that existed a moment ago; None if one was deleted meanwhile.

        multi_get blocks on a missing key until the store's timeout, so for a store it
        created this bounds that timeout by the caller's deadline.
        """

        def do(store: Any) -> list[bytes]:
            if not self._owns_store:
                return [bytes(v) for v in store.multi_get(fulls)]
            bound = min(self._timeout, max(deadline - time.monotonic(), 0.001))
            store.set_timeout(timedelta(seconds=bound))
            try:
                return [bytes(v) for v in store.multi_get(fulls)]
            finally:
                store.set_timeout(timedelta(seconds=self._timeout))

        try:
            return self._call("multi_get", do)
        except KVTimeoutError:
            return None

    def _poll(self, timeout: float, probe: Callable[[], _T | None]) -> _T | None:
        """Call ``probe`` until it returns non-None or ``timeout`` passes (last try at the end)."""
        deadline = time.monotonic() + timeout
        delay = _POLL_START
        while True:
            result = probe()
            if result is not None:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)

    def close(self, cleanup: bool = True) -> None:
        """Release the TCPStore; idempotent. Later calls raise StoreClosedError.

        ``cleanup`` is ignored: TCPStore keeps its keys (the interface makes cleanup etcd-only),
        and they go away with the server. A store that started the server stops it here
        once no other reference to the torch store remains.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._store = None


def _first_line(exc: BaseException) -> str:
    """torch appends a C++ stack trace to its messages; keep the readable first line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
