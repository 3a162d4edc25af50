"""Batched counters: ``Coordination.Add`` in O(1) etcd transactions per batch.

A compare-and-swap loop run by N concurrent clients costs O(N^2) transactions (each
round, one of the N wins and the others retry). Here the adds that reach one gateway
replica for one key queue up, and one task per key applies them in batches:

1. the base: the key's value ``v`` and ``mod_revision`` ``m`` (known from the previous
   batch's own write, or read once; a missing key is 0 with ``create_revision == 0``);
2. one Txn: compare ``mod_revision == m`` (or ``create_revision == 0``), success: put
   ``v + d1 + ... + dk`` as decimal text; failure: read the key (the new base);
3. on success, caller i gets ``v + d1 + ... + di`` (prefix sums in arrival order) and the
   Txn's revision; on a failed compare another writer came first: retry the same batch
   on the base the failure returned.

Correctness: every write is a Txn conditioned on the exact revision its sum was
computed from, so an add is applied at most once and never on a stale base; the
callers' results are the values the key passed through in one atomic step, so they
are linearizable. A Txn with compares is never re-sent blindly: when etcd's answer is
lost (UNAVAILABLE after sending, a deadline) the batch is *fenced*: a Txn that puts
the unchanged value ``v`` if ``mod_revision`` is still ``m``. If the fence succeeds, the
lost Txn can no longer apply (its compare names ``m``) and never did; the batch is
retried on the new base. If the fence's compare fails, the key changed after ``m``:
the lost Txn may or may not be the change, and the callers are told so
(UNAVAILABLE, "may or may not have been applied"), exactly what etcd tells a client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from pyetcd import etcdrpc

from etha.gateway.confine import check_range
from etha.kvstore import gateway_api as api
from etha.kvstore.etcdv3.transport import deadline_passed, never_sent

if TYPE_CHECKING:
    from etha.gateway.registry import Tenant
    from etha.gateway.server import GatewayContext

log = logging.getLogger("etha.gateway.counter")

#: At most this many adds per Txn (one put; the bound keeps one batch's latency small).
MAX_BATCH = 4096
#: Give up on a batch after this many lost compares in a row (callers see ABORTED).
MAX_CONFLICTS = 1000
#: Seconds to try a fence before the add's outcome is reported unknown.
FENCE_BUDGET = 30.0
_EQUAL = etcdrpc.Compare.EQUAL
_MOD = etcdrpc.Compare.MOD
_CREATE = etcdrpc.Compare.CREATE


def _wrap(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


class AddFailed(Exception):
    """A batch could not be applied; every caller of the batch gets ``code``/``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Base:
    __slots__ = ("mod_revision", "value")

    def __init__(self, value: int, mod_revision: int) -> None:
        self.value = value
        #: 0: the key does not exist
        self.mod_revision = mod_revision


def _parse(kvs: Any, key: bytes) -> _Base:
    if not kvs:
        return _Base(0, 0)
    kv = kvs[0]
    try:
        value = int(kv.value)
    except ValueError:
        raise AddFailed(
            grpc.StatusCode.FAILED_PRECONDITION,
            "etha gateway: add needs a decimal integer at the key but it holds"
            f" {bytes(kv.value[:40])!r}; use a separate key for counters",
        ) from None
    return _Base(value, int(kv.mod_revision))


def _compare(key: bytes, base: _Base) -> Any:
    if base.mod_revision == 0:
        return etcdrpc.Compare(result=_EQUAL, target=_CREATE, key=key, create_revision=0)
    return etcdrpc.Compare(result=_EQUAL, target=_MOD, key=key, mod_revision=base.mod_revision)


def _is_ambiguous(exc: grpc.aio.AioRpcError) -> bool:
    """Might the Txn have been applied although we have no answer?"""
    code, details = exc.code(), exc.details() or ""
    if deadline_passed(code, details) or code is grpc.StatusCode.CANCELLED:
        return True
    return code is grpc.StatusCode.UNAVAILABLE and not never_sent(details)


#: The answer when an add may or may not have been applied. Never etcd's own words: a
#: client reads "failed to connect" as "never sent" and would send the add again.
MAYBE_APPLIED = (
    "etha gateway: etcd's answer to an add was lost and the counter changed since;"
    " the add may or may not have been applied: read the counter before retrying"
)


class _Key:
    """The queue and the last known base of one counter key."""

    __slots__ = ("base", "queue", "task")

    def __init__(self) -> None:
        self.queue: list[tuple[int, asyncio.Future[tuple[int, int]]]] = []
        self.base: _Base | None = None
        self.task: asyncio.Task[None] | None = None


