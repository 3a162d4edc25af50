"""The etcd v3 transport: channels, failover and log-in (the lowest layer of etcdv3).

A :class:`Transport` holds one gRPC channel per endpoint (created on first use) and the
auth token. Its public methods (:meth:`Transport.connection`, :meth:`Transport.failover`,
:meth:`Transport.token_metadata`, :meth:`Transport.relogin`, :meth:`Transport.send`) are
what the watch hub (:mod:`etha.kvstore.etcdv3.watch`) builds its stream on; the unary
calls, the request-size check and the mapping of server errors to etha's error types
are in :mod:`etha.kvstore.etcdv3.client`.

Why not pyetcd's high-level client: it refuses call credentials on plaintext channels,
never logs in again when the token expires, and ignores server-side watch cancels. Here
the token travels as plain ``token`` metadata, an expired token triggers one new login,
and unavailable endpoints are failed over.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import grpc
from pyetcd import etcdrpc

from etha.kvstore.config import Endpoint, parse_endpoints, tls_wanted
from etha.kvstore.errors import (
    ConfigurationError,
    InvalidArgumentError,
    KVStoreError,
    KVTimeoutError,
    StoreClosedError,
    UnavailableError,
)

#: The etcd services' generated stubs, by service name (the gateway's upstream uses them too).
STUBS: dict[str, Callable[[grpc.Channel], Any]] = {
    "KV": etcdrpc.KVStub,
    "Lease": etcdrpc.LeaseStub,
    "Cluster": etcdrpc.ClusterStub,
    "Maintenance": etcdrpc.MaintenanceStub,
    "Auth": etcdrpc.AuthStub,
    "Watch": etcdrpc.WatchStub,
}
#: "Coordination" is etha's gateway extension (etha.kvstore.gateway_api); plain etcd
#: answers it UNIMPLEMENTED.
UNARY_SERVICES = frozenset({"KV", "Lease", "Cluster", "Maintenance", "Auth", "Coordination"})

#: Channel options for etcd members (the gateway's upstream uses them too).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A restarted member must be found again within a wait's timeout; grpc's default
    # reconnect backoff grows to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect a hung member under a long-lived watch stream. etcd's default enforcement
    # policy rejects pings more often than every 5 s.
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Large prefix reads are legitimate; the server bounds requests, not us.
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Several clients in one process must not share one TCP connection behind our back.
    ("grpc.use_local_subchannel_pool", 1),
]

#: etcd's default ``--max-request-bytes``.
DEFAULT_MAX_REQUEST_BYTES = 1572864

#: Told of every request a :class:`Transport` sent: ``(call, seconds, error)`` with
#: ``call`` as ``"Service.Method"`` (``"KV.Range"``), never a key. See ``on_call``.
CallObserver: TypeAlias = Callable[[str, float, BaseException | None], None]

_TOKEN_ERRORS = ("invalid auth token", "user name is empty", "revision of auth store is old")
_AUTH_DISABLED = "authentication is not enabled"


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix`` (etcd's rule).

    The last byte below 0xff is incremented and what follows it dropped; a prefix of
    only 0xff bytes (or empty) gives ``b"\\0"``, meaning "every key from ``prefix`` on".
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class Connection:
    """The channel to one endpoint and its stubs' bound methods."""

    __slots__ = ("channel", "endpoint", "index", "methods", "stubs")

    def __init__(self, index: int, endpoint: Endpoint, channel: grpc.Channel) -> None:
        self.index = index
        self.endpoint = endpoint
        self.channel = channel
        self.stubs: dict[str, Any] = {}
        self.methods: dict[tuple[str, str], Any] = {}

    def stub(self, service: str) -> Any:
        stub = self.stubs.get(service)
        if stub is None:
            stub = self.stubs[service] = STUBS[service](self.channel)
        return stub

    def method(self, service: str, name: str) -> Any:
        fn = self.methods.get((service, name))
        if fn is None:
            if service not in UNARY_SERVICES:
                raise InvalidArgumentError(
                    f"etcd service {service!r} is not a unary service; use one of"
                    f" {sorted(UNARY_SERVICES)}"
                )
            if service == "Coordination":
                from etha.kvstore import gateway_api

                stubs = {"Wait": gateway_api.wait_stub, "Add": gateway_api.add_stub}
                fn = stubs[name](self.channel) if name in stubs else None
            else:
                fn = getattr(self.stub(service), name, None)
            if fn is None:
                raise InvalidArgumentError(f"etcd service {service} has no method {name!r}")
            self.methods[(service, name)] = fn
        return fn


