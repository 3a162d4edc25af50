"""The gateway's gRPC servicers (etcd v3 API subset) on grpc.aio.

Every request: the tenant from its ``token`` metadata (:meth:`GatewayContext.tenant`),
the request-rate quota, confinement to the tenant's range (:mod:`etha.gateway.confine`),
the data quotas and etcd's space guard for writes, then the call is forwarded with the
gateway's own etcd credentials. Refusals use etcd's own codes and messages, so etha's
client and etcdctl react as they would to etcd; quota refusals are RESOURCE_EXHAUSTED
with trailing metadata ``etha-quota: <name>``. Response headers never carry etcd's
cluster or member id.

Watch: one upstream etcd Watch stream per client stream. Client-chosen watch ids are
forwarded unchanged (so they are preserved); every create is confined and counted
against the tenant's ``watches`` quota; refused creates are answered like etcd answers
them (``created`` and ``canceled`` with a reason) in the order the creates came, which
clients rely on; cancels and progress requests pass through. When the tenant is revoked
the stream ends with "invalid auth token"; when etcd's stream breaks it ends with
UNAVAILABLE and the client re-creates its watches (etha's does, from the revision after
the last event it saw).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf.unknown_fields import UnknownFieldSet
from pyetcd import etcdrpc

import etha.gateway.waits
from etha.gateway import confine
from etha.gateway.batch import PutBatcher
from etha.gateway.metrics import GatewayMetrics
from etha.gateway.quota import QuotaBook, QuotaExceeded, SpaceGuard, Write
from etha.gateway.registry import Registry, Tenant
from etha.gateway.tenancy import secret_matches
from etha.gateway.tokens import InvalidToken, TokenSigner
from etha.gateway.upstream import Upstream
from etha.kvstore.etcd_client import QUOTA_METADATA_KEY
from etha.kvstore.etcdv3.transport import deadline_passed

log = logging.getLogger("etha.gateway.server")

#: The etcd API version the gateway speaks (``Maintenance.Status``).
API_VERSION = "3.5.0"
USER_NAME_EMPTY = "etcdserver: user name is empty"
INVALID_TOKEN = "etcdserver: invalid auth token"  # noqa: S105 - an error message
AUTH_FAILED = "etcdserver: authentication failed, invalid user ID or password"
PERMISSION_DENIED = confine.PERMISSION_DENIED_MESSAGE
#: What etcd puts in ``cancel_reason`` when it refuses a watch for permissions.
WATCH_PERMISSION_DENIED = "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
NOT_READY = "etha gateway: the tenant registry is not loaded yet; retry shortly"
RELOADING = (
    "etha gateway: the tenant registry is being read again after a break in its etcd"
    " watch; retry shortly"
)
#: How long a request waits for the registry to be current again before UNAVAILABLE.
REGISTRY_WAIT = 2.0

_SERVER_OPTIONS: list[tuple[str, Any]] = [
    # etha's client pings every 10 s, even without calls (to find hung members); grpc's
    # default would answer that with GOAWAY "too_many_pings".
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
    # etcd refuses requests over its --max-request-bytes itself, with its own message.
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
    # grpc cancels calls that wait too long for the event loop to take them (defaults 1000
    # pending, hard limit 3000): a burst of thousands of watch streams or waits (a barrier
    # of a large job) would lose some. They are taken as fast as the loop can.
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


class Refusal(Exception):
    """A request the gateway answers itself with ``code``/``message``."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        trailing: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.trailing = trailing

    @classmethod
    def quota(cls, exc: QuotaExceeded) -> Refusal:
        return cls(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            exc.message,
            f"quota_{exc.quota}",
            ((QUOTA_METADATA_KEY, exc.quota),),
        )

    @classmethod
    def denied(cls, exc: confine.Denied) -> Refusal:
        return cls(exc.code, exc.message, exc.reason)


def _admin(reason: str = "admin_call") -> Refusal:
    return Refusal(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED, reason)


