"""Server-side waits: ``Coordination.Wait`` in O(N) for a barrier of N callers.

Without the gateway every waiter of a barrier watches the whole barrier prefix, so
etcd sends N events to each of N watchers. Here a gateway replica holds, per tenant
with waiters, **one** upstream watch over the tenant's range and a mirror of the range:

* **load at R, watch from R + 1**: the mirror is loaded with one paged read at revision
  ``R``, then one watch from ``R + 1`` keeps it current; after a compaction (the watch
  is cancelled with a compact revision) the range is read again and watched again;
  when the stream breaks it is re-opened from the revision after the last one applied,
  so no event is lost; when the tenant has had no waiter for :data:`LINGER` seconds the
  watch and the mirror are dropped.
* **condition groups**: waiters with the same condition (mode, range, pattern, count,
  value) share one :class:`_Group`. An event is routed only to the groups whose key
  or literal prefix it falls under (a dict lookup per distinct prefix length), each
  group keeps its matched keys incrementally, and a satisfied group answers all its
  waiters with one serialized response. A barrier of N waiters: N events in, N
  answers out.
* **freshness**: an answer must never come from a state older than the call. On
  arrival a waiter is parked until the mirror has caught up with etcd's revision at
  arrival: waiters that arrive before the first load is sent are covered by that
  (linearizable) read; later ones by a ``WatchProgressRequest`` on the tenant's
  stream, one for every batch of waiters that arrived while the previous one was in
  flight. etcd before 3.5.8 may send a requested progress notification ahead of
  events of the revision it names (etcd-io/etcd#15220: the control and event channels
  of its send loop race), so a waiter counts as caught up only after a *second*
  progress answer, requested after the first arrived: by then the events of the
  first one's revision have left etcd's send loop. Rounds for waiters whose condition
  does not hold yet are paced (at most one per :data:`ROUND_GAP`): such a waiter is
  answered only after later events anyway, so its freshness is not urgent, and a
  barrier of N arrivals costs etcd a few hundred progress answers instead of one per
  millisecond of arrivals. A round is sent at once when a waiter's condition already
  holds and only freshness keeps it parked.

Confinement: the key, or the pattern's range, must lie inside the caller's tenant range
(:func:`etha.gateway.confine.check_range`), and every key a pattern can match starts
with the range's start key. Each waiter counts against the tenant's ``watches`` quota
while it waits. The gRPC deadline is the timeout: just before it the waiter is answered
``DEADLINE_EXCEEDED`` saying what was seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from pyetcd import etcdrpc

from etha.gateway.confine import Denied, check_range
from etha.kvstore import gateway_api as api
from etha.kvstore.etcd_client import prefix_range_end

if TYPE_CHECKING:
    from etha.gateway.registry import Tenant
    from etha.gateway.server import GatewayContext

log = logging.getLogger("etha.gateway.waits")

#: Seconds a tenant's watch and mirror stay after its last waiter left (barrier rounds
#: come one after another; reloading the range for each would cost a read per round).
LINGER = 10.0
#: The least time between two progress rounds that no satisfied waiter is parked on.
ROUND_GAP = 0.05
#: A waiter without a gRPC deadline waits at most this long (every wait has a timeout).
MAX_WAIT = 3600.0
#: Answered this long before the caller's deadline, so the caller gets our message (the
#: library gives a wait this much more than its timeout: the answer comes at the timeout).
DEADLINE_MARGIN = 0.5
#: Page size of the mirror's load.
LOAD_PAGE = 2000
#: Limits on a request's fields (bad input is refused, never stored).
MAX_PATTERN_BYTES = 4096
MAX_STARS = 16
MAX_COUNT = 1_000_000
MAX_VALUE_BYTES = 2 * 1024 * 1024
_PUT = 0
_PROGRESS = etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())


def glob_matcher(pattern: bytes) -> Callable[[bytes], bool]:
    """``key -> bool`` for a pattern whose ``*`` matches any bytes, in linear time.

    No regex: a hostile pattern with many stars must not backtrack. Greedy leftmost
    matching of the middle parts is exact for ``*``-only globs.
    """
    parts = pattern.split(b"*")
    if len(parts) == 1:
        return pattern.__eq__
    head, middle, tail = parts[0], parts[1:-1], parts[-1]
    shortest = sum(len(p) for p in parts)
    if not middle:

        def one_star(key: bytes) -> bool:
            return len(key) >= shortest and key.startswith(head) and key.endswith(tail)

        return one_star

    def many(key: bytes) -> bool:
        if len(key) < shortest or not key.startswith(head) or not key.endswith(tail):
            return False
        pos, stop = len(head), len(key) - len(tail)
        for part in middle:
            found = key.find(part, pos, stop)
            if found < 0:
                return False
            pos = found + len(part)
        return True

    return many


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


Condition = tuple[int, bytes, bytes, bytes, int, bytes | None]


def parse_condition(request: Any) -> Condition:
    """Check a WaitRequest's fields; the condition tuple that groups waiters."""
    mode = int(request.mode)
    key, range_end, pattern = bytes(request.key), bytes(request.range_end), bytes(request.pattern)
    value: bytes | None = bytes(request.value) if request.has_value else None
    if value is not None and len(value) > MAX_VALUE_BYTES:
        raise _Invalid(f"etha gateway: the value filter is over {MAX_VALUE_BYTES} bytes")
    if mode in (api.MODE_KEY, api.MODE_VALUE):
        if range_end or pattern or request.count:
            raise _Invalid("etha gateway: a key wait takes no range_end, pattern or count")
        if mode == api.MODE_VALUE and value is None:
            raise _Invalid("etha gateway: a value wait needs has_value and value")
        if mode == api.MODE_KEY and value is not None:
            mode = api.MODE_VALUE
        return (mode, key, b"", b"", 1, value)
    if mode != api.MODE_KEYS:
        raise _Invalid(f"etha gateway: unknown wait mode {mode}; use 1 (key), 2 (value), 3 (keys)")
    count = int(request.count)
    if not 1 <= count <= MAX_COUNT:
        raise _Invalid(f"etha gateway: count must be 1..{MAX_COUNT}, got {count}")
    if not key or range_end != prefix_range_end(key):
        raise _Invalid("etha gateway: a keys wait's range must be the prefix range of its key")
    if len(pattern) > MAX_PATTERN_BYTES or pattern.count(b"*") > MAX_STARS:
        raise _Invalid(f"etha gateway: pattern over {MAX_PATTERN_BYTES} bytes or {MAX_STARS} '*'s")
    if not pattern.split(b"*", 1)[0].startswith(key):
        raise _Invalid("etha gateway: the pattern must start with the range's key")
    return (mode, key, range_end, pattern, count, value)