def read_pem(path: str, what: str) -> bytes:
    """The bytes of a certificate or key file.

    :raises ConfigurationError: naming ``what`` (e.g. "CA file") and the path when the
        file cannot be read
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path!r}: {exc.strerror}") from None


def channel_credentials(
    ca_file: str | None = None,
    ca_pem: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials for channels to etcd: the CA from ``ca_file`` or ``ca_pem`` (the
    system's roots when neither is given), and the client certificate and key for mTLS.

    :raises ConfigurationError: naming a file that cannot be read
    """
    root = read_pem(ca_file, "CA file") if ca_file else (ca_pem.encode() if ca_pem else None)
    key = read_pem(key_file, "client key file") if key_file else None
    cert = read_pem(cert_file, "client certificate file") if cert_file else None
    return grpc.ssl_channel_credentials(root, key, cert)


def normalize_endpoints(
    endpoints: Sequence[str | Endpoint] | str,
) -> tuple[list[Endpoint], bool]:
    """Parse endpoints given as strings (``host:port``, ``http(s)://...``) or Endpoints.

    :returns: the endpoints, and whether an ``https://`` scheme asked for TLS
    """
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    result: list[Endpoint] = []
    wants_tls = False
    for item in endpoints:
        if isinstance(item, Endpoint):
            result.append(item)
            continue
        if not isinstance(item, str):
            raise ConfigurationError(f"etcd endpoint {item!r} must be a str like 'host:port'")
        parsed, scheme_tls = parse_endpoints(item, "endpoints")
        wants_tls = wants_tls or bool(scheme_tls)
        result.extend(parsed)
    if not result:
        raise ConfigurationError("no etcd endpoints given; pass at least one 'host:port'")
    return result, wants_tls


def is_conditional(service: str, method: str, request: Any) -> bool:
    """A Txn with compares: re-sending one that was applied would apply it twice.

    (A put, a delete or an unconditional Txn of them leaves the same state when repeated.)
    """
    if service == "Coordination":
        return method == "Add"
    return service == "KV" and method == "Txn" and len(request.compare) > 0


#: Calls that leave the same state when sent twice (reads, a put, a delete). Not
#: Authenticate: it costs etcd a bcrypt check, so re-sending slow log-ins would feed a
#: log-in storm (#6 in docs/benchmarks.md) instead of relieving it.
_RETRYABLE = frozenset({
    ("KV", "Range"), ("KV", "Put"), ("KV", "DeleteRange"),
    ("Auth", "UserGet"), ("Auth", "UserList"), ("Auth", "RoleGet"), ("Auth", "RoleList"),
    ("Maintenance", "Status"), ("Cluster", "MemberList"),
})  # fmt: skip
#: With several endpoints, one attempt of a retryable call gets this share of its timeout
#: (at most the client's; at least _MIN_ATTEMPT seconds): a hung member (SIGSTOP, a
#: partition) keeps its TCP connections open and answers nothing, so only a deadline
#: reveals it.
_ATTEMPT_SHARE = 1 / 3
_MIN_ATTEMPT = 1.0


def _retryable(service: str, method: str, request: Any) -> bool:
    if service == "KV" and method == "Txn":
        return not is_conditional(service, method, request)
    return (service, method) in _RETRYABLE


def never_sent(details: str) -> bool:
    """True when an UNAVAILABLE error says the request never reached a server."""
    lowered = details.lower()
    return "failed to connect" in lowered or "connection refused" in lowered


#: What etcd answers (code UNKNOWN) when the deadline a request carried passed inside
#: the server, e.g. a linearizable read waiting for a new leader: Go's context error.
_SERVER_DEADLINE = "context deadline exceeded"


def deadline_passed(code: grpc.StatusCode, details: str) -> bool:
    """True when the call ran out of time: on this side, or inside the server.

    etcd reports its own side as code UNKNOWN with Go's "context deadline exceeded";
    that means the same as a local DEADLINE_EXCEEDED (the member may be slow or
    without a leader), so it is failed over and retried by the same rules.
    """
    return code is grpc.StatusCode.DEADLINE_EXCEEDED or (
        code is grpc.StatusCode.UNKNOWN and details == _SERVER_DEADLINE
    )


