"""The gateway's own async etcd client: grpc.aio channels, its own log-in, failover.

One :class:`Upstream` per gateway process. It logs in once with the gateway's etcd
credentials (``Auth.Authenticate`` costs etcd a bcrypt check, so never per request),
logs in again when etcd says "invalid auth token", and fails over across the endpoints
on ``UNAVAILABLE`` with the same rule as :mod:`etha.kvstore.etcd_client`: a call that
leaves the same state when repeated is re-sent on the next member; a Txn with compares
is never re-sent once it may have reached a member (its UNAVAILABLE goes back to the
caller, who must re-read).

Errors: a server's refusal is raised as the ``grpc.aio.AioRpcError`` it was, so the
gateway can hand etcd's own code and message to its client unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from pyetcd import etcdrpc

from etha.kvstore.config import Endpoint
from etha.kvstore.errors import ConfigurationError
from etha.kvstore.etcdv3.transport import (
    CHANNEL_OPTIONS,
    STUBS,
    Step,
    is_conditional,
    next_step,
)

log = logging.getLogger("etha.gateway.upstream")


_AUTH_DISABLED = "authentication is not enabled"
_RETRYABLE = frozenset({
    ("KV", "Range"), ("KV", "Put"), ("KV", "DeleteRange"),
    ("Maintenance", "Status"), ("Maintenance", "Alarm"), ("Cluster", "MemberList"),
})  # fmt: skip
_ATTEMPT_SHARE = 1 / 3
_MIN_ATTEMPT = 1.0


def _retryable(service: str, method: str, request: Any) -> bool:
    if service == "KV" and method == "Txn":
        return not is_conditional(service, method, request)
    return (service, method) in _RETRYABLE


class Upstream:
    """Async etcd client with the gateway's credentials (see the module docstring).

    :param endpoints: etcd members, tried in order
    :param username: the gateway's etcd user (with ``password``); None without auth
    :param credentials: TLS channel credentials, None for plaintext
    :param timeout: default deadline of one :meth:`call`, failover included
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        username: str | None = None,
        password: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not endpoints:
            raise ConfigurationError("the gateway needs at least one etcd endpoint")
        if (username is None) != (password is None):
            raise ConfigurationError("the gateway's etcd username and password go together")
        self.endpoints = tuple(endpoints)
        self.username = username
        self._password = password
        self._credentials = credentials
        self.timeout = timeout
        self._channels: list[grpc.aio.Channel | None] = [None] * len(self.endpoints)
        self._stubs: dict[tuple[int, str], Any] = {}
        #: the stubs' bound methods by (endpoint index, service, method), looked up once
        self._methods: dict[tuple[int, str, str], Any] = {}
        self._active = 0
        self._metadata: tuple[tuple[str, str], ...] | None = None
        #: ``_metadata`` as the grpc.aio.Metadata a call takes, built once per log-in
        #: (grpc converts a tuple into one on every call)
        self._call_md: tuple[tuple[tuple[str, str], ...], grpc.aio.Metadata] | None = None
        self._login_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def active_endpoint(self) -> Endpoint:
        return self.endpoints[self._active]

    def _stub(self, index: int, service: str) -> Any:
        stub = self._stubs.get((index, service))
        if stub is None:
            channel = self._channels[index]
            if channel is None:
                target = str(self.endpoints[index])
                if self._credentials is not None:
                    channel = grpc.aio.secure_channel(
                        target, self._credentials, options=CHANNEL_OPTIONS
                    )
                else:
                    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
                self._channels[index] = channel
            stub = self._stubs[(index, service)] = STUBS[service](channel)
        return stub

    def _failover(self, failed: int) -> int:
        if self._active == failed and len(self.endpoints) > 1:
            self._active = (failed + 1) % len(self.endpoints)
            log.warning(
                "etcd %s failed; moving to %s", self.endpoints[failed], self.active_endpoint
            )
        return self._active

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The ``token`` metadata of the current log-in (None before it, or without auth)."""
        return self._metadata

    async def login(self, stale: tuple[tuple[str, str], ...] | None = None) -> None:
        """Log in (again), unless another task already replaced the ``stale`` token."""
        if self._password is None:
            return
        async with self._login_lock:
            if self._metadata is not None and self._metadata is not stale:
                return
            request = etcdrpc.AuthenticateRequest(name=self.username, password=self._password)
            try:
                response = await self._invoke("Auth", "Authenticate", request, login=True)
            except grpc.aio.AioRpcError as exc:
                if _AUTH_DISABLED in (exc.details() or ""):
                    self._password = None  # etcd without auth: send no token
                    self._metadata = None
                    return
                raise
            self._metadata = (("token", response.token),)

    def schedule_login(self, stale: tuple[tuple[str, str], ...] | None) -> None:
        """Log in again in the background unless the token was replaced already."""
        if self._password is None or self._metadata is not stale:
            return
        task = asyncio.get_running_loop().create_task(self._quiet_login(stale))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quiet_login(self, stale: tuple[tuple[str, str], ...] | None) -> None:
        try:
            await self.login(stale)
        except grpc.aio.AioRpcError as exc:
            log.warning("etcd log-in failed: %s: %s", exc.code().name, exc.details())

    async def keep_token_fresh(self, key: bytes, interval: float) -> None:
        """Every ``interval`` seconds, one cheap authenticated read of ``key``.

        Watch streams present the token only when opened, so an idle gateway would open
        its next stream with a token etcd has expired (simple tokens expire after
        ``--auth-token-ttl`` without use). The read keeps a simple token alive and
        logs in again when a (JWT) token has expired. Runs until cancelled.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                await self.call(
                    "KV", "Range", etcdrpc.RangeRequest(key=key, count_only=True), timeout=interval
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("etcd token check failed: %s: %s", exc.code().name, exc.details())

    async def call(
        self, service: str, method: str, request: Any, *, timeout: float | None = None
    ) -> Any:
        """One unary etcd call with the gateway's token; failover as the module says.

        :raises grpc.aio.AioRpcError: etcd's refusal (code and details unchanged), or
            the last UNAVAILABLE / DEADLINE_EXCEEDED when no member answered in time
        """
        if self._metadata is None and self._password is not None:
            await self.login()
        return await self._invoke(service, method, request, timeout)

    def _as_call_metadata(self, md: tuple[tuple[str, str], ...] | None) -> grpc.aio.Metadata | None:
        if md is None:
            return None
        cached = self._call_md
        if cached is None or cached[0] is not md:
            cached = self._call_md = (md, grpc.aio.Metadata(*md))
        return cached[1]

    async def _invoke(
        self,
        service: str,
        method: str,
        request: Any,
        timeout: float | None = None,
        *,
        login: bool = False,
    ) -> Any:
        """Send with failover; ``login``: the log-in itself (no token, no second log-in)."""
        md = None if login else self._metadata
        may_relogin = not login
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        several = len(self.endpoints) > 1
        cap = (
            max(_MIN_ATTEMPT, total * _ATTEMPT_SHARE)
            if several and _retryable(service, method, request)
            else None
        )
        conditional = is_conditional(service, method, request)
        index = self._active
        call_md = self._as_call_metadata(md)
        tried = 0
        backoff = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                remaining = 0.001
            attempt = remaining if cap is None else min(remaining, cap)
            fn = self._methods.get((index, service, method))
            if fn is None:
                fn = self._methods[(index, service, method)] = getattr(
                    self._stub(index, service), method
                )
            try:
                return await fn(request, timeout=attempt, metadata=call_md)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                out_of_time = deadline - time.monotonic() <= 0
                relogin = may_relogin and self._password is not None
                step = next_step(
                    code,
                    details,
                    conditional=conditional,
                    capped=cap is not None,
                    may_relogin=relogin,
                )
                if step is Step.MAYBE_APPLIED:
                    self._failover(index)
                    raise
                if step is Step.FAIL_OVER:
                    if out_of_time:
                        raise
                    tried += 1
                    if tried % len(self.endpoints) == 0:
                        await asyncio.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                        backoff = min(backoff * 2, 1.0)
                    index = self._failover(index)
                    continue
                if step is Step.RETRY_ON_NEXT or (step is Step.TIMED_OUT and several):
                    index = self._failover(index)
                    if step is Step.RETRY_ON_NEXT and not out_of_time:
                        continue
                    raise
                if step is Step.RELOGIN:
                    await self.login(md)
                    md = self._metadata
                    call_md = self._as_call_metadata(md)
                    may_relogin = False
                    continue
                raise

    def open_watch(self) -> grpc.aio.StreamStreamCall[Any, Any]:
        """A raw etcd Watch stream on the active member, with the gateway's token.

        The caller writes ``WatchRequest``s and reads ``WatchResponse``s; when the
        stream breaks it opens another (which goes to the member :meth:`call` moved to).
        """
        stub = self._stub(self._active, "Watch")
        call: grpc.aio.StreamStreamCall[Any, Any] = stub.Watch(metadata=self._metadata)
        return call

    def note_stream_failure(self) -> None:
        """A Watch stream on the active member broke: later streams go to the next one."""
        self._failover(self._active)

    async def close(self) -> None:
        """Close every channel (open streams end). Idempotent."""
        self._closed = True
        channels = [c for c in self._channels if c is not None]
        self._channels = [None] * len(self.endpoints)
        self._stubs.clear()
        self._methods.clear()
        for channel in channels:
            await channel.close()


__all__ = ["Upstream"]
