"""One shared etcd Watch stream per :class:`~etha.kvstore.etcd_client.EtcdClient`.

:class:`WatchHub` keeps a single bidirectional ``Watch`` stream (a request queue that
gRPC consumes, plus one reader thread) and multiplexes any number of :class:`Watcher`
objects over it. Contracts:

* every watcher sees events in revision order, starting at its ``start_revision``;
* a watch the server cancels (permission denied, compaction, anything else) fails its
  watcher at once, so nobody waits forever on a dead watch;
* when the stream breaks (member restart or crash) the hub reconnects, failing over to
  the next endpoint with backoff, and re-creates every live watch from the revision
  after the last event it delivered: no event is lost or repeated;
* a watch on a compacted revision fails its watcher with :class:`WatchCompacted`; the
  caller re-reads and watches again from the new revision.

etcd checks the permission of a watch when it is created, using the token the stream
was opened with. That token may have expired on an idle stream, which etcd reports as
"permission denied": before failing a watcher with :class:`PermissionDeniedError` the
hub checks the grant with a unary read (which logs in again if needed), and re-opens
the stream with the fresh token when the read is allowed.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from pyetcd import etcdrpc

from etha.kvstore.errors import (
    KVStoreError,
    PermissionDeniedError,
    StoreClosedError,
)

if TYPE_CHECKING:
    from etha.kvstore.etcd_client import EtcdClient, _Connection

#: Event types of ``mvccpb.Event``.
PUT = 0
DELETE = 1

_MAX_BACKOFF = 1.0
_STOP = None


class WatchCompacted(KVStoreError):
    """The watch's start revision was compacted away: read again and re-watch."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(
            f"the watched revision was compacted (compact revision {compact_revision});"
            " read the current state and watch again"
        )
        self.compact_revision = compact_revision


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


#: Tag of ``WatchCreateRequest.watch_id`` (field 7, varint), which the generated stubs of
#: etcd-sdk-python predate.
_WATCH_ID_TAG = b"\x38"


def _create_request(watcher: Watcher) -> Any:
    # The watch id is chosen here (etcd >= 3.4) instead of by the server: etcd 3.5 answers
    # a refused create with the request's watch id, and when that is 0 ("assign one") its
    # send loop forgets the live watch that really has id 0, whose events are then held
    # back forever. Ids chosen by us start at 1 and are unique per stream.
    create = etcdrpc.WatchCreateRequest(
        key=watcher.key,
        range_end=watcher.range_end,
        start_revision=watcher.next_revision,
    )
    raw = create.SerializeToString() + _WATCH_ID_TAG + _varint(watcher.local_id)
    return etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest.FromString(raw))


def _cancel_request(watch_id: int) -> Any:
    return etcdrpc.WatchRequest(cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id))


class Watcher:
    """One watch on ``[key, range_end)`` (or just ``key``), fed by a :class:`WatchHub`.

    Use :meth:`get` to take the next batch of events and :meth:`cancel` (or ``with``)
    when done. Thread-safe. With ``apply``, the events are folded by ``apply`` in the
    hub's reader thread and :meth:`get` returns its first non-None result instead:
    a waiter then wakes once, not once per event (a barrier of N ranks sees N events).
    """

    __slots__ = (
        "_apply",
        "_done",
        "_error",
        "_hub",
        "_queue",
        "cancelled",
        "denied_once",
        "key",
        "local_id",
        "next_revision",
        "range_end",
        "watch_id",
    )

    def __init__(
        self,
        hub: WatchHub,
        local_id: int,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        apply: Callable[[Any], Any] | None = None,
    ) -> None:
        self._hub = hub
        self._apply = apply
        self._done = False
        self.local_id = local_id
        self.key = key
        self.range_end = range_end
        #: the revision the watch resumes from after a reconnect
        self.next_revision = start_revision
        self.watch_id: int | None = None
        self.cancelled = False
        self.denied_once = False
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None

    def get(self, timeout: float | None) -> Any | None:
        """The next non-empty batch of events (``mvccpb.Event`` objects), or None on timeout.

        With ``apply``: the result of ``apply`` once it is not None (or None on timeout).

        :raises WatchCompacted: the start revision was compacted; re-read and re-watch
        :raises PermissionDeniedError: the user may not watch this range
        :raises KVStoreError: the server cancelled the watch for another reason
        :raises StoreClosedError: the hub was closed
        """
        if self._error is not None:
            raise self._error
        try:
            item = (
                self._queue.get(timeout=timeout)
                if timeout is None or timeout > 0
                else (self._queue.get_nowait())
            )
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def cancel(self) -> None:
        """Stop the watch. Idempotent."""
        self._hub._cancel(self)

    def _push(self, events: Any) -> None:
        apply = self._apply
        if apply is None:
            self._queue.put(events)
            return
        if self._done:
            return
        try:
            result = apply(events)
        except Exception as exc:  # the waiter must hear of it, not hang
            self._done = True
            self._queue.put(exc)
            return
        if result is not None:
            self._done = True
            self._queue.put(result)

    def _fail(self, error: BaseException) -> None:
        self._queue.put(error)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __repr__(self) -> str:
        return f"Watcher(key={self.key!r}, range_end={self.range_end!r}, next={self.next_revision})"