class _Waiter:
    __slots__ = ("batch", "count_only", "future", "seq")

    def __init__(self, future: asyncio.Future[bytes], count_only: bool, seq: int) -> None:
        self.future = future
        self.count_only = count_only
        self.seq = seq
        #: the progress round this waiter is parked on (see _TenantWatch)
        self.batch = -1


class _Group:
    """Waiters sharing one condition, and that condition's matched keys."""

    __slots__ = (
        "cache", "condition", "count", "fresh", "key", "matched", "matches", "members", "mode",
        "parked", "want",
    )  # fmt: skip

    def __init__(self, condition: Condition) -> None:
        self.condition = condition
        mode, key, _end, pattern, count, want = condition
        self.mode = mode
        self.key = key
        self.count = count
        self.want = want
        self.matches = glob_matcher(pattern) if mode == api.MODE_KEYS else key.__eq__
        #: key -> value of the keys that satisfy the per-key condition now
        self.matched: dict[bytes, bytes] = {}
        #: waiters whose call the mirror has caught up with (a dict: ordered, O(1) removal)
        self.fresh: dict[_Waiter, None] = {}
        #: waiters of this group, fresh or parked
        self.members = 0
        #: of those, parked (not yet fresh)
        self.parked = 0
        #: the serialized answers while ``matched`` is unchanged
        self.cache: tuple[bytes, bytes] | None = None

    def update(self, key: bytes, value: bytes | None) -> None:
        if value is not None and self.matches(key) and (self.want is None or value == self.want):
            if self.matched.get(key) != value:
                self.matched[key] = value
                self.cache = None
        elif self.matched.pop(key, None) is not None:
            self.cache = None

    def load(self, mirror: dict[bytes, bytes]) -> None:
        self.matched.clear()
        self.cache = None
        if self.mode != api.MODE_KEYS:
            value = mirror.get(self.key)
            if value is not None:
                self.update(self.key, value)
            return
        key = self.key
        for k, v in mirror.items():
            if k.startswith(key):
                self.update(k, v)

    def done(self) -> bool:
        return len(self.matched) >= self.count

    def answer(self, revision: int) -> tuple[bytes, bytes]:
        """(full answer, count-only answer), serialized once while ``matched`` holds."""
        if self.cache is not None:
            return self.cache
        keys = sorted(self.matched)
        response = api.WaitResponse(revision=revision, count=len(keys))
        count_only = response.SerializeToString()
        response.keys.extend(keys)
        if self.want is None:
            response.values.extend(self.matched[k] for k in keys)
        self.cache = (response.SerializeToString(), count_only)
        return self.cache

    def seen(self) -> str:
        if self.mode == api.MODE_KEYS:
            return f"{len(self.matched)} of {self.count} keys matched"
        return "the key holds the value" if self.matched else "the key is missing or differs"


