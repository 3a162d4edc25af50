"""Per-tenant quotas, and the guard that keeps etcd out of NOSPACE.

Quotas (names from :data:`etha.gateway.tenancy.QUOTA_NAMES`; 0 = unlimited):

* ``bytes`` / ``keys``: the tenant's stored data, counted as ``len(key) + len(value)``
  over its live keys. Scheme (exact and cheap, see docs/gateway.md "Quotas"): the first
  write of a tenant on a replica reads the tenant's range once (paged, at one revision
  R) and counts; from then on every forwarded write asks etcd for ``prev_kv`` and the
  response says exactly what changed (a new key, a replaced value, deleted keys). A
  write is first checked against ``used + reserved + worst case`` (every put a new
  key); only when that would cross the limit are the put keys read to get the exact
  growth. The worst case stays reserved while the write is in flight, so concurrent
  writes on one replica cannot overshoot together. Writes through *other* replicas are
  seen at the next re-count, which happens at most every ``resync`` seconds for a tenant
  that writes: overshoot is bounded by what other replicas accept in that period.
* ``value_bytes``: the largest value one put may carry (checked on the request).
* ``watches``: open watches per tenant on this replica.
* ``requests_per_second``: a token bucket per tenant on this replica (burst = one
  second's worth).
* ``etcd_space``: not a tenant quota. :class:`SpaceGuard` polls etcd's
  ``Maintenance.Status`` (dbSize) and ``Alarm`` (NOSPACE, CORRUPT) every few seconds;
  above ``high_water`` x etcd's backend quota every tenant write that stores data is
  refused, so no tenant can drive etcd into NOSPACE (under which etcd 3.5 skips its
  permission checks). Deletes stay allowed: they are how space is won back.

A refused write is refused before it is forwarded: nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
from pyetcd import etcdrpc

from etha.gateway.registry import Tenant
from etha.gateway.upstream import Upstream

log = logging.getLogger("etha.gateway.quota")

FIXES = {
    "bytes": "delete keys the job no longer needs, or ask for a larger 'bytes' quota",
    "keys": "delete keys the job no longer needs, or ask for a larger 'keys' quota",
    "value_bytes": "store smaller values, or ask for a larger 'value_bytes' quota",
    "watches": "cancel watches (close stores) the job no longer needs",
    "requests_per_second": "send fewer requests (retry after a moment)",
    "etcd_space": (
        "etcd is nearly full; its operator must compact and defragment it (or raise"
        " --quota-backend-bytes); deletes are still accepted"
    ),
}
#: Keys read per page when counting a tenant's usage.
_PAGE = 1000
_ALARM_NAMES = {1: "NOSPACE", 2: "CORRUPT"}


class QuotaExceeded(Exception):
    """A request over a quota; the server answers RESOURCE_EXHAUSTED + ``etha-quota``."""

    def __init__(self, quota: str, used: int, limit: int) -> None:
        self.quota = quota
        self.used = used
        self.limit = limit
        self.message = f"etha gateway: quota exceeded: {quota} ({used} of {limit}); {FIXES[quota]}"
        super().__init__(self.message)


@dataclass
class _Usage:
    bytes: int = 0
    keys: int = 0
    #: revision of the last count; responses at or below it are already in it
    revision: int = 0
    counted_at: float = -1e18
    reserved_bytes: int = 0
    reserved_keys: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass(frozen=True)
class Write:
    """What a write may store: its puts ``(key, value)`` (per Txn branch) and deletes."""

    branches: tuple[tuple[tuple[bytes, bytes], ...], ...]
    deletes: bool = False

    @property
    def puts(self) -> Iterable[tuple[bytes, bytes]]:
        for branch in self.branches:
            yield from branch


class QuotaBook:
    """Usage and limits of every tenant this replica has served (see the module docstring).

    :param report: called with ``(tenant, quota, used, limit)`` when a figure changes
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        resync: float = 30.0,
        report: Callable[[str, str, int, int], None] | None = None,
    ) -> None:
        self._upstream = upstream
        self._usage: dict[str, _Usage] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._watches: dict[str, int] = {}
        self._resync = resync
        self._report = report or (lambda *_: None)

    # -- rate and watches ----------------------------------------------------------------

    def take_request(self, tenant: Tenant) -> None:
        """One request of ``tenant``; raises when its bucket is empty."""
        rate = tenant.limits.get("requests_per_second", 0)
        if not rate:
            return
        now = time.monotonic()
        bucket = self._buckets.get(tenant.username)
        if bucket is None:
            bucket = self._buckets[tenant.username] = _Bucket(float(rate), now)
        bucket.tokens = min(float(rate), bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            raise QuotaExceeded("requests_per_second", rate, rate)
        bucket.tokens -= 1.0

    def open_watch(self, tenant: Tenant) -> None:
        """Count one more open watch of ``tenant``; raises when at its limit."""
        limit = tenant.limits.get("watches", 0)
        used = self._watches.get(tenant.username, 0)
        if limit and used >= limit:
            raise QuotaExceeded("watches", used, limit)
        self._watches[tenant.username] = used + 1
        self._report(tenant.username, "watches", used + 1, limit)

    def close_watch(self, tenant: Tenant, count: int = 1) -> None:
        used = max(0, self._watches.get(tenant.username, 0) - count)
        self._watches[tenant.username] = used
        self._report(tenant.username, "watches", used, tenant.limits.get("watches", 0))

    def watches(self, username: str) -> int:
        return self._watches.get(username, 0)

    # -- stored data ---------------------------------------------------------------------

    @staticmethod
    def check_values(tenant: Tenant, write: Write) -> None:
        limit = tenant.limits.get("value_bytes", 0)
        if not limit:
            return
        for _, value in write.puts:
            if len(value) > limit:
                raise QuotaExceeded("value_bytes", len(value), limit)

    def usage(self, username: str) -> tuple[int, int] | None:
        """``(bytes, keys)`` as counted for ``username``, or None before its first write."""
        usage = self._usage.get(username)
        return None if usage is None or usage.counted_at < 0 else (usage.bytes, usage.keys)

    async def _count(self, tenant: Tenant, usage: _Usage) -> None:
        total_bytes = keys = 0
        key, revision = tenant.start, 0
        while True:
            request = etcdrpc.RangeRequest(
                key=key, range_end=tenant.end, limit=_PAGE, revision=revision
            )
            response = await self._upstream.call("KV", "Range", request)
            if not revision:
                revision = int(response.header.revision)
            for kv in response.kvs:
                total_bytes += len(kv.key) + len(kv.value)
                keys += 1
            if not response.more or not response.kvs:
                break
            key = response.kvs[-1].key + b"\0"
        usage.bytes, usage.keys, usage.revision = total_bytes, keys, revision
        usage.counted_at = time.monotonic()
        self._report_usage(tenant, usage)

    def _report_usage(self, tenant: Tenant, usage: _Usage) -> None:
        self._report(tenant.username, "bytes", usage.bytes, tenant.limits.get("bytes", 0))
        self._report(tenant.username, "keys", usage.keys, tenant.limits.get("keys", 0))

    async def _exact_growth(self, write: Write) -> tuple[int, int]:
        """The largest (bytes, keys) growth over the write's branches, reading the put keys."""
        grow_bytes = grow_keys = 0
        for branch in write.branches:
            b = k = 0
            for key, value in branch:
                response = await self._upstream.call("KV", "Range", etcdrpc.RangeRequest(key=key))
                if response.kvs:
                    b += len(value) - len(response.kvs[0].value)
                else:
                    b += len(key) + len(value)
                    k += 1
            grow_bytes, grow_keys = max(grow_bytes, b), max(grow_keys, k)
        return grow_bytes, grow_keys

    @contextlib.asynccontextmanager
    async def reserve(self, tenant: Tenant, write: Write) -> Any:
        """Check ``write`` against the bytes/keys quotas and hold its worst case while it runs.

        Use as ``async with book.reserve(tenant, write) as apply:`` and call
        ``apply(response_revision, delta_bytes, delta_keys)`` with what the response says.

        :raises QuotaExceeded: the write would cross ``bytes`` or ``keys``
        """
        byte_limit = tenant.limits.get("bytes", 0)
        key_limit = tenant.limits.get("keys", 0)
        if not (byte_limit or key_limit) or not write.branches:
            yield self._applier(tenant, None)
            return
        usage = self._usage.get(tenant.username)
        if usage is None:
            usage = self._usage[tenant.username] = _Usage()
        async with usage.lock:
            if time.monotonic() - usage.counted_at > self._resync:
                await self._count(tenant, usage)
            worst_bytes = max(sum(len(k) + len(v) for k, v in b) for b in write.branches)
            worst_keys = max(len(b) for b in write.branches)
            grow_bytes, grow_keys = worst_bytes, worst_keys
            if self._over(usage, byte_limit, key_limit, grow_bytes, grow_keys):
                # Near the limit: overwriting existing keys may still fit.
                grow_bytes, grow_keys = await self._exact_growth(write)
                name = self._over(usage, byte_limit, key_limit, grow_bytes, grow_keys)
                if name:
                    used = usage.bytes + usage.reserved_bytes
                    used_keys = usage.keys + usage.reserved_keys
                    raise QuotaExceeded(
                        name,
                        used if name == "bytes" else used_keys,
                        byte_limit if name == "bytes" else key_limit,
                    )
            usage.reserved_bytes += max(grow_bytes, 0)
            usage.reserved_keys += max(grow_keys, 0)
        try:
            yield self._applier(tenant, usage)
        finally:
            usage.reserved_bytes -= max(grow_bytes, 0)
            usage.reserved_keys -= max(grow_keys, 0)

    @staticmethod
    def _over(usage: _Usage, byte_limit: int, key_limit: int, grow_b: int, grow_k: int) -> str:
        if key_limit and grow_k > 0 and usage.keys + usage.reserved_keys + grow_k > key_limit:
            return "keys"
        if byte_limit and grow_b > 0 and usage.bytes + usage.reserved_bytes + grow_b > byte_limit:
            return "bytes"
        return ""

    def _applier(self, tenant: Tenant, usage: _Usage | None) -> Callable[[int, int, int], None]:
        def apply(revision: int, delta_bytes: int, delta_keys: int) -> None:
            current = usage if usage is not None else self._usage.get(tenant.username)
            if current is None or current.counted_at < 0 or revision <= current.revision:
                return  # not counted yet, or already in the count
            current.bytes += delta_bytes
            current.keys += delta_keys
            self._report_usage(tenant, current)

        return apply

    def forget(self, username: str) -> None:
        """Drop what is known of a revoked tenant."""
        self._usage.pop(username, None)
        self._buckets.pop(username, None)


class SpaceGuard:
    """Polls etcd's size and alarms; :meth:`check` refuses writes above the high water.

    :param quota_bytes: etcd's ``--quota-backend-bytes`` (its default is 2 GiB)
    :param high_water: fraction of ``quota_bytes`` above which writes are refused
    :param interval: seconds between polls
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        quota_bytes: int,
        high_water: float,
        interval: float = 2.0,
    ) -> None:
        self._upstream = upstream
        self.limit = int(quota_bytes * high_water)
        self.interval = interval
        self.db_size = 0
        #: bytes this replica let through, in all; a burst between two polls must not
        #: carry etcd past its quota (etcd's size is only polled)
        self.written = 0
        #: ``written`` when the poll before the last one started: etcd commits its
        #: backend every 100 ms, so those writes are surely in the last dbSize
        self._included = 0
        self._last_cut = 0
        self.alarms: tuple[str, ...] = ()
        self.polled = False
        self._task: asyncio.Task[None] | None = None

    @property
    def estimate(self) -> int:
        """etcd's last polled dbSize plus what this replica has written since."""
        return self.db_size + self.written - self._included

    @property
    def full(self) -> bool:
        return bool(self.alarms) or (self.limit > 0 and self.estimate >= self.limit)

    def check(self, size: int = 0) -> None:
        """Admit a write of ``size`` bytes, or raise ``etcd_space`` when it would carry
        etcd above the high water, or etcd raised an alarm."""
        if self.alarms or (self.limit > 0 and self.estimate + size > self.limit):
            raise QuotaExceeded("etcd_space", self.estimate, self.limit)
        self.written += size

    async def poll(self) -> None:
        cut = self.written
        status = await self._upstream.call(
            "Maintenance", "Status", etcdrpc.StatusRequest(), timeout=self.interval * 2
        )
        alarms = await self._upstream.call(
            "Maintenance",
            "Alarm",
            etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET),
            timeout=self.interval * 2,
        )
        self.db_size = int(status.dbSize)
        # Writes before the previous poll are surely in this dbSize; later ones stay
        # counted one more round (an over-estimate, never an under-estimate).
        self._included, self._last_cut = self._last_cut, cut
        names = sorted({_ALARM_NAMES.get(int(a.alarm), str(a.alarm)) for a in alarms.alarms})
        if tuple(names) != self.alarms:
            log.warning("etcd alarms: %s", ", ".join(names) or "none")
        self.alarms = tuple(names)
        self.polled = True

    async def start(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.poll()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="space-guard")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except grpc.aio.AioRpcError as exc:
                log.warning("etcd status poll failed: %s: %s", exc.code().name, exc.details())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


__all__ = ["FIXES", "QuotaBook", "QuotaExceeded", "SpaceGuard", "Write"]