class Step(enum.Enum):
    """What a unary call does after one of its attempts failed (see :func:`next_step`)."""

    #: UNAVAILABLE from a conditional call that may have reached a member: re-sending
    #: could apply it twice, so the caller gets the error and must re-read.
    MAYBE_APPLIED = "maybe-applied"
    #: UNAVAILABLE and nothing applied: send it again, on the next member.
    FAIL_OVER = "fail-over"
    #: A capped attempt ran out of time (the member may hang): send it again, on the
    #: next member.
    RETRY_ON_NEXT = "retry-on-next"
    #: Out of time: give up; with several members, later calls go to the next one.
    TIMED_OUT = "timed-out"
    #: etcd refused the token: log in again, then send it again.
    RELOGIN = "relogin"
    #: Any other refusal: give up.
    FAIL = "fail"


def next_step(
    code: grpc.StatusCode, details: str, *, conditional: bool, capped: bool, may_relogin: bool
) -> Step:
    """The retry rule for one failed attempt, the same for every etcd client in etha.

    :param conditional: the request must not be applied twice (:func:`is_conditional`)
    :param capped: the attempt had only a share of the call's time, because there are
        several members and the request may be sent twice
    :param may_relogin: the client logs in with a password and has not logged in again
        during this call yet
    """
    if code is grpc.StatusCode.UNAVAILABLE:
        return Step.MAYBE_APPLIED if conditional and not never_sent(details) else Step.FAIL_OVER
    if deadline_passed(code, details):
        return Step.RETRY_ON_NEXT if capped else Step.TIMED_OUT
    if may_relogin and is_token_error(code, details):
        return Step.RELOGIN
    return Step.FAIL