class _TenantWatch:
    """One tenant's mirror, upstream watch, groups and parked waiters."""

    def __init__(self, waits: Waits, tenant: Tenant) -> None:
        self.waits = waits
        self.username = tenant.username
        self.start, self.end = tenant.start, tenant.end
        self.mirror: dict[bytes, bytes] = {}
        #: every event up to this revision is in the mirror
        self.revision = 0
        self.loaded = False
        self.groups: dict[Condition, _Group] = {}
        self.by_key: dict[bytes, list[_Group]] = {}
        self.by_prefix: dict[bytes, list[_Group]] = {}
        self.prefix_lengths: dict[int, int] = {}
        self.waiter_count = 0
        self.idle_since: float | None = None
        #: arrival sequence; the load covers arrivals up to load_seq
        self._seq = itertools.count(1)
        self.load_seq = 0
        #: waiters parked until the mirror has caught up with their call
        self.parked: dict[_Waiter, _Group] = {}
        #: parked waiters by progress round: round k is answered by the k-th progress
        #: answer on the current stream; ``unsent`` wait for the next request
        self.rounds: dict[int, list[_Waiter]] = {}
        self.unsent: dict[_Waiter, None] = {}
        self.sent_rounds = 0
        self.answered_rounds = 0
        self.call: Any = None
        #: when the last progress round was sent (loop time), and the paced next one
        self.last_round = float("-inf")
        self.round_timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.write_lock = asyncio.Lock()

    # -- waiters -------------------------------------------------------------------------

    def add(self, condition: Condition, count_only: bool) -> tuple[_Waiter, _Group]:
        group = self.groups.get(condition)
        if group is None:
            group = self.groups[condition] = _Group(condition)
            if group.mode == api.MODE_KEYS:
                self.by_prefix.setdefault(group.key, []).append(group)
                n = len(group.key)
                self.prefix_lengths[n] = self.prefix_lengths.get(n, 0) + 1
            else:
                self.by_key.setdefault(group.key, []).append(group)
            if self.loaded:
                group.load(self.mirror)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), count_only, next(self._seq))
        self.waiter_count += 1
        group.members += 1
        self.idle_since = None
        self.parked[waiter] = group
        group.parked += 1
        if self.loaded:
            self.unsent[waiter] = None
            self._request_progress(urgent=group.done())
        return waiter, group

    def remove(self, waiter: _Waiter, group: _Group) -> None:
        self.waiter_count -= 1
        group.members -= 1
        if self.parked.pop(waiter, None) is not None:
            group.parked -= 1
        group.fresh.pop(waiter, None)
        self.unsent.pop(waiter, None)
        # (a waiter left in self.rounds is skipped there: it is no longer parked)
        if group.members == 0:
            self._drop_group(group)
        if self.waiter_count == 0:
            self.idle_since = time.monotonic()

    def _drop_group(self, group: _Group) -> None:
        if self.groups.get(group.condition) is not group:
            return
        del self.groups[group.condition]
        index = self.by_prefix if group.mode == api.MODE_KEYS else self.by_key
        bucket = index.get(group.key, [])
        with contextlib.suppress(ValueError):
            bucket.remove(group)
        if not bucket:
            index.pop(group.key, None)
        if group.mode == api.MODE_KEYS:
            n = len(group.key)
            left = self.prefix_lengths.get(n, 0) - 1
            if left > 0:
                self.prefix_lengths[n] = left
            else:
                self.prefix_lengths.pop(n, None)

    def _freshen(self, waiters: list[_Waiter]) -> None:
        """The mirror has caught up with these waiters' calls: evaluate them."""
        groups: dict[int, _Group] = {}
        for waiter in waiters:
            group = self.parked.pop(waiter, None)
            if group is None:
                continue
            group.parked -= 1
            if waiter.future.done():
                continue
            group.fresh[waiter] = None
            groups[id(group)] = group
        for group in groups.values():
            if group.done():
                self._answer(group)

    def _answer(self, group: _Group) -> None:
        full, count_only = group.answer(self.revision)
        for waiter in group.fresh:
            if not waiter.future.done():
                waiter.future.set_result(count_only if waiter.count_only else full)
        group.fresh.clear()

    # -- progress rounds -------------------------------------------------------------------

    def _request_progress(self, urgent: bool = False) -> None:
        """Send a progress request unless one is in flight; it serves every unsent waiter.

        Not ``urgent`` (no parked waiter's condition holds): not sooner than
        :data:`ROUND_GAP` after the previous one (a timer sends it then).
        """
        if self.call is None or self.sent_rounds > self.answered_rounds:
            return  # the answer to the round in flight asks again
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not urgent and now < self.last_round + ROUND_GAP:
            if self.round_timer is None:
                self.round_timer = loop.call_at(self.last_round + ROUND_GAP, self._round_due)
            return
        if self.round_timer is not None:
            self.round_timer.cancel()
            self.round_timer = None
        self.last_round = now
        self.sent_rounds += 1
        round_ = self.sent_rounds
        batch = list(self.unsent)
        for waiter in batch:
            waiter.batch = round_
        if batch:
            self.rounds[round_] = batch
        self.unsent.clear()
        self.waits.spawn(self._write(self.call, _PROGRESS))

    def _round_due(self) -> None:
        self.round_timer = None
        if self.rounds or self.unsent:
            self._request_progress(urgent=True)

    def _urgent(self) -> bool:
        """Is a parked waiter's condition already true (only freshness holds it back)?"""
        return any(g.parked and g.done() for g in self.groups.values())

    async def _write(self, call: Any, request: Any) -> None:
        # One write at a time on a stream (grpc: "too many operations" otherwise).
        async with self.write_lock:
            if call is not self.call:
                return
            # A broken stream is noticed (and replaced) by its reader.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError):
                await call.write(request)

    def _on_progress(self, revision: int) -> None:
        self.answered_rounds += 1
        self.revision = max(self.revision, revision)
        done_round = self.answered_rounds
        # A waiter of round k is fresh at the answer to round k + 1 (see the module doc).
        for round_ in [k for k in self.rounds if k < done_round]:
            self._freshen(self.rounds.pop(round_))
        # Ask again only for waiters still parked (a round's waiters may have left).
        for round_, batch in list(self.rounds.items()):
            if not any(w in self.parked for w in batch):
                del self.rounds[round_]
        if self.rounds or self.unsent:
            self._request_progress(urgent=self._urgent())

    # -- the upstream watch --------------------------------------------------------------

    async def run(self) -> None:
        upstream = self.waits.ctx.upstream
        backoff = 0.05
        while True:
            try:
                if not self.loaded:
                    await self._load()
                await self._stream()
                backoff = 0.05
            except asyncio.CancelledError:
                if self._stopped():
                    raise  # dropped by the reaper, or the server stops
                # grpc.aio reports a stream it cancelled itself this way: reconnect.
                log.info("tenant %s: wait stream cancelled; reconnecting", self.username)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            except _Compacted:
                log.info("tenant %s: wait watch revision compacted; reloading", self.username)
                self.loaded = False
                continue
            except Exception as exc:  # the stream broke: reconnect, never leave waiters
                log.info("tenant %s: wait stream ended: %s", self.username, exc)
                if isinstance(exc, grpc.aio.AioRpcError):
                    code = exc.code()
                    if code is grpc.StatusCode.UNAUTHENTICATED or "auth token" in (
                        exc.details() or ""
                    ):
                        with contextlib.suppress(Exception):
                            await upstream.login(upstream.metadata)
                    elif code is grpc.StatusCode.UNAVAILABLE:
                        upstream.note_stream_failure()
                elif "permission denied" in str(exc):
                    # etcd checks a watch with the stream's token: after an etcd restart
                    # the gateway's token is unknown there (the gateway user may read all).
                    with contextlib.suppress(Exception):
                        await upstream.login(upstream.metadata)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                self._end_stream()

    def stop(self) -> None:
        """End :meth:`run` (the reaper drops this tenant, or the server stops)."""
        self.stopping = True
        if self.task is not None:
            self.task.cancel()

    def _stopped(self) -> bool:
        """Was the cancellation :meth:`run` caught meant for it (not grpc's own)?"""
        if self.stopping:
            return True
        task = asyncio.current_task()
        # Task.cancelling() (Python 3.11+) also sees asyncio.run's cancel at exit.
        cancelling = getattr(task, "cancelling", None)
        return task is None or (cancelling is not None and cancelling() > 0)

    def _end_stream(self) -> None:
        call, self.call = self.call, None
        if self.round_timer is not None:
            self.round_timer.cancel()
            self.round_timer = None
        if call is not None:
            call.cancel()
        # Progress rounds of that stream will never be answered: ask again on the next.
        for batch in self.rounds.values():
            for waiter in batch:
                if waiter in self.parked:
                    waiter.batch = -1
                    self.unsent[waiter] = None
        self.rounds.clear()
        self.sent_rounds = self.answered_rounds = 0

    async def _load(self) -> None:
        upstream = self.waits.ctx.upstream
        seq = next(self._seq)
        mirror: dict[bytes, bytes] = {}
        key, revision = self.start, 0
        while True:
            request = etcdrpc.RangeRequest(
                key=key, range_end=self.end, limit=LOAD_PAGE, revision=revision
            )
            response = await upstream.call("KV", "Range", request)
            if not revision:
                revision = response.header.revision
            for kv in response.kvs:
                mirror[kv.key] = kv.value
            if not response.more or not response.kvs:
                break
            key = response.kvs[-1].key + b"\0"
        self.mirror = mirror
        self.revision = revision
        self.load_seq = seq
        self.loaded = True
        for group in self.groups.values():
            group.load(mirror)
            if group.fresh and group.done():  # after a reload: waiters already caught up
                self._answer(group)
        # The read is linearizable: it covers every waiter that arrived before it was sent.
        self._freshen([w for w in self.parked if w.seq < seq])
        for waiter in self.parked:
            if waiter.batch < 0:
                self.unsent[waiter] = None

    async def _stream(self) -> None:
        upstream = self.waits.ctx.upstream
        if upstream.metadata is None:
            await upstream.login()
        call = upstream.open_watch()
        self.call = call
        create = etcdrpc.WatchCreateRequest(
            key=self.start, range_end=self.end, start_revision=self.revision + 1
        )
        async with self.write_lock:
            await call.write(etcdrpc.WatchRequest(create_request=create))
        created = False
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise ConnectionError("etcd ended the watch stream")
            if response.created and not created:
                created = True
                if response.canceled:
                    raise self._cancelled(response)
                if self.unsent:
                    self._request_progress(urgent=True)
                continue
            if response.canceled:
                raise self._cancelled(response)
            if response.events:
                self._apply(response.events, response.header.revision)
            elif self.sent_rounds > self.answered_rounds:
                # A progress answer: no events (etcd 3.5 sends it with watch id -1).
                self._on_progress(response.header.revision)

    @staticmethod
    def _cancelled(response: Any) -> Exception:
        if response.compact_revision:
            return _Compacted()
        return ConnectionError(f"etcd cancelled the wait watch: {response.cancel_reason}")

    def _apply(self, events: Any, header_revision: int) -> None:
        mirror, by_key, by_prefix = self.mirror, self.by_key, self.by_prefix
        lengths = self.prefix_lengths
        touched: dict[int, _Group] = {}
        last = self.revision
        for event in events:
            kv = event.kv
            key = kv.key
            value: bytes | None
            if event.type == _PUT:
                value = kv.value
                mirror[key] = value
            else:
                value = None
                mirror.pop(key, None)
            last = kv.mod_revision
            for group in by_key.get(key, ()):
                group.update(key, value)
                touched[id(group)] = group
            for n in lengths:
                for group in by_prefix.get(key[:n], ()):
                    group.update(key, value)
                    touched[id(group)] = group
        self.revision = max(last, header_revision, self.revision)
        urgent = False
        for group in touched.values():
            if group.done():
                if group.fresh:
                    self._answer(group)
                urgent = urgent or group.parked > 0
        if urgent:
            self._request_progress(urgent=True)


