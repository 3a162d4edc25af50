"""Concurrent tenant Puts, coalesced into few etcd Txns.

A barrier of N ranks is N Puts arriving at once. Sent one by one, each costs etcd a raft
proposal, an apply and a backend commit (about 0.1 ms of etcd CPU on a small machine),
and costs the gateway one upstream call. Sent as Txns of up to :data:`MAX_OPS` puts, the
same N writes cost etcd about a tenth of that, and the gateway N / MAX_OPS calls.

How a Put travels (:meth:`PutBatcher.put`):

* With fewer than ``flights`` upstream calls in flight, a Put is sent at once: a lone
  Put is never delayed, and it goes to etcd as the very ``PutRequest`` it came as.
* Otherwise it queues. Each flight, when its call returns, takes the next batch off
  the queue: up to :data:`MAX_OPS` puts and :data:`MAX_BYTES` bytes, never the same key
  twice (etcd refuses a Txn that puts one key twice; the second put waits for the next
  batch, so two puts of one key are still applied in arrival order). A batch of one is
  a plain Put; a larger one is one Txn without compares, whose ``success`` ops are the
  queued ``PutRequest`` messages unchanged.
* Under concurrent load (the previous batch carried more than one put) a flight waits
  :data:`LINGER` before it takes the next batch, so that more puts share each Txn. A
  caller alone, even one putting back to back, never waits.

Why this is correct:

* Every put in a batch was in flight at once: none had been answered when the batch
  was sent, so any order among them, and applying them in one atomic step, is a valid
  linearization. Each caller gets the Txn's header (its revision) and its own op's
  ``prev_kv``, which is what a Put at that revision returns.
* One visible difference: puts of the same batch share a revision (as the puts of any
  etcd Txn do). Per key, revisions still only grow, so compare-and-swap on
  ``mod_revision`` and "read at R, watch from R + 1" work unchanged.
* A Txn without compares is retried by the upstream exactly like a Put (repeating it
  leaves the same state).
* A batch's failure is only shared when it says nothing about the puts themselves
  (UNAVAILABLE, a deadline, a cancellation: etcd did not or may not have applied any
  of them, which is what each caller would have heard alone). Any other refusal may
  be about the batch (etcd configured with a lower ``--max-txn-ops`` or
  ``--max-request-bytes``, one put's own error): then every put of the batch is sent
  again alone and each caller gets its own answer.

Puts that use ``ignore_value`` or ``ignore_lease`` are never batched: etcd answers
them with an error of their own (no such key) that would fail the whole Txn.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from pyetcd import etcdrpc

#: etcd's default ``--max-txn-ops``.
MAX_OPS = 128
#: Bytes of puts per batch: far under etcd's default 1.5 MiB request limit, so that a
#: batch is not refused where its puts alone would pass.
MAX_BYTES = 256 * 1024
#: Upstream calls in flight before Puts start to queue.
FLIGHTS = 1
#: Under concurrent load (the previous batch carried more than one put), a flight waits
#: this long before it takes the next batch, so that more puts share each Txn.
LINGER = 0.002

#: Failures of a batch that every put of it would have met alone.
_SHARED_FAILURES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
})  # fmt: skip

Call = Callable[..., Awaitable[Any]]


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A caller that gave up leaves its future unread: read it so that asyncio does not
    # log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _fail(batch: list[_Entry], exc: BaseException) -> None:
    """Every caller of ``batch`` still waiting gets ``exc``."""
    for entry in batch:
        if not entry.future.done():
            entry.future.set_exception(exc)


class _Entry:
    __slots__ = ("future", "request", "size", "timeout")

    def __init__(self, request: Any, timeout: float | None, future: asyncio.Future[Any]) -> None:
        self.request = request
        self.timeout = timeout
        self.future = future
        self.size = request.ByteSize()


class PutBatcher:
    """Puts through ``call`` (the upstream's ``call(service, method, request, timeout=)``),
    batched as the module docstring says.

    :param max_ops: puts per Txn at most
    :param max_bytes: bytes of puts per Txn at most (a larger put goes alone)
    :param flights: upstream calls in flight before puts queue
    :param linger: seconds a flight waits under concurrent load before the next batch
    """

    def __init__(
        self,
        call: Call,
        *,
        max_ops: int = MAX_OPS,
        max_bytes: int = MAX_BYTES,
        flights: int = FLIGHTS,
        linger: float = LINGER,
    ) -> None:
        if max_ops < 1 or flights < 1:
            raise ValueError("max_ops and flights must be at least 1")
        self._call = call
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.flights = flights
        self.linger = linger
        #: puts in the batch sent last; 0 when no flight runs (a new burst starts at once)
        self._last_size = 0
        self._queue: collections.deque[_Entry] = collections.deque()
        self._flying = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def batchable(self, request: Any) -> bool:
        """Whether ``request`` may share a Txn (see the module docstring)."""
        return not (request.ignore_value or request.ignore_lease or request.lease)

    async def put(self, request: Any, timeout: float | None = None) -> Any:
        """Apply ``request`` (a ``PutRequest``) and return its ``PutResponse``.

        :param timeout: how long the caller waits; the batch it joins is given the
            longest of its callers' timeouts
        :raises grpc.aio.AioRpcError: etcd's answer to this put (or to its whole batch
            when that answer concerns every put of it, see the module docstring)
        """
        if not self.batchable(request):
            return await self._call("KV", "Put", request, timeout=timeout)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        entry = _Entry(request, timeout, future)
        self._queue.append(entry)
        if self._flying < self.flights:
            self._flying += 1
            task = asyncio.create_task(self._fly())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Not sent yet: it never will be. Already sent: its answer is dropped, as a
            # Put's is when its caller goes away.
            if not future.done():
                future.cancel()
            raise

    async def _fly(self) -> None:
        try:
            while True:
                if self._last_size > 1 and len(self._queue) < self.max_ops:
                    await asyncio.sleep(self.linger)
                batch = self._take()
                if not batch:
                    return
                self._last_size = len(batch)
                await self._send(batch)
        finally:
            self._flying -= 1
            if not self._flying:
                self._last_size = 0

    def _take(self) -> list[_Entry]:
        """The next batch: queue order, unique keys, within the op and byte bounds."""
        batch: list[_Entry] = []
        deferred: list[_Entry] = []
        keys: set[bytes] = set()
        size = 0
        queue = self._queue
        while queue and len(batch) < self.max_ops:
            entry = queue.popleft()
            if entry.future.done():  # its caller gave up before it was sent
                continue
            key = entry.request.key
            if key in keys:
                deferred.append(entry)
                continue
            if batch and size + entry.size > self.max_bytes:
                queue.appendleft(entry)
                break
            batch.append(entry)
            keys.add(key)
            size += entry.size
        queue.extendleft(reversed(deferred))
        return batch

    async def _send(self, batch: list[_Entry]) -> None:
        timeouts = [e.timeout for e in batch]
        timeout = None if None in timeouts else max(t for t in timeouts if t is not None)
        if len(batch) == 1:
            await self._settle(batch[0], timeout)
            return
        txn = etcdrpc.TxnRequest(success=[etcdrpc.RequestOp(request_put=e.request) for e in batch])
        try:
            response = await self._call("KV", "Txn", txn, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _SHARED_FAILURES:
                _fail(batch, exc)
                return
            # Perhaps about the batch, not the puts: each put alone gets its own answer.
            await asyncio.gather(*(self._settle(e, e.timeout) for e in batch))
            return
        except asyncio.CancelledError:
            for entry in batch:
                entry.future.cancel()
            raise
        except Exception as exc:
            _fail(batch, exc)
            return
        for entry, op in zip(batch, response.responses, strict=True):
            if entry.future.done():
                continue
            answer = etcdrpc.PutResponse()
            answer.header.CopyFrom(response.header)
            put = op.response_put
            if put.HasField("prev_kv"):
                answer.prev_kv.CopyFrom(put.prev_kv)
            entry.future.set_result(answer)

    async def _settle(self, entry: _Entry, timeout: float | None) -> None:
        """Send one put alone; its caller gets the answer or the error."""
        if entry.future.done():
            return
        try:
            response = await self._call("KV", "Put", entry.request, timeout=timeout)
        except Exception as exc:
            _fail([entry], exc)
            return
        if not entry.future.done():
            entry.future.set_result(response)


__all__ = ["FLIGHTS", "LINGER", "MAX_BYTES", "MAX_OPS", "PutBatcher"]