class Transport:
    """Channels to the endpoints, failover between them, and the log-in; thread-safe.

    :param endpoints: ``host:port`` strings (``http://``/``https://`` allowed) or
        :class:`~etha.kvstore.config.Endpoint` objects; tried in order, failed over on
        ``UNAVAILABLE`` and when a member does not answer in time (see :meth:`send`)
    :param username: user to log in as; with ``password``. With mTLS and no password,
        etcd takes the user from the client certificate's CN.
    :param tls: use TLS (also implied by https endpoints or any TLS file:
        :func:`etha.kvstore.config.tls_wanted`)
    :param timeout: default deadline of one :meth:`send`, failover and re-login included
    :param max_request_bytes: the server's ``--max-request-bytes``; the client refuses
        larger requests before anything is sent
    :param on_call: called once per :meth:`send` (every unary call of the client), when
        it has finished, in the calling thread: ``on_call("KV.Put", seconds, error)``
        with the wall-clock seconds the call took (log-in, failover and retries
        included) and the exception it raises, or None when it succeeded. Requests
        refused before sending (argument and size checks) are not reported. It must
        be quick and must not raise: what it raises replaces the call's result.
    """

    def __init__(
        self,
        endpoints: Sequence[str | Endpoint] | str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        ca_pem: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = 10.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        on_call: CallObserver | None = None,
    ) -> None:
        self._endpoints, scheme_tls = normalize_endpoints(endpoints)
        if (username is None) != (password is None):
            raise ConfigurationError("etcd username and password go together; set both or neither")
        if (cert_file is None) != (key_file is None):
            raise ConfigurationError("cert_file and key_file go together; set both or neither")
        if ca_file and ca_pem:
            raise ConfigurationError("ca_file and ca_pem are both set; set one of them")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout}")
        self.username = username
        self._password = password
        self.tls = tls or tls_wanted(scheme_tls, ca_file, ca_pem, cert_file)
        self.timeout = float(timeout)
        self.max_request_bytes = int(max_request_bytes)
        self.on_call = on_call
        self._credentials: grpc.ChannelCredentials | None = None
        if self.tls:
            self._credentials = channel_credentials(ca_file, ca_pem, cert_file, key_file)

        self._lock = threading.RLock()
        self._login_lock = threading.Lock()
        self._connections: list[Connection | None] = [None] * len(self._endpoints)
        self._active: Connection | None = None
        #: None without auth; else the ``(("token", t),)`` tuple sent with every call
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._auth_disabled = False
        self._closed = False

    # -- state ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._endpoints)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def logs_in(self) -> bool:
        """True when this transport logs in with a password (and so holds a token)."""
        return self._password is not None

    def check_open(self) -> None:
        """:raises StoreClosedError: the transport was closed"""
        if self._closed:
            raise StoreClosedError("the etcd client is closed; open a new store")

    def _close_channels(self) -> None:
        """Mark closed and close every channel (the caller holds no lock). Idempotent."""
        with self._lock:
            self._closed = True
            connections = [c for c in self._connections if c is not None]
            self._connections = [None] * len(self._endpoints)
            self._active = None
        for conn in connections:
            conn.channel.close()

    # -- connections ---------------------------------------------------------------------

    def connection(self) -> Connection:
        """The connection to the current endpoint (connecting to the first on first use).

        :raises StoreClosedError: the transport was closed
        """
        return self._active or self._first_connection()

    def _first_connection(self) -> Connection:
        with self._lock:
            self.check_open()
            if self._active is None:
                self._active = self._connect(0)
            return self._active

    def _connect(self, index: int) -> Connection:
        conn = self._connections[index]
        if conn is None:
            endpoint = self._endpoints[index]
            target = str(endpoint)
            if self._credentials is not None:
                channel = grpc.secure_channel(target, self._credentials, CHANNEL_OPTIONS)
            else:
                channel = grpc.insecure_channel(target, CHANNEL_OPTIONS)
            conn = self._connections[index] = Connection(index, endpoint, channel)
        return conn

    def failover(self, failed: Connection) -> Connection:
        """Move to the endpoint after ``failed`` (unless another thread already moved).

        :raises StoreClosedError: the transport was closed
        """
        with self._lock:
            self.check_open()
            if self._active is failed or self._active is None:
                self._active = self._connect((failed.index + 1) % len(self._endpoints))
            return self._active

    # -- log-in --------------------------------------------------------------------------

    def token_metadata(self, timeout: float | None = None) -> tuple[tuple[str, str], ...] | None:
        """The metadata to send: ``(("token", t),)`` after logging in if needed, else None."""
        md = self._metadata
        if md is not None or self._password is None or self._auth_disabled:
            return md
        return self.relogin(None, timeout)

    def relogin(
        self, stale: tuple[tuple[str, str], ...] | None, timeout: float | None = None
    ) -> tuple[tuple[str, str], ...] | None:
        """Log in again unless another thread already replaced the ``stale`` token.

        :returns: the new metadata (None without a password or with auth disabled)
        :raises PermissionDeniedError: the credentials were refused
        """
        if self._password is None:
            return None
        with self._login_lock:
            if self._metadata is not stale and self._metadata is not None:
                return self._metadata
            request = etcdrpc.AuthenticateRequest(name=self.username, password=self._password)
            try:
                response = self._invoke("Auth", "Authenticate", request, timeout, None, False)
            except _AuthDisabled:
                self._auth_disabled = True
                self._metadata = None
                return None
            self._auth_disabled = False
            self._metadata = (("token", response.token),)
            return self._metadata

    # -- calls ---------------------------------------------------------------------------

    def send(self, service: str, method: str, request: Any, timeout: float | None = None) -> Any:
        """One unary call with log-in, re-login and failover; no argument or size checks.

        See :meth:`etha.kvstore.etcdv3.client.EtcdClient.call` for the retry rules; the
        ``on_call`` observer is told of it.
        """
        observer = self.on_call
        if observer is None:
            return self._send(service, method, request, timeout)
        began = time.perf_counter()
        try:
            response = self._send(service, method, request, timeout)
        except BaseException as exc:
            observer(f"{service}.{method}", time.perf_counter() - began, exc)
            raise
        observer(f"{service}.{method}", time.perf_counter() - began, None)
        return response

    def _send(self, service: str, method: str, request: Any, timeout: float | None) -> Any:
        md = self._metadata
        if md is None and self._password is not None and not self._auth_disabled:
            md = self.token_metadata(timeout)
        return self._invoke(service, method, request, timeout, md, True)

    def _invoke(
        self,
        service: str,
        method: str,
        request: Any,
        timeout: float | None,
        md: tuple[tuple[str, str], ...] | None,
        may_relogin: bool,
    ) -> Any:
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        conn = self.connection()
        unavailable: grpc.RpcError | None = None
        tried = 0
        backoff = 0.05
        several = len(self._endpoints) > 1
        # Sized by the client's timeout too: a wait's read may be given minutes.
        attempt_cap = (
            max(_MIN_ATTEMPT, min(total, self.timeout) * _ATTEMPT_SHARE)
            if several and _retryable(service, method, request)
            else None
        )
        while True:
            fn = conn.methods.get((service, method)) or conn.method(service, method)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._deadline_error(service, method, total, unavailable)
            attempt = remaining if attempt_cap is None else min(remaining, attempt_cap)
            try:
                return fn(request, timeout=attempt, metadata=md)
            except ValueError:
                # grpc's "Cannot invoke RPC on closed channel!"
                if self._closed:
                    raise StoreClosedError("the etcd client was closed during a call") from None
                raise
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                details: str = exc.details() or ""
                step = next_step(
                    code,
                    details,
                    conditional=is_conditional(service, method, request),
                    capped=attempt_cap is not None,
                    may_relogin=may_relogin and self._password is not None,
                )
                if step is Step.MAYBE_APPLIED:
                    # The request may have been applied ("request timed out, possibly
                    # due to previous leader failure"): re-sending a CAS would apply
                    # it twice (an add counted twice), so the caller must re-read.
                    raise UnavailableError(
                        f"etcd {service}.{method} failed on {conn.endpoint} ({details});"
                        " it may or may not have been applied: read the current state"
                        " before retrying"
                    ) from None
                if step is Step.FAIL_OVER:
                    unavailable = exc
                    tried += 1
                    if tried % len(self._endpoints) == 0:
                        # Every endpoint failed once: give restarts a moment.
                        time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                        backoff = min(backoff * 2, 1.0)
                    conn = self.failover(conn)
                    continue
                if step is Step.RETRY_ON_NEXT or step is Step.TIMED_OUT:
                    if several:
                        # The member may be hung: later calls go to the next one.
                        conn = self.failover(conn)
                    if step is Step.RETRY_ON_NEXT:
                        continue
                    error = self._deadline_error(service, method, total, unavailable)
                    error.code, error.details = code.name, details
                    raise error from None
                if step is Step.RELOGIN:
                    md = self.relogin(md, max(deadline - time.monotonic(), 0.001))
                    may_relogin = False
                    continue
                if md is None and not may_relogin and _AUTH_DISABLED in details:
                    raise _AuthDisabled() from None
                if self._closed and code is grpc.StatusCode.CANCELLED:
                    # close() in another thread cancelled this call ("Channel closed!").
                    raise StoreClosedError("the etcd client was closed during a call") from None
                error = self._map_error(service, method, exc, conn)
                error.code, error.details = code.name, details
                error.endpoint = str(conn.endpoint)
                raise error from None

    def _deadline_error(
        self, service: str, method: str, total: float, unavailable: grpc.RpcError | None
    ) -> KVStoreError:
        if unavailable is not None:
            return UnavailableError(
                f"etcd {service}.{method}: no endpoint of "
                f"{','.join(str(e) for e in self._endpoints)} answered within {total:g}s"
                f" (last error: {unavailable.details()}); check that etcd is running"
            )
        return KVTimeoutError(
            f"etcd {service}.{method} did not complete within {total:g}s;"
            " the server may be overloaded, or raise the timeout"
        )

    def _map_error(
        self, service: str, method: str, exc: grpc.RpcError, conn: Connection
    ) -> KVStoreError:
        """The etha error for a server's refusal; the client maps each kind to its type."""
        return KVStoreError(
            f"etcd {service}.{method} at {conn.endpoint} failed: {exc.code().name}: {exc.details()}"
        )


class _AuthDisabled(Exception):
    """Authenticate was refused because the server has auth disabled."""


def is_token_error(code: grpc.StatusCode | None, details: str) -> bool:
    """True when etcd refused a call for its token (expired, unknown), not a password."""
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return "authentication failed" not in details
    return any(t in details for t in _TOKEN_ERRORS)


__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "STUBS",
    "UNARY_SERVICES",
    "CallObserver",
    "Connection",
    "Step",
    "Transport",
    "channel_credentials",
    "deadline_passed",
    "is_conditional",
    "is_token_error",
    "never_sent",
    "next_step",
    "normalize_endpoints",
    "prefix_range_end",
    "read_pem",
]