class WatchHub:
    """Many watchers over one Watch stream of ``client``; see the module docstring."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._watchers: dict[int, Watcher] = {}
        self._by_watch_id: dict[int, Watcher] = {}
        #: watchers whose create request went out on the current stream, in order: etcd
        #: answers creates in order, and answers a refused one with watch id -1
        self._pending: deque[Watcher] = deque()
        self._requests: queue.SimpleQueue[Any] | None = None
        self._stream: Any = None
        self._restart = False
        self._closed = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._endpoint: str | None = None
        self._last_error: str | None = None
        self._down_since: float | None = None

    # -- public API ----------------------------------------------------------------------

    def watch(
        self,
        key: bytes,
        range_end: bytes | None = None,
        start_revision: int = 0,
        apply: Callable[[Any], Any] | None = None,
    ) -> Watcher:
        """Watch ``key`` (or ``[key, range_end)``) from ``start_revision`` (0: from now).

        :param apply: optional fold over event batches, run in the hub's reader thread
            (keep it short and non-blocking); see :class:`Watcher`
        """
        with self._lock:
            if self._closed:
                raise StoreClosedError("the etcd watch hub is closed; open a new store")
            watcher = Watcher(self, next(self._ids), key, range_end or b"", start_revision, apply)
            self._watchers[watcher.local_id] = watcher
            if self._requests is not None:
                self._pending.append(watcher)
                self._requests.put(_create_request(watcher))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="etha-etcd-watch", daemon=True
                )
                self._thread.start()
        return watcher

    def describe(self) -> str:
        """The stream's state, for error messages."""
        with self._lock:
            if self._requests is not None:
                return f"watch stream connected to {self._endpoint}"
            if self._down_since is None:
                return "watch stream connecting"
            down = time.monotonic() - self._down_since
            return (
                f"watch stream disconnected for {down:.1f}s (last error: {self._last_error});"
                " etcd may be down or unreachable"
            )

    @property
    def connected(self) -> bool:
        return self._requests is not None

    def close(self) -> None:
        """Fail every watcher with StoreClosedError, end the stream, join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watchers = list(self._watchers.values())
            self._watchers.clear()
            self._by_watch_id.clear()
            self._pending.clear()
            requests, self._requests = self._requests, None
            stream = self._stream
            thread = self._thread
        for watcher in watchers:
            watcher.cancelled = True
            watcher._fail(StoreClosedError("the etcd client was closed during a watch"))
        if requests is not None:
            requests.put(_STOP)
        if stream is not None:
            stream.cancel()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    # -- internals -----------------------------------------------------------------------

    def _cancel(self, watcher: Watcher) -> None:
        with self._lock:
            if watcher.cancelled:
                return
            watcher.cancelled = True
            self._watchers.pop(watcher.local_id, None)
            watch_id = watcher.watch_id
            if watch_id is not None:
                self._by_watch_id.pop(watch_id, None)
                if self._requests is not None:
                    self._requests.put(_cancel_request(watch_id))
            # A watcher still pending is cancelled when its "created" answer arrives.

    def _run(self) -> None:
        client = self._client
        backoff = 0.05
        conn: _Connection | None = None
        while not self._closed:
            try:
                conn = client._connection()
                md = client._token_metadata()
            except StoreClosedError:
                break
            except KVStoreError as exc:
                self._note_down(str(exc))
                self._wake.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
            with self._lock:
                if self._closed:
                    break
                self._pending.clear()
                self._by_watch_id.clear()
                for watcher in self._watchers.values():
                    watcher.watch_id = None
                    self._pending.append(watcher)
                    requests.put(_create_request(watcher))
                self._restart = False
                # Opened under the lock so that close() always sees the stream to cancel.
                stream = conn.stub("Watch").Watch(iter(requests.get, _STOP), metadata=md)
                self._stream = stream
                self._requests = requests
                self._endpoint = str(conn.endpoint)
            error = "the server ended the watch stream"
            code: grpc.StatusCode | None = None
            try:
                for response in stream:
                    backoff = 0.05
                    self._handle(response, stream)
            except grpc.RpcError as exc:
                code = exc.code()
                error = f"{code.name}: {exc.details()}"
            except Exception as exc:  # a bug must not leave waiters hanging forever
                error = f"{type(exc).__name__}: {exc}"
                code = None
            finally:
                with self._lock:
                    if self._requests is requests:
                        self._requests = None
                requests.put(_STOP)
                stream.cancel()
            if self._closed:
                break
            if self._restart:
                continue
            self._note_down(error)
            if code is grpc.StatusCode.UNAUTHENTICATED or "auth token" in error:
                try:
                    client._relogin(md)
                except KVStoreError as exc:
                    self._note_down(str(exc))
            else:
                try:
                    conn = client._failover(conn)
                except StoreClosedError:
                    break
            self._wake.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
        self._fail_all_closed()

    def _fail_all_closed(self) -> None:
        with self._lock:
            self._closed = True
            watchers = list(self._watchers.values())
            self._watchers.clear()
        for watcher in watchers:
            watcher.cancelled = True
            watcher._fail(StoreClosedError("the etcd client was closed during a watch"))

    def _note_down(self, error: str) -> None:
        with self._lock:
            self._last_error = error
            if self._down_since is None:
                self._down_since = time.monotonic()

    def _handle(self, response: Any, stream: Any) -> None:
        if response.created:
            with self._lock:
                self._down_since = None
                watcher = self._pending.popleft() if self._pending else None
                if watcher is None:
                    return
                if not response.canceled:
                    if watcher.cancelled:
                        if self._requests is not None:
                            self._requests.put(_cancel_request(response.watch_id))
                        return
                    watcher.watch_id = response.watch_id
                    watcher.denied_once = False
                    self._by_watch_id[response.watch_id] = watcher
                    if watcher.next_revision == 0:
                        # "From now" is fixed at creation, so a reconnect resumes there.
                        watcher.next_revision = response.header.revision + 1
            if response.canceled:
                self._on_cancel(watcher, response, stream)
                return
        else:
            watcher = self._by_watch_id.get(response.watch_id)
            if watcher is None:
                return
            if response.canceled:
                with self._lock:
                    self._by_watch_id.pop(response.watch_id, None)
                self._on_cancel(watcher, response, stream)
                return
        events = response.events
        if events:
            watcher.next_revision = events[-1].kv.mod_revision + 1
            watcher._push(events)

    def _on_cancel(self, watcher: Watcher, response: Any, stream: Any) -> None:
        if watcher.cancelled:
            return
        reason: str = response.cancel_reason
        error: KVStoreError
        if response.compact_revision:
            error = WatchCompacted(int(response.compact_revision))
        elif "permission denied" in reason:
            if not watcher.denied_once and self._token_may_be_stale(watcher):
                # Keep the watcher; it is re-created on a stream with a fresh token.
                watcher.denied_once = True
                self._restart = True
                stream.cancel()
                return
            who = self._client.username
            error = PermissionDeniedError(
                f"etcd refused a watch on {watcher.key.decode(errors='replace')!r}"
                f"{' for user ' + repr(who) if who else ''}: permission denied;"
                " ask for a role that grants read access to this key range"
            )
        else:
            error = KVStoreError(
                f"etcd cancelled the watch on {watcher.key.decode(errors='replace')!r}:"
                f" {reason or 'no reason given'}"
            )
        with self._lock:
            watcher.cancelled = True
            self._watchers.pop(watcher.local_id, None)
        watcher._fail(error)

    def _token_may_be_stale(self, watcher: Watcher) -> bool:
        """True if a read of the watched range is allowed (so the stream's token is bad)."""
        client = self._client
        if client._password is None:
            return False
        try:
            client.range(
                watcher.key, watcher.range_end or None, count_only=True,
                timeout=min(client.timeout, 5.0),
            )  # fmt: skip
        except PermissionDeniedError:
            return False
        except KVStoreError:
            # Cannot tell; retrying on a new stream is the safe side.
            return True
        return True


__all__ = ["DELETE", "PUT", "WatchCompacted", "WatchHub", "Watcher"]