@dataclass
class GatewayContext:
    """Everything the servicers share in one gateway process."""

    upstream: Upstream
    registry: Registry
    quotas: QuotaBook
    signer: TokenSigner
    metrics: GatewayMetrics
    space: SpaceGuard
    advertise: Sequence[str] = ()
    tls: bool = False
    #: a stable id of this gateway deployment, shown as cluster_id in response headers
    cluster_id: int = field(default=0)
    #: tenant Puts, coalesced into Txns under load (see :mod:`etha.gateway.batch`)
    puts: PutBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.puts = PutBatcher(self.upstream.call)
        if not self.cluster_id:
            digest = hashlib.sha256(",".join(sorted(self.advertise)).encode()).digest()
            self.cluster_id = int.from_bytes(digest[:8], "big") >> 1

    @property
    def ready(self) -> bool:
        return self.registry.ready

    def tenant_for_token(self, token: str | None) -> Tenant:
        """The tenant a ``token`` metadata value stands for.

        :raises Refusal: etcd's own error for a missing or invalid token
        """
        if not token:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, USER_NAME_EMPTY, "no_token")
        try:
            claims = self.signer.verify(token)
        except InvalidToken as exc:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN, f"token_{exc.reason}"
            ) from None
        tenant = self.registry.lookup(claims.username)
        if tenant is None or tenant.revision != claims.revision:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN, "token_revoked")
        return tenant

    async def current_registry(self) -> None:
        """Return once the registry follows etcd again (see :attr:`Registry.current`).

        A record deleted while this replica was cut off from etcd is known only after
        the registry's next complete read: no tenant is served from older records.

        :raises Refusal: UNAVAILABLE when the registry is not current within
            :data:`REGISTRY_WAIT` (clients retry, or fail over to another replica)
        """
        if not self.registry.current and not await self.registry.wait_current(REGISTRY_WAIT):
            raise Refusal(grpc.StatusCode.UNAVAILABLE, RELOADING, "registry_reloading")

    async def tenant(self, context: grpc.aio.ServicerContext[Any, Any]) -> Tenant:
        """The caller's tenant from its ``token`` metadata (see :meth:`tenant_for_token`),
        once the registry is current (:meth:`current_registry`)."""
        await self.current_registry()
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "token":
                token = value if isinstance(value, str) else value.decode(errors="replace")
                break
        return self.tenant_for_token(token)

    def scrub(self, header: Any) -> None:
        """Hide etcd's identity in a response header (the revision stays)."""
        header.cluster_id = self.cluster_id
        header.member_id = 0
        header.raft_term = 0

    def header(self) -> Any:
        return etcdrpc.ResponseHeader(cluster_id=self.cluster_id)


async def _answer(
    ctx: GatewayContext,
    method: str,
    context: grpc.aio.ServicerContext[Any, Any],
    handler: Callable[[], Awaitable[Any]],
    tenant_name: list[str],
) -> Any:
    """Run ``handler`` and turn refusals and etcd errors into this RPC's status."""
    start = time.perf_counter()
    code = "OK"
    try:
        return await handler()
    except Refusal as exc:
        code = exc.code.name
        if exc.reason:
            ctx.metrics.denials.labels(tenant_name[0], exc.reason).inc()
        await context.abort(exc.code, exc.message, trailing_metadata=exc.trailing)
    except grpc.aio.AioRpcError as exc:
        status, details = exc.code(), exc.details() or ""
        if deadline_passed(status, details):
            # etcd says UNKNOWN "context deadline exceeded" when the deadline passed
            # inside it; clients (etha's, etcdctl) retry a DEADLINE_EXCEEDED correctly.
            status = grpc.StatusCode.DEADLINE_EXCEEDED
        code = status.name
        await context.abort(status, details)
    finally:
        ctx.metrics.count_request(method, code, tenant_name[0], time.perf_counter() - start)
    raise AssertionError("unreachable")  # abort raised


