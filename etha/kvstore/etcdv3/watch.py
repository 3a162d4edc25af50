"""One shared etcd Watch stream per :class:`~etha.kvstore.etcdv3.transport.Transport`.

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
  caller re-reads and watches again from the new revision;
* with several endpoints, a stream silent for :data:`PROBE_AFTER` seconds gets a progress
  request; when the member does not answer it within :data:`PROBE_TIMEOUT` seconds (it
  is hung: SIGSTOP, a partition; its TCP connection stays open, so gRPC sees nothing)
  the hub fails over as if the stream had broken, and moves the client's unary calls
  to the next member too.

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
from typing import Any

import grpc
from pyetcd import etcdrpc

from etha.kvstore.errors import (
    KVStoreError,
    PermissionDeniedError,
    QuotaExceededError,
    StoreClosedError,
)
from etha.kvstore.etcdv3.transport import Connection, Transport

#: Event types of ``mvccpb.Event``.
PUT = 0
DELETE = 1

_MAX_BACKOFF = 1.0
_STOP = None
#: Seconds of silence on a stream with watches before the hub asks the member for progress.
PROBE_AFTER = 2.0
#: Seconds a member has to answer that progress request before it is taken as hung.
PROBE_TIMEOUT = 3.0
#: How an etha gateway's quota refusal of a watch starts (then the quota's name).
_QUOTA_REASON = "etha gateway: quota exceeded: "
_PROGRESS_REQUEST = etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())


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


def _create_request(watcher: _ServerWatch) -> Any:
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
        "_server",
        "cancelled",
        "key",
        "range_end",
        "start_revision",
    )

    def __init__(
        self,
        hub: WatchHub,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        apply: Callable[[Any], Any] | None = None,
    ) -> None:
        self._hub = hub
        self._apply = apply
        self._done = False
        self.key = key
        self.range_end = range_end
        #: events before this revision are not delivered to this watcher
        self.start_revision = start_revision
        self.cancelled = False
        self._server: _ServerWatch | None = None
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
            if timeout is None or timeout > 0:
                item = self._queue.get(timeout=timeout)
            else:
                item = self._queue.get_nowait()
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
        if events[0].kv.mod_revision < self.start_revision:
            # Joined a shared server watch that was further behind.
            events = [e for e in events if e.kv.mod_revision >= self.start_revision]
            if not events:
                return
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
        return (
            f"Watcher(key={self.key!r}, range_end={self.range_end!r}, start={self.start_revision})"
        )


class _ServerWatch:
    """One watch on the server, shared by every :class:`Watcher` of the same range
    whose start revision it has not passed yet."""

    __slots__ = (
        "cancelled",
        "denied_once",
        "key",
        "local_id",
        "next_revision",
        "range_end",
        "subs",
        "watch_id",
    )

    def __init__(self, local_id: int, key: bytes, range_end: bytes, start_revision: int) -> None:
        self.local_id = local_id
        self.key = key
        self.range_end = range_end
        #: the revision the watch resumes from after a reconnect
        self.next_revision = start_revision
        self.watch_id: int | None = None
        self.cancelled = False
        self.denied_once = False
        self.subs: list[Watcher] = []


class WatchHub:
    """Many watchers over one Watch stream of ``client``; see the module docstring.

    The hub uses only the transport's public methods (connection, token, failover).

    Watchers of the same range share one server-side watch when the newcomer's start
    revision is not behind what that watch has already delivered: N threads of one
    process waiting on the same barrier prefix cost one stream of events, not N.
    """

    def __init__(self, client: Transport) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._watches: dict[int, _ServerWatch] = {}
        self._by_range: dict[tuple[bytes, bytes], _ServerWatch] = {}
        self._by_watch_id: dict[int, _ServerWatch] = {}
        #: watches whose create request went out on the current stream, in order: etcd
        #: answers creates in order
        self._pending: deque[_ServerWatch] = deque()
        self._requests: queue.SimpleQueue[Any] | None = None
        self._stream: Any = None
        self._restart = False
        self._closed = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._endpoint: str | None = None
        self._last_error: str | None = None
        self._down_since: float | None = None
        #: monotonic time of the last response on the current stream
        self._heard_at = 0.0
        #: the stream given up on as hung (its end is a failover, not a plain restart)
        self._hung_stream: Any = None
        self._prober: threading.Thread | None = None

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
        end = range_end or b""
        watcher = Watcher(self, key, end, start_revision, apply)
        with self._lock:
            if self._closed:
                raise StoreClosedError("the etcd watch hub is closed; open a new store")
            shared = self._by_range.get((key, end))
            if (
                shared is not None
                and not shared.cancelled
                and shared.next_revision > 0  # "from now" is not known until created
                and start_revision >= shared.next_revision
            ):
                shared.subs.append(watcher)
                watcher._server = shared
                return watcher
            server = _ServerWatch(next(self._ids), key, end, start_revision)
            server.subs.append(watcher)
            watcher._server = server
            self._watches[server.local_id] = server
            self._by_range[(key, end)] = server
            if self._requests is not None:
                self._pending.append(server)
                self._requests.put(_create_request(server))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="etha-etcd-watch", daemon=True
                )
                self._thread.start()
                if len(self._client.endpoints) > 1:
                    self._prober = threading.Thread(
                        target=self._probe, name="etha-etcd-watch-probe", daemon=True
                    )
                    self._prober.start()
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

    @property
    def server_watches(self) -> int:
        """How many watches are open on the server (shared ones count once)."""
        return len(self._watches)

    def close(self) -> None:
        """Fail every watcher with StoreClosedError, end the stream, join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = self._drop_all()
            requests, self._requests = self._requests, None
            stream = self._stream
            threads = [self._thread, self._prober]
        self._fail_subs(watches, StoreClosedError("the etcd client was closed during a watch"))
        if requests is not None:
            requests.put(_STOP)
        if stream is not None:
            stream.cancel()
        self._wake.set()
        for thread in threads:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=30)

    # -- internals -----------------------------------------------------------------------

    def _drop_all(self) -> list[_ServerWatch]:
        watches = list(self._watches.values())
        self._watches.clear()
        self._by_range.clear()
        self._by_watch_id.clear()
        self._pending.clear()
        return watches

    @staticmethod
    def _fail_subs(watches: list[_ServerWatch], error: BaseException) -> None:
        for server in watches:
            server.cancelled = True
            for watcher in server.subs:
                watcher.cancelled = True
                watcher._fail(error)

    def _forget(self, server: _ServerWatch) -> None:
        """Drop ``server`` from the hub's maps (the lock is held)."""
        server.cancelled = True
        self._watches.pop(server.local_id, None)
        if self._by_range.get((server.key, server.range_end)) is server:
            del self._by_range[(server.key, server.range_end)]
        if server.watch_id is not None:
            self._by_watch_id.pop(server.watch_id, None)

    def _cancel(self, watcher: Watcher) -> None:
        with self._lock:
            if watcher.cancelled:
                return
            watcher.cancelled = True
            server = watcher._server
            if server is None or server.cancelled:
                return
            if watcher in server.subs:
                server.subs.remove(watcher)
            if server.subs:
                return
            self._forget(server)
            if server.watch_id is not None and self._requests is not None:
                self._requests.put(_cancel_request(server.watch_id))
            # A watch still pending is cancelled when its "created" answer arrives.

    def _run(self) -> None:
        client = self._client
        backoff = 0.05
        conn: Connection | None = None
        while not self._closed:
            try:
                conn = client.connection()
                md = client.token_metadata()
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
                for server in self._watches.values():
                    server.watch_id = None
                    self._pending.append(server)
                    requests.put(_create_request(server))
                self._restart = False
                # Opened under the lock so that close() always sees the stream to cancel.
                stream = conn.stub("Watch").Watch(iter(requests.get, _STOP), metadata=md)
                self._stream = stream
                self._requests = requests
                self._endpoint = str(conn.endpoint)
                self._heard_at = time.monotonic()
            error = "the server ended the watch stream"
            code: grpc.StatusCode | None = None
            try:
                for response in stream:
                    self._heard_at = time.monotonic()
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
            if self._hung_stream is stream:
                error = (
                    f"{conn.endpoint} did not answer a watch progress request within"
                    f" {PROBE_TIMEOUT:g}s"
                )
            elif self._restart:
                continue
            self._note_down(error)
            if code is grpc.StatusCode.UNAUTHENTICATED or "auth token" in error:
                try:
                    client.relogin(md)
                except PermissionDeniedError as exc:
                    # The credentials were revoked (an etha gateway ends the streams of a
                    # revoked tenant): no watch can be re-created, so fail the waits now
                    # rather than let them run into their timeouts.
                    with self._lock:
                        watches = self._drop_all()
                    self._fail_subs(watches, exc)
                except KVStoreError as exc:
                    self._note_down(str(exc))
            else:
                try:
                    conn = client.failover(conn)
                except StoreClosedError:
                    break
            self._wake.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
        with self._lock:
            self._closed = True
            watches = self._drop_all()
        self._fail_subs(watches, StoreClosedError("the etcd client was closed during a watch"))

    def _probe(self) -> None:
        """Give up on a stream whose member stopped answering (see the module docstring)."""
        asked: tuple[Any, float] | None = None  # (stream, when) of the pending request
        while not self._closed:
            self._wake.wait(PROBE_AFTER / 4)
            with self._lock:
                stream, requests = self._stream, self._requests
                watching = bool(self._by_watch_id) or bool(self._pending)
            now = time.monotonic()
            if requests is None or not watching or self._heard_at > now - PROBE_AFTER:
                asked = None
                continue
            if asked is None or asked[0] is not stream or self._heard_at > asked[1]:
                asked = (stream, now)
                requests.put(_PROGRESS_REQUEST)
            elif now - asked[1] > PROBE_TIMEOUT:
                asked = None
                self._hung_stream = stream
                stream.cancel()

    def _note_down(self, error: str) -> None:
        with self._lock:
            self._last_error = error
            if self._down_since is None:
                self._down_since = time.monotonic()

    def _handle(self, response: Any, stream: Any) -> None:
        if response.created:
            with self._lock:
                self._down_since = None
                server = self._pending.popleft() if self._pending else None
                if server is None:
                    return
                if not response.canceled:
                    if server.cancelled:
                        if self._requests is not None:
                            self._requests.put(_cancel_request(response.watch_id))
                        return
                    server.watch_id = response.watch_id
                    server.denied_once = False
                    self._by_watch_id[response.watch_id] = server
                    if server.next_revision == 0:
                        # "From now" is fixed at creation, so a reconnect resumes there.
                        server.next_revision = response.header.revision + 1
            if response.canceled:
                self._on_cancel(server, response, stream)
            return
        server = self._by_watch_id.get(response.watch_id)
        if server is None:
            return
        if response.canceled:
            self._on_cancel(server, response, stream)
            return
        events = response.events
        if events:
            with self._lock:
                # Under the lock: a watcher joins only if this watch has not passed its
                # start revision, and then it is in the list delivered to below.
                server.next_revision = events[-1].kv.mod_revision + 1
                subs = list(server.subs)
            for watcher in subs:
                watcher._push(events)

    def _on_cancel(self, server: _ServerWatch, response: Any, stream: Any) -> None:
        if server.cancelled:
            return
        reason: str = response.cancel_reason
        error: KVStoreError
        key = server.key.decode(errors="replace")
        if response.compact_revision:
            error = WatchCompacted(int(response.compact_revision))
        elif "permission denied" in reason:
            if not server.denied_once and self._token_may_be_stale(server):
                # Keep the watch; it is re-created on a stream with a fresh token.
                server.denied_once = True
                self._restart = True
                stream.cancel()
                return
            who = self._client.username
            error = PermissionDeniedError(
                f"etcd refused a watch on {key!r}"
                f"{' for user ' + repr(who) if who else ''}: permission denied;"
                " ask for a role that grants read access to this key range"
            )
        elif reason.startswith(_QUOTA_REASON):
            # An etha gateway refused the watch for a tenant quota ("watches").
            quota = reason[len(_QUOTA_REASON) :].split(" ", 1)[0]
            error = QuotaExceededError(f"watch on {key!r} refused: {reason}", quota=quota)
        else:
            error = KVStoreError(
                f"etcd cancelled the watch on {key!r}: {reason or 'no reason given'}"
            )
        with self._lock:
            self._forget(server)
        self._fail_subs([server], error)

    def _token_may_be_stale(self, server: _ServerWatch) -> bool:
        """True if a read of the watched range is allowed (so the stream's token is bad)."""
        client = self._client
        if not client.logs_in:
            return False
        request = etcdrpc.RangeRequest(key=server.key, count_only=True)
        if server.range_end:
            request.range_end = server.range_end
        try:
            client.send("KV", "Range", request, min(client.timeout, 5.0))
        except PermissionDeniedError:
            return False
        except KVStoreError:
            # Cannot tell; retrying on a new stream is the safe side.
            return True
        return True


__all__ = ["DELETE", "PUT", "WatchCompacted", "WatchHub", "Watcher"]
