"""The tenant registry in memory: every record under ``TENANTS_PREFIX``, kept current.

:meth:`Registry.start` reads the prefix at one revision R and watches it from R + 1, so
no change is missed between the read and the watch. When the watch breaks or its
revision was compacted, the registry reads everything again (the new read is the
truth: records missing from it are revoked) and watches on. A record that does not
parse is ignored and logged by its key, without its content (it holds a secret hash).

Freshness: between a broken watch and the next complete read, a record deleted in the
meantime may still be in memory. :attr:`Registry.current` is false for that span, and
the gateway serves no tenant request until it is true again (:meth:`wait_current`),
so a revocation made while a replica was cut off from etcd holds from its first request
after reconnecting.

Revocation: a deleted record, or one whose secret changed, revokes the tenant's old
identity. Tokens name the record's ``mod_revision``, so every token of an older
revision is refused at once by :meth:`Registry.lookup`'s callers; open watch streams
learn it from :meth:`Registry.revoked`, an event set on revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from pyetcd import etcdrpc

from etha.gateway.tenancy import QUOTA_NAMES, TENANTS_PREFIX, TenantRecord, tenant_key
from etha.gateway.upstream import Upstream
from etha.kvstore.errors import ConfigurationError, InvalidKeyError
from etha.kvstore.etcd_client import prefix_range_end

log = logging.getLogger("etha.gateway.registry")

_PUT = 0
#: Pause before reading the registry again after a failure: doubles from the first
#: value up to the second (a quick first retry keeps requests from waiting on it).
_RETRY_FIRST = 0.05
_RETRY = 1.0
#: Seconds between the reads that keep the gateway's etcd token fresh.
_KEEPALIVE = 5.0
#: Reads of etcd per second for log-ins of names not (yet) in the registry.
_MISS_READS_PER_SECOND = 50


@dataclass(frozen=True)
class Tenant:
    """A tenant as the gateway serves it.

    :param revision: the record's ``mod_revision``; tokens name it, so any change to the
        record retires the tokens issued before it
    :param start: first key of the tenant's range (``<prefix>/``)
    :param end: the key after the range (``<prefix>0``)
    :param limits: resolved quotas (record overrides over gateway defaults); 0 = unlimited
    :param created: the record's ``create_revision``. Revisions before it may hold a
        previous owner's data under the same prefix, so the gateway serves no history
        older than it (:func:`etha.gateway.confine.check_revision`); 0 = no floor
    """

    record: TenantRecord
    revision: int
    start: bytes
    end: bytes
    limits: Mapping[str, int]
    created: int = 0

    @property
    def username(self) -> str:
        return self.record.username


def _same_identity(a: Tenant, b: Tenant) -> bool:
    """Same secret and prefix: a change of anything else (quotas) revokes nothing."""
    return a.record.secret_sha256 == b.record.secret_sha256 and a.record.prefix == b.record.prefix


class Registry:
    """The records under ``TENANTS_PREFIX``, loaded and watched (see the module docstring).

    :param defaults: the gateway's default quotas by :data:`QUOTA_NAMES`
    :param on_change: called with the tenant count after every change (for metrics)
    """

    def __init__(
        self,
        upstream: Upstream,
        defaults: Mapping[str, int],
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self._upstream = upstream
        self._defaults = {name: int(defaults.get(name, 0)) for name in QUOTA_NAMES}
        self._tenants: dict[str, Tenant] = {}
        self._revoked: dict[str, asyncio.Event] = {}
        self._loaded = asyncio.Event()
        #: set while the records in memory follow etcd (read, then watched without a break)
        self._current = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._on_change = on_change
        self._miss_tokens = float(_MISS_READS_PER_SECOND)
        self._miss_stamp = time.monotonic()

    @property
    def ready(self) -> bool:
        """True once the registry was read (the gateway may then answer log-ins)."""
        return self._loaded.is_set()

    @property
    def current(self) -> bool:
        """True while the records follow etcd: read completely and watched since."""
        return self._current.is_set()

    async def wait_current(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :attr:`current`; returns whether it is."""
        if self._current.is_set():
            return True
        try:
            await asyncio.wait_for(self._current.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._tenants)

    def lookup(self, username: str) -> Tenant | None:
        """The tenant with this username, or None (unknown or revoked)."""
        return self._tenants.get(username)

    async def lookup_fresh(self, username: str) -> Tenant | None:
        """:meth:`lookup`, reading etcd once when the name is unknown here.

        A record the operator has just written may not have reached this replica's watch
        yet; a log-in right after provisioning must not fail for that. The reads are
        rate-limited (:data:`_MISS_READS_PER_SECOND`), so unknown names cannot flood etcd.
        """
        tenant = self._tenants.get(username)
        if tenant is not None or not self.ready:
            return tenant
        now = time.monotonic()
        self._miss_tokens = min(
            float(_MISS_READS_PER_SECOND),
            self._miss_tokens + (now - self._miss_stamp) * _MISS_READS_PER_SECOND,
        )
        self._miss_stamp = now
        if self._miss_tokens < 1.0:
            return None
        self._miss_tokens -= 1.0
        try:
            key = tenant_key(username)
        except (ConfigurationError, InvalidKeyError):
            return None
        response = await self._upstream.call("KV", "Range", etcdrpc.RangeRequest(key=key))
        if not response.kvs or username in self._tenants:
            return self._tenants.get(username)
        tenant = self._resolve(response.kvs[0])
        if tenant is not None:
            self._set(username, tenant)
            self._changed()
        return tenant

    def revoked(self, tenant: Tenant) -> asyncio.Event:
        """An event set when ``tenant`` (this record revision's identity) is revoked."""
        current = self._tenants.get(tenant.username)
        if current is None or not _same_identity(current, tenant):
            event = asyncio.Event()
            event.set()
            return event
        existing = self._revoked.get(tenant.username)
        if existing is None:
            existing = self._revoked[tenant.username] = asyncio.Event()
        return existing

    async def start(self, timeout: float = 30.0) -> None:
        """Start loading and watching; returns once loaded (or raises after ``timeout``)."""
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="registry")
        self._keepalive = loop.create_task(
            self._upstream.keep_token_fresh(TENANTS_PREFIX, _KEEPALIVE), name="etcd-token"
        )
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def close(self) -> None:
        for task in (self._task, self._keepalive):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._keepalive = None

    # -- loading and watching ----------------------------------------------------------

    def _resolve(self, kv: Any) -> Tenant | None:
        key = kv.key.decode(errors="replace")
        try:
            record = TenantRecord.from_json(kv.value)
        except (ConfigurationError, InvalidKeyError) as exc:
            log.error("ignoring the invalid tenant record %s: %s", key, exc)
            return None
        if kv.key != record.key:
            log.error("ignoring the tenant record %s: it names user %r", key, record.username)
            return None
        start, end = record.range
        limits = {**self._defaults, **{k: int(v) for k, v in record.quotas.items()}}
        return Tenant(record, int(kv.mod_revision), start, end, limits, int(kv.create_revision))

    def _set(self, username: str, tenant: Tenant | None) -> None:
        old = self._tenants.get(username)
        if tenant is None:
            self._tenants.pop(username, None)
        else:
            self._tenants[username] = tenant
        if old is not None and (tenant is None or not _same_identity(old, tenant)):
            event = self._revoked.pop(username, None)
            if event is not None:
                event.set()
            log.info("tenant %s revoked (record %s)", username, "changed" if tenant else "deleted")

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self._tenants))

    async def _load(self) -> int:
        """Read every record; returns the revision of the read."""
        request = etcdrpc.RangeRequest(
            key=TENANTS_PREFIX, range_end=prefix_range_end(TENANTS_PREFIX)
        )
        response = await self._upstream.call("KV", "Range", request)
        fresh: dict[str, Tenant] = {}
        for kv in response.kvs:
            tenant = self._resolve(kv)
            if tenant is not None:
                fresh[tenant.username] = tenant
        for username in list(self._tenants):
            if username not in fresh:
                self._set(username, None)
        for username, tenant in fresh.items():
            self._set(username, tenant)
        self._changed()
        self._loaded.set()
        self._current.set()
        return int(response.header.revision)

    async def _run(self) -> None:
        delay = _RETRY_FIRST
        while True:
            try:
                revision = await self._load()
                delay = _RETRY_FIRST
                await self._watch(revision + 1)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    self._upstream.note_stream_failure()
                log.warning(
                    "tenant registry: %s: %s; reading it again", exc.code().name, exc.details()
                )
            except Exception:
                log.exception("tenant registry: unexpected error; reading it again")
            # Changes since the break are unknown until the next complete read.
            self._current.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY)

    async def _watch(self, start_revision: int) -> None:
        """Apply the watch's events until it ends (compaction, a broken stream)."""
        call = self._upstream.open_watch()
        try:
            create = etcdrpc.WatchCreateRequest(
                key=TENANTS_PREFIX,
                range_end=prefix_range_end(TENANTS_PREFIX),
                start_revision=start_revision,
            )
            await call.write(etcdrpc.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    log.warning("tenant registry: the watch stream ended")
                    return
                if response.canceled:
                    if response.compact_revision:
                        log.warning("tenant registry: watch compacted; reading it again")
                    else:
                        log.warning("tenant registry: watch cancelled: %s", response.cancel_reason)
                    return
                for event in response.events:
                    username = event.kv.key[len(TENANTS_PREFIX) :].decode(errors="replace")
                    current = self._tenants.get(username)
                    if current is not None and current.revision > event.kv.mod_revision:
                        continue  # read by lookup_fresh() already, past this event
                    if event.type == _PUT:
                        tenant = self._resolve(event.kv)
                        self._set(username, tenant)
                    else:
                        self._set(username, None)
                if response.events:
                    self._changed()
        finally:
            call.cancel()


__all__ = ["Registry", "Tenant"]