class _Forward:
    """Forwarding with upstream latency metrics; Puts through :attr:`GatewayContext.puts`."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def __call__(self, service: str, method: str, request: Any, context: Any) -> Any:
        start = time.perf_counter()
        # No longer than the client still waits for the answer.
        remaining = context.time_remaining()
        timeout = (
            None if remaining is None else max(0.001, min(remaining, self.ctx.upstream.timeout))
        )
        try:
            if method == "Put":
                return await self.ctx.puts.put(request, timeout)
            return await self.ctx.upstream.call(service, method, request, timeout=timeout)
        finally:
            self.ctx.metrics.upstream(method).observe(time.perf_counter() - start)


def _put_write(request: Any) -> tuple[tuple[bytes, bytes], ...]:
    if request.ignore_value:
        return ()
    return ((request.key, request.value),)


def _txn_write(request: Any) -> Write:
    branches = []
    deletes = False
    for ops in (request.success, request.failure):
        puts: list[tuple[bytes, bytes]] = []
        for op in ops:
            which = op.WhichOneof("request")
            if which == "request_put":
                puts.extend(_put_write(op.request_put))
            elif which == "request_delete_range":
                deletes = True
        branches.append(tuple(puts))
    return Write(tuple(b for b in branches if b), deletes)


def _put_delta(request: Any, response: Any) -> tuple[int, int]:
    prev = response.prev_kv if response.HasField("prev_kv") else None
    value_len = len(prev.value) if request.ignore_value and prev is not None else len(request.value)
    if prev is not None:
        return value_len - len(prev.value), 0
    return len(request.key) + value_len, 1


def _delete_delta(response: Any) -> tuple[int, int]:
    return -sum(len(kv.key) + len(kv.value) for kv in response.prev_kvs), -int(response.deleted)


class KVServicer(etcdrpc.KVServicer):  # type: ignore[misc]
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.forward = _Forward(ctx)

    async def _begin(self, context: Any, who: list[str]) -> Tenant:
        tenant = await self.ctx.tenant(context)
        who[0] = tenant.username
        try:
            self.ctx.quotas.take_request(tenant)
        except QuotaExceeded as exc:
            raise Refusal.quota(exc) from None
        return tenant

    async def Range(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            tenant = await self._begin(context, who)
            try:
                confine.check_range_request(tenant.start, tenant.end, request, floor=tenant.created)
            except confine.Denied as exc:
                raise Refusal.denied(exc) from None
            response = await self.forward("KV", "Range", request, context)
            self.ctx.scrub(response.header)
            return response

        return await _answer(self.ctx, "Range", context, run, who)

    async def Put(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            tenant = await self._begin(context, who)
            try:
                confine.check_put(tenant.start, tenant.end, request)
            except confine.Denied as exc:
                raise Refusal.denied(exc) from None
            write = Write((_put_write(request),) if _put_write(request) else ())
            try:
                QuotaBook.check_values(tenant, write)
                self.ctx.space.check(request.ByteSize())
                async with self.ctx.quotas.reserve(tenant, write) as apply:
                    wanted = request.prev_kv
                    request.prev_kv = True
                    response = await self.forward("KV", "Put", request, context)
                    apply(response.header.revision, *_put_delta(request, response))
            except QuotaExceeded as exc:
                raise Refusal.quota(exc) from None
            if not wanted:
                response.ClearField("prev_kv")
            self.ctx.scrub(response.header)
            return response

        return await _answer(self.ctx, "Put", context, run, who)

    async def DeleteRange(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            tenant = await self._begin(context, who)
            try:
                confine.check_delete_range(tenant.start, tenant.end, request)
            except confine.Denied as exc:
                raise Refusal.denied(exc) from None
            async with self.ctx.quotas.reserve(tenant, Write(())) as apply:
                wanted = request.prev_kv
                request.prev_kv = True
                response = await self.forward("KV", "DeleteRange", request, context)
                apply(response.header.revision, *_delete_delta(response))
            if not wanted:
                del response.prev_kvs[:]
            self.ctx.scrub(response.header)
            return response

        return await _answer(self.ctx, "DeleteRange", context, run, who)

    async def Txn(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            tenant = await self._begin(context, who)
            try:
                confine.check_txn(tenant.start, tenant.end, request, floor=tenant.created)
            except confine.Denied as exc:
                raise Refusal.denied(exc) from None
            write = _txn_write(request)
            if not write.branches and not write.deletes:
                response = await self.forward("KV", "Txn", request, context)
                self._scrub_txn(response)
                return response
            try:
                QuotaBook.check_values(tenant, write)
                if write.branches:
                    self.ctx.space.check(request.ByteSize())
                async with self.ctx.quotas.reserve(tenant, write) as apply:
                    wanted = self._ask_prev_kv(request)
                    response = await self.forward("KV", "Txn", request, context)
                    ops = request.success if response.succeeded else request.failure
                    delta_bytes = delta_keys = 0
                    for i, (op, result) in enumerate(zip(ops, response.responses, strict=False)):
                        which = op.WhichOneof("request")
                        if which == "request_put":
                            b, k = _put_delta(op.request_put, result.response_put)
                            if not wanted[(response.succeeded, i)]:
                                result.response_put.ClearField("prev_kv")
                        elif which == "request_delete_range":
                            b, k = _delete_delta(result.response_delete_range)
                            if not wanted[(response.succeeded, i)]:
                                del result.response_delete_range.prev_kvs[:]
                        else:
                            continue
                        delta_bytes += b
                        delta_keys += k
                    apply(response.header.revision, delta_bytes, delta_keys)
            except QuotaExceeded as exc:
                raise Refusal.quota(exc) from None
            self._scrub_txn(response)
            return response

        return await _answer(self.ctx, "Txn", context, run, who)

    @staticmethod
    def _ask_prev_kv(request: Any) -> dict[tuple[bool, int], bool]:
        """Ask etcd for prev_kv on every write op; returns which ones the client asked for."""
        wanted: dict[tuple[bool, int], bool] = {}
        for succeeded, ops in ((True, request.success), (False, request.failure)):
            for i, op in enumerate(ops):
                which = op.WhichOneof("request")
                if which == "request_put":
                    wanted[(succeeded, i)] = op.request_put.prev_kv
                    op.request_put.prev_kv = True
                elif which == "request_delete_range":
                    wanted[(succeeded, i)] = op.request_delete_range.prev_kv
                    op.request_delete_range.prev_kv = True
        return wanted

    def _scrub_txn(self, response: Any) -> None:
        self.ctx.scrub(response.header)
        for result in response.responses:
            which = result.WhichOneof("response")
            if which is not None:
                inner = getattr(result, which)
                if inner.HasField("header"):
                    self.ctx.scrub(inner.header)

    async def Compact(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            tenant = await self.ctx.tenant(context)
            who[0] = tenant.username
            raise _admin("compact")

        return await _answer(self.ctx, "Compact", context, run, who)


def _create_watch_id(create: Any) -> int:
    """The client-chosen ``watch_id`` (field 7, which the bundled descriptors lack)."""
    unknown = UnknownFieldSet(create)
    for index in range(len(unknown)):
        item = unknown[index]
        if item.field_number == 7:
            return int(item.data)
    return 0


class WatchServicer(etcdrpc.WatchServicer):  # type: ignore[misc]
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def Watch(self, request_iterator: Any, context: Any) -> None:
        ctx = self.ctx
        try:
            tenant = await ctx.tenant(context)
        except Refusal as exc:
            ctx.metrics.requests.labels("Watch", exc.code.name, "-").inc()
            await context.abort(exc.code, exc.message)
            return
        stream = _WatchProxy(ctx, tenant, context)
        await stream.run(request_iterator)


class _WatchProxy:
    """One client Watch stream and its upstream etcd stream."""

    def __init__(self, ctx: GatewayContext, tenant: Tenant, context: Any) -> None:
        self.ctx = ctx
        self.tenant = tenant
        self.context = context
        #: etcd's stream, opened with the first allowed create: a client stream without
        #: watches costs etcd nothing, so open streams are bounded by the watches quota
        self.upstream: grpc.aio.StreamStreamCall[Any, Any] | None = None
        self.upstream_metadata: tuple[tuple[str, str], ...] | None = None
        self.opened = asyncio.Event()
        self.write_lock = asyncio.Lock()
        #: creates in flight, oldest first: True = forwarded, or a refusal to send in turn
        self.pending: collections.deque[Any] = collections.deque()
        #: counted watches by id; a create with id 0 is counted once etcd names it
        self.live: set[int] = set()
        self.counted_unnamed = 0

    def _count(self, code: str) -> None:
        self.ctx.metrics.requests.labels("Watch.create", code, self.tenant.username).inc()

    async def _send(self, response: Any) -> None:
        async with self.write_lock:
            await self.context.write(response)

    def _deny(self, watch_id: int, reason: str, cancel_reason: str) -> Any:
        self.ctx.metrics.denials.labels(self.tenant.username, reason).inc()
        return etcdrpc.WatchResponse(
            header=self.ctx.header(),
            watch_id=watch_id,
            created=True,
            canceled=True,
            cancel_reason=cancel_reason,
        )

    async def _refuse(self, response: Any) -> None:
        if self.pending:
            self.pending.append(response)  # answered after the creates before it
        else:
            await self._send(response)

    async def _client_to_etcd(self, request_iterator: Any) -> None:
        ctx, tenant = self.ctx, self.tenant
        async for request in request_iterator:
            which = request.WhichOneof("request_union")
            if which == "create_request":
                create = request.create_request
                watch_id = _create_watch_id(create)
                try:
                    ctx.quotas.take_request(tenant)
                    confine.check_watch_create(
                        tenant.start, tenant.end, create, floor=tenant.created
                    )
                    ctx.quotas.open_watch(tenant)
                except confine.Denied as exc:
                    self._count("PERMISSION_DENIED")
                    await self._refuse(self._deny(watch_id, exc.reason, WATCH_PERMISSION_DENIED))
                    continue
                except QuotaExceeded as exc:
                    self._count("RESOURCE_EXHAUSTED")
                    await self._refuse(self._deny(watch_id, f"quota_{exc.quota}", exc.message))
                    continue
                self._count("OK")
                if watch_id:
                    self.live.add(watch_id)
                else:
                    self.counted_unnamed += 1
                self.pending.append(True)
                if self.upstream is None:
                    self.upstream_metadata = ctx.upstream.metadata
                    self.upstream = ctx.upstream.open_watch()
                    self.opened.set()
                await self.upstream.write(request)
            elif which in ("cancel_request", "progress_request") and self.upstream is not None:
                await self.upstream.write(request)
            # Anything else (a newer request kind, or a cancel/progress before any watch)
            # is dropped, as etcd drops what it does not know.

    async def _etcd_to_client(self) -> None:
        await self.opened.wait()
        assert self.upstream is not None
        while True:
            response = await self.upstream.read()
            if response is grpc.aio.EOF:
                return
            self.ctx.scrub(response.header)
            if response.created:
                if self.pending and self.pending[0] is True:
                    self.pending.popleft()
                if response.watch_id not in self.live and self.counted_unnamed:
                    self.counted_unnamed -= 1
                    self.live.add(response.watch_id)
            if (
                response.canceled
                and "permission denied" in response.cancel_reason
                and self.upstream_metadata is not None
            ):
                # The create was confined, so etcd refused the gateway's own token (it
                # expired): log in again; the client re-creates the watch on a new stream.
                stale, self.upstream_metadata = self.upstream_metadata, None
                self.ctx.upstream.schedule_login(stale)
            if response.canceled and response.watch_id in self.live:
                self.live.discard(response.watch_id)
                self.ctx.quotas.close_watch(self.tenant)
            await self._send(response)
            while self.pending and self.pending[0] is not True:
                await self._send(self.pending.popleft())

    async def run(self, request_iterator: Any) -> None:
        ctx = self.ctx
        revoked = ctx.registry.revoked(self.tenant)
        tasks = {
            asyncio.ensure_future(self._client_to_etcd(request_iterator)): "client",
            asyncio.ensure_future(self._etcd_to_client()): "etcd",
            asyncio.ensure_future(revoked.wait()): "revoked",
        }
        ending: tuple[grpc.StatusCode, str] | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            task = next(iter(done))
            which = tasks[task]
            if which == "revoked":
                ending = (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
            elif which == "etcd":
                exc = task.exception()
                if isinstance(exc, grpc.aio.AioRpcError):
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        ctx.upstream.note_stream_failure()
                    ending = (exc.code(), exc.details() or "")
                elif exc is not None:
                    log.error("watch proxy failed", exc_info=exc)
                    ending = (grpc.StatusCode.UNAVAILABLE, "etha gateway: watch proxy failed")
                else:
                    ending = (grpc.StatusCode.UNAVAILABLE, "etha gateway: etcd ended the watch")
            else:
                exc = task.exception()
                if exc is not None and not isinstance(exc, asyncio.CancelledError):
                    log.debug("client watch stream ended: %r", exc)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            if self.upstream is not None:
                self.upstream.cancel()
            count = len(self.live) + self.counted_unnamed
            if count:
                ctx.quotas.close_watch(self.tenant, count)
        if ending is not None:
            await self.context.abort(ending[0], ending[1])


class AuthServicer(etcdrpc.AuthServicer):  # type: ignore[misc]
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def Authenticate(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            ctx = self.ctx
            if not ctx.registry.ready:
                ctx.metrics.logins.labels("not_ready").inc()
                raise Refusal(grpc.StatusCode.UNAVAILABLE, NOT_READY)
            await ctx.current_registry()
            if not request.name:
                ctx.metrics.logins.labels("failed").inc()
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, USER_NAME_EMPTY, "no_user")
            tenant = await ctx.registry.lookup_fresh(request.name)
            if tenant is None or not secret_matches(request.password, tenant.record.secret_sha256):
                ctx.metrics.logins.labels("failed").inc()
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, AUTH_FAILED, "bad_password")
            who[0] = tenant.username
            ctx.metrics.logins.labels("ok").inc()
            token = ctx.signer.issue(tenant.username, tenant.revision)
            return etcdrpc.AuthenticateResponse(header=ctx.header(), token=token)

        return await _answer(self.ctx, "Authenticate", context, run, who)


class ClusterServicer(etcdrpc.ClusterServicer):  # type: ignore[misc]
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def MemberList(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            tenant = await self.ctx.tenant(context)
            who[0] = tenant.username
            scheme = "https" if self.ctx.tls else "http"
            members = []
            for endpoint in self.ctx.advertise:
                url = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
                member_id = int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big") >> 1
                members.append(etcdrpc.Member(ID=member_id, name="etha-gateway", clientURLs=[url]))
            return etcdrpc.MemberListResponse(header=self.ctx.header(), members=members)

        return await _answer(self.ctx, "MemberList", context, run, who)


class MaintenanceServicer(etcdrpc.MaintenanceServicer):  # type: ignore[misc]
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def Status(self, request: Any, context: Any) -> Any:
        who = ["-"]

        async def run() -> Any:
            tenant = await self.ctx.tenant(context)
            who[0] = tenant.username
            return etcdrpc.StatusResponse(header=self.ctx.header(), version=API_VERSION)

        return await _answer(self.ctx, "Status", context, run, who)


class LeaseServicer(etcdrpc.LeaseServicer):  # type: ignore[misc]
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx


def _refuse_everything_else(cls: type, handled: set[str], streaming: set[str]) -> None:
    """Make every RPC of ``cls`` not in ``handled`` answer PERMISSION_DENIED."""
    base = cls.__mro__[1]
    for name in dir(base):
        if name.startswith("_") or name in handled:
            continue

        def make(method: str) -> Any:
            async def refuse(self: Any, request: Any, context: Any) -> Any:
                who = ["-"]

                async def run() -> Any:
                    tenant = await self.ctx.tenant(context)
                    who[0] = tenant.username
                    raise _admin("admin_call")

                return await _answer(self.ctx, method, context, run, who)

            async def refuse_stream(self: Any, request: Any, context: Any) -> Any:
                await refuse(self, request, context)
                yield  # pragma: no cover - refuse always aborts

            return refuse_stream if method in streaming else refuse

        setattr(cls, name, make(name))


_refuse_everything_else(AuthServicer, {"Authenticate"}, set())
_refuse_everything_else(ClusterServicer, {"MemberList"}, set())
_refuse_everything_else(MaintenanceServicer, {"Status"}, {"Snapshot"})
_refuse_everything_else(LeaseServicer, set(), {"LeaseKeepAlive"})


class _GenericOnly:
    """Hands a generated ``add_*Servicer_to_server`` only the generic handlers.

    grpc.aio keeps one pending "next call" future per registered method and waits on
    all of them for every call it accepts, so each registered method costs every RPC
    a little CPU. Only the KV methods, which carry nearly all traffic, are registered;
    the other services are found through their generic handlers, with the same
    servicers and the same answers.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        pass  # see the class docstring


def build_server(
    ctx: GatewayContext,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The gateway's grpc.aio server, with every servicer, bound to ``listen``.

    :returns: the server (not started) and the port it bound
    """
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    etcdrpc.add_KVServicer_to_server(KVServicer(ctx), server)
    generic = _GenericOnly(server)
    etcdrpc.add_WatchServicer_to_server(WatchServicer(ctx), generic)
    etcdrpc.add_AuthServicer_to_server(AuthServicer(ctx), generic)
    etcdrpc.add_LeaseServicer_to_server(LeaseServicer(ctx), generic)
    etcdrpc.add_ClusterServicer_to_server(ClusterServicer(ctx), generic)
    etcdrpc.add_MaintenanceServicer_to_server(MaintenanceServicer(ctx), generic)
    # Extension services (server-side waits) register here.
    etha.gateway.waits.add_to_server(server, ctx)
    if credentials is not None:
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    return server, port


__all__ = ["API_VERSION", "GatewayContext", "Refusal", "build_server"]