class Counters:
    """The ``Add`` handler of one gateway replica (see the module docstring)."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self._keys: dict[bytes, _Key] = {}

    async def add(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The ``Coordination.Add`` handler."""
        from etha.gateway.waits import answer

        return await answer(self.ctx, "Add", context, lambda t: self._add(request, t))

    async def _add(self, request: Any, tenant: Tenant) -> Any:
        from etha.gateway.waits import Refused

        key, delta = bytes(request.key), int(request.delta)
        check_range(tenant.start, tenant.end, key, b"")
        try:
            value, revision = await self.submit(key, delta)
        except AddFailed as exc:
            raise Refused(exc.code, exc.message) from None
        return api.AddResponse(value=value, revision=revision)

    async def submit(self, key: bytes, delta: int) -> tuple[int, int]:
        """Queue one add on ``key`` (already confined); (new value, revision) when applied."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        state.queue.append((delta, future))
        if state.task is None or state.task.done():
            state.task = asyncio.ensure_future(self._drain(key, state))
        # Shielded: a caller that gives up must not cancel the batch it is part of.
        return await asyncio.shield(future)

    async def _drain(self, key: bytes, state: _Key) -> None:
        try:
            while state.queue:
                batch, state.queue = state.queue[:MAX_BATCH], state.queue[MAX_BATCH:]
                try:
                    results, revision = await self._apply(key, state, [d for d, _ in batch])
                except AddFailed as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except Exception as exc:  # never leave a caller hanging
                    log.exception("add on a counter failed")
                    failure = AddFailed(
                        grpc.StatusCode.UNAVAILABLE,
                        f"etha gateway: add failed ({type(exc).__name__}); retry",
                    )
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                    continue
                for (_, future), value in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result((value, revision))
        finally:
            if not state.queue and self._keys.get(key) is state:
                # Forget idle keys: the next batch reads its base again (other writers).
                del self._keys[key]

    async def _read(self, key: bytes) -> _Base:
        response = await self.ctx.upstream.call("KV", "Range", etcdrpc.RangeRequest(key=key))
        return _parse(response.kvs, key)

    async def _apply(self, key: bytes, state: _Key, deltas: list[int]) -> tuple[list[int], int]:
        upstream = self.ctx.upstream
        base = state.base or await self._read(key)
        read = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
        for _ in range(MAX_CONFLICTS):
            # Signed 64-bit, wrapping on overflow: what torch's stores do.
            results: list[int] = []
            total = base.value
            for delta in deltas:
                total = _wrap(total + delta)
                results.append(total)
            put = etcdrpc.RequestOp(
                request_put=etcdrpc.PutRequest(key=key, value=str(total).encode())
            )
            request = etcdrpc.TxnRequest(
                compare=[_compare(key, base)], success=[put], failure=[read]
            )
            try:
                response = await upstream.call("KV", "Txn", request)
            except grpc.aio.AioRpcError as exc:
                state.base = None
                if not _is_ambiguous(exc):
                    raise AddFailed(exc.code(), exc.details() or "etcd refused the add") from None
                base = await self._fence(key, base)
                continue
            if response.succeeded:
                revision = int(response.header.revision)
                state.base = _Base(total, revision)
                return results, revision
            base = _parse(response.responses[0].response_range.kvs, key)
        raise AddFailed(
            grpc.StatusCode.ABORTED,
            f"etha gateway: add lost {MAX_CONFLICTS} compare-and-swaps in a row; retry",
        )

    async def _fence(self, key: bytes, base: _Base) -> _Base:
        """After a lost answer: make sure the lost Txn never applies, or report it.

        :returns: the new base when the lost Txn provably did not apply
        :raises AddFailed: UNAVAILABLE :data:`MAYBE_APPLIED` otherwise, whatever etcd
            answered the fence (its error says nothing about the lost Txn)
        """
        value = str(base.value).encode()
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value))
        read = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
        fence = etcdrpc.TxnRequest(compare=[_compare(key, base)], success=[put], failure=[read])
        give_up = time.monotonic() + FENCE_BUDGET
        while time.monotonic() < give_up:
            try:
                response = await self.ctx.upstream.call("KV", "Txn", fence)
            except grpc.aio.AioRpcError as exc:
                if _is_ambiguous(exc) or exc.code() is grpc.StatusCode.UNAVAILABLE:
                    # A fence applied twice is harmless; its compare keeps the lost Txn out.
                    await asyncio.sleep(0.1)
                    continue
                log.warning("fence on a counter refused (%s); add outcome unknown", exc.code())
                break
            if response.succeeded:
                self.ctx.metrics.add_fences.labels("kept_out").inc()
                return _Base(base.value, int(response.header.revision))
            break
        self.ctx.metrics.add_fences.labels("unknown").inc()
        log.warning("an add's answer was lost and the counter moved on: outcome unknown")
        raise AddFailed(grpc.StatusCode.UNAVAILABLE, MAYBE_APPLIED)


__all__ = ["AddFailed", "Counters"]