class _Compacted(Exception):
    pass


class Waits:
    """The ``Wait`` handler of one gateway replica (see the module docstring)."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.tenants: dict[tuple[str, bytes, bytes], _TenantWatch] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._revocations = _Revocations()
        metrics = getattr(ctx, "metrics", None)
        registry = getattr(metrics, "registry", None)
        from prometheus_client import Counter, Gauge

        kwargs: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.pending = Gauge(
            "etha_gateway_waits_pending", "Waits in progress, by tenant", ["tenant"], **kwargs
        )
        self.outcomes = Counter(
            "etha_gateway_waits", "Waits answered, by outcome", ["outcome"], **kwargs
        )

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watch_for(self, tenant: Tenant) -> _TenantWatch:
        key = (tenant.username, tenant.start, tenant.end)
        watch = self.tenants.get(key)
        if watch is None:
            watch = self.tenants[key] = _TenantWatch(self, tenant)
            watch.task = asyncio.ensure_future(watch.run())
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())
        return watch

    async def _reap(self) -> None:
        """Drop tenants idle for LINGER seconds (their watch and mirror)."""
        while self.tenants:
            await asyncio.sleep(LINGER / 4)
            now = time.monotonic()
            for key, watch in list(self.tenants.items()):
                idle = watch.idle_since
                if watch.waiter_count == 0 and idle is not None and now - idle >= LINGER:
                    del self.tenants[key]
                    watch.stop()

    async def close(self) -> None:
        for watch in self.tenants.values():
            watch.stop()
        self.tenants.clear()
        self._revocations.close()
        if self._reaper is not None:
            self._reaper.cancel()

    async def wait(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """The ``Coordination.Wait`` handler; returns the serialized WaitResponse."""
        result: bytes = await answer(
            self.ctx, "Wait", context, lambda t: self._wait(request, context, t)
        )
        return result

    async def _wait(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any], tenant: Tenant
    ) -> bytes:
        try:
            condition = parse_condition(request)
        except _Invalid as exc:
            self.outcomes.labels("invalid").inc()
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from None
        try:
            check_range(tenant.start, tenant.end, condition[1], condition[2])
        except Denied:
            self.outcomes.labels("denied").inc()
            raise
        remaining = context.time_remaining()
        # A wait with timeout 0 arrives with DEADLINE_MARGIN left: half of that still
        # lets an already-true condition be confirmed fresh (one progress round).
        budget = (
            MAX_WAIT
            if remaining is None
            else max(remaining - DEADLINE_MARGIN, min(remaining, DEADLINE_MARGIN) / 2)
        )
        self.ctx.quotas.open_watch(tenant)
        watch = self._watch_for(tenant)
        waiter, group = watch.add(condition, bool(request.count_only))
        gauge = self.pending.labels(tenant.username)
        gauge.inc()
        revoked = self.ctx.registry.revoked(tenant)
        self._revocations.add(revoked, waiter.future)
        try:
            result = await asyncio.wait_for(waiter.future, budget)
        except asyncio.TimeoutError:
            self.outcomes.labels("timeout").inc()
            seen = group.seen()
            if waiter in watch.parked:
                seen += "; etcd's revision at the call was not confirmed yet"
            raise Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"etha gateway: wait timed out ({seen})"
            ) from None
        except asyncio.CancelledError:
            self.outcomes.labels("cancelled").inc()
            raise
        finally:
            self._revocations.discard(revoked, waiter.future)
            gauge.dec()
            watch.remove(waiter, group)
            self.ctx.quotas.close_watch(tenant)
        self.outcomes.labels("ok").inc()
        return result


def _gone() -> Refused:
    """etcd's answer to a token that no longer counts (the client's new log-in then fails)."""
    return Refused(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")


class _Revocations:
    """Ends the waits of a revoked tenant at once, as its watches end.

    One listener task per revocation event (one per tenant identity with waiters), not
    one per waiter: a barrier of N waiters costs one task here.
    """

    def __init__(self) -> None:
        self._by_event: dict[asyncio.Event, tuple[dict[asyncio.Future[bytes], None], Any]] = {}

    def add(self, event: asyncio.Event, future: asyncio.Future[bytes]) -> None:
        """Fail ``future`` with :func:`_gone` when ``event`` is set (at once if it is)."""
        if event.is_set():
            future.set_exception(_gone())
            return
        entry = self._by_event.get(event)
        if entry is None:
            futures: dict[asyncio.Future[bytes], None] = {}
            entry = self._by_event[event] = (futures, asyncio.ensure_future(self._listen(event)))
        entry[0][future] = None

    def discard(self, event: asyncio.Event, future: asyncio.Future[bytes]) -> None:
        entry = self._by_event.get(event)
        if entry is None:
            return
        entry[0].pop(future, None)
        if not entry[0]:
            del self._by_event[event]
            entry[1].cancel()

    async def _listen(self, event: asyncio.Event) -> None:
        await event.wait()
        futures, _ = self._by_event.pop(event, ({}, None))
        for future in futures:
            if not future.done():
                future.set_exception(_gone())

    def close(self) -> None:
        for _, task in self._by_event.values():
            task.cancel()
        self._by_event.clear()


class Refused(Exception):
    """An answer the Coordination handlers give themselves (``code``, ``message``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def answer(
    ctx: GatewayContext,
    method: str,
    context: grpc.aio.ServicerContext[Any, Any],
    handler: Callable[[Tenant], Awaitable[Any]],
) -> Any:
    """Authenticate, rate-limit and run ``handler``; turn refusals into this RPC's status.

    Codes and messages are etcd's own where etcd has one (a bad token, a denied range),
    the quota refusal carries ``etha-quota`` trailing metadata, and every answer is
    counted in ``etha_gateway_requests_total``.
    """
    from etha.gateway.quota import QuotaExceeded
    from etha.gateway.server import Refusal

    metrics = ctx.metrics
    start = time.perf_counter()
    code = "OK"
    username = ""
    abort: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None
    try:
        tenant = await ctx.tenant(context)
        username = tenant.username
        ctx.quotas.take_request(tenant)
        return await handler(tenant)
    except Refusal as exc:
        if exc.reason:
            metrics.denials.labels(username, exc.reason).inc()
        abort = (exc.code, exc.message, exc.trailing)
    except QuotaExceeded as exc:
        refusal = Refusal.quota(exc)
        metrics.denials.labels(username, refusal.reason or "quota").inc()
        abort = (refusal.code, refusal.message, refusal.trailing)
    except Denied as exc:
        metrics.denials.labels(username, exc.reason).inc()
        abort = (exc.code, exc.message, ())
    except Refused as exc:
        abort = (exc.code, exc.message, ())
    except grpc.aio.AioRpcError as exc:  # etcd's own refusal, passed on unchanged
        abort = (exc.code(), exc.details() or "", ())
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    finally:
        if abort is not None:
            code = abort[0].name
        metrics.requests.labels(method, code, username).inc()
        metrics.request_seconds.labels(method).observe(time.perf_counter() - start)
    await context.abort(abort[0], abort[1], trailing_metadata=abort[2])
    raise AssertionError("unreachable")  # abort raised


def add_to_server(server: grpc.aio.Server, ctx: GatewayContext) -> Waits:
    """Register ``etha.gateway.v1.Coordination`` (Wait and Add) on ``server``."""
    from etha.gateway.counter import Counters

    waits = Waits(ctx)
    counters = Counters(ctx)
    handler = grpc.method_handlers_generic_handler(
        api.SERVICE,
        {
            # Responses are serialized by the handlers: one answer serves many waiters.
            "Wait": grpc.unary_unary_rpc_method_handler(
                waits.wait, request_deserializer=api.WaitRequest.FromString
            ),
            "Add": grpc.unary_unary_rpc_method_handler(
                counters.add,
                request_deserializer=api.AddRequest.FromString,
                response_serializer=api.AddResponse.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    ctx_extras = getattr(ctx, "extensions", None)
    if isinstance(ctx_extras, dict):
        ctx_extras["waits"] = waits
        ctx_extras["counters"] = counters
    return waits


__all__ = ["LINGER", "Waits", "add_to_server", "glob_matcher", "parse_condition"]
