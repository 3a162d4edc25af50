"""Low-level etcd v3 client on the generated gRPC stubs of ``etcd-sdk-python``.

One :class:`EtcdClient` holds one gRPC channel per endpoint (created on first use), the
auth token, and the shared :class:`~etha.kvstore.etcd_watch.WatchHub`. It is
thread-safe. :meth:`EtcdClient.shared` hands out one ref-counted client per process and
configuration, so that many stores reuse one authenticated channel and one watch stream.

Why not pyetcd's high-level client: it refuses call credentials on plaintext channels,
never logs in again when the token expires, and ignores server-side watch cancels (see
the platform findings). Here the token travels as plain ``token`` metadata, an expired
token triggers one new login, and unavailable endpoints are failed over.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from pyetcd import etcdrpc

from etha.kvstore.config import Endpoint, EtcdConfig, parse_endpoints
from etha.kvstore.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidValueError,
    KVStoreError,
    KVTimeoutError,
    PermissionDeniedError,
    QuotaExceededError,
    StoreClosedError,
    UnavailableError,
)

if TYPE_CHECKING:
    from etha.kvstore.etcd_watch import WatchHub

DEFAULT_MAX_REQUEST_BYTES = 1572864
#: etcd wraps each request in an internal raft request (a header of a few dozen bytes)
#: and compares *that* with ``--max-request-bytes``; keep this much room so a request
#: accepted here is not refused by the server.
RAFT_OVERHEAD_BYTES = 128

_STUBS: dict[str, Callable[[grpc.Channel], Any]] = {
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

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
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

_TOKEN_ERRORS = ("invalid auth token", "user name is empty", "revision of auth store is old")
_AUTH_DISABLED = "authentication is not enabled"
_TOO_LARGE = ("request is too large", "message larger than max", "exceeds maximum")
_NO_SPACE = "database space exceeded"
#: Trailing metadata an etha gateway adds to a quota refusal: the quota's name.
QUOTA_METADATA_KEY = "etha-quota"


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


class _Connection:
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
            stub = self.stubs[service] = _STUBS[service](self.channel)
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


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path!r}: {exc.strerror}") from None


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


def _is_conditional(service: str, method: str, request: Any) -> bool:
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
        return not _is_conditional(service, method, request)
    return (service, method) in _RETRYABLE


def _never_sent(details: str) -> bool:
    """True when an UNAVAILABLE error says the request never reached a server."""
    lowered = details.lower()
    return "failed to connect" in lowered or "connection refused" in lowered


class EtcdClient:
    """Thread-safe etcd v3 client; one per process per config is enough (see :meth:`shared`).

    :param endpoints: ``host:port`` strings (``http://``/``https://`` allowed) or
        :class:`~etha.kvstore.config.Endpoint` objects; tried in order, failed over on
        ``UNAVAILABLE`` and when a member does not answer in time (see :meth:`call`)
    :param username: user to log in as; with ``password``. With mTLS and no password,
        etcd takes the user from the client certificate's CN.
    :param tls: use TLS (also implied by https endpoints or any TLS file)
    :param timeout: default deadline of one :meth:`call`, failover and re-login included
    :param max_request_bytes: the server's ``--max-request-bytes``; larger requests are
        refused here with :class:`InvalidValueError` before anything is sent
    """

    _shared_lock = threading.Lock()
    _shared_clients: dict[tuple[Any, ...], EtcdClient] = {}

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
        self.tls = bool(tls or scheme_tls or ca_file or ca_pem or cert_file)
        self.timeout = float(timeout)
        self.max_request_bytes = int(max_request_bytes)
        self._credentials: grpc.ChannelCredentials | None = None
        if self.tls:
            root = _read(ca_file, "CA file") if ca_file else (ca_pem.encode() if ca_pem else None)
            key = _read(key_file, "client key file") if key_file else None
            cert = _read(cert_file, "client certificate file") if cert_file else None
            self._credentials = grpc.ssl_channel_credentials(root, key, cert)

        self._lock = threading.RLock()
        self._login_lock = threading.Lock()
        self._connections: list[_Connection | None] = [None] * len(self._endpoints)
        self._active: _Connection | None = None
        #: None without auth; else the ``(("token", t),)`` tuple sent with every call
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._auth_disabled = False
        self._closed = False
        self._hub: WatchHub | None = None
        self._shared_key: tuple[Any, ...] | None = None
        self._refs = 0

    # -- construction and lifetime -----------------------------------------------------

    @classmethod
    def from_config(cls, config: EtcdConfig) -> EtcdClient:
        """A new (unshared) client for ``config``."""
        return cls(
            config.endpoints,
            username=config.username,
            password=config.password,
            tls=config.tls,
            ca_file=config.ca_file,
            ca_pem=config.ca_pem,
            cert_file=config.cert_file,
            key_file=config.key_file,
            timeout=config.timeout,
        )

    @staticmethod
    def _config_key(config: EtcdConfig) -> tuple[Any, ...]:
        # Namespace and component are not part of the connection; the pid keeps a forked
        # child from reusing its parent's channels.
        return (
            os.getpid(), config.endpoints, config.username, config.password, config.tls,
            config.ca_file, config.ca_pem, config.cert_file, config.key_file, config.timeout,
        )  # fmt: skip

    @classmethod
    def shared(cls, config: EtcdConfig) -> EtcdClient:
        """The process-wide client for ``config``'s connection settings, ref-counted.

        Every call must be paired with one :meth:`release`; the client closes when the
        last holder releases it.
        """
        key = cls._config_key(config)
        with cls._shared_lock:
            client = cls._shared_clients.get(key)
            if client is None or client._closed:
                client = cls.from_config(config)
                client._shared_key = key
                cls._shared_clients[key] = client
            client._refs += 1
            return client

    def release(self) -> None:
        """Drop one reference taken by :meth:`shared`; close on the last one.

        On a client that was not obtained from :meth:`shared` this is :meth:`close`.
        """
        with EtcdClient._shared_lock:
            if self._shared_key is not None:
                self._refs -= 1
                if self._refs > 0:
                    return
                if EtcdClient._shared_clients.get(self._shared_key) is self:
                    del EtcdClient._shared_clients[self._shared_key]
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the watch hub (joining its thread) and close every channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            hub, self._hub = self._hub, None
            connections = [c for c in self._connections if c is not None]
            self._connections = [None] * len(self._endpoints)
            self._active = None
        if hub is not None:
            hub.close()
        for conn in connections:
            conn.channel.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        endpoints = ",".join(str(e) for e in self._endpoints)
        return (
            f"EtcdClient(endpoints={endpoints!r}, username={self.username!r},"
            f" tls={self.tls}, closed={self._closed})"
        )

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._endpoints)

    @property
    def watch_hub(self) -> WatchHub:
        """The client's one watch stream, created on first use."""
        hub = self._hub
        if hub is not None:
            return hub
        from etha.kvstore.etcd_watch import WatchHub

        with self._lock:
            self._check_open()
            if self._hub is None:
                self._hub = WatchHub(self)
            return self._hub

    # -- connections (package-internal; the watch hub uses these too) --------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the etcd client is closed; open a new store")

    def _connection(self) -> _Connection:
        conn = self._active
        if conn is not None:
            return conn
        with self._lock:
            self._check_open()
            if self._active is None:
                self._active = self._connect(0)
            return self._active

    def _connect(self, index: int) -> _Connection:
        conn = self._connections[index]
        if conn is None:
            endpoint = self._endpoints[index]
            target = str(endpoint)
            if self._credentials is not None:
                channel = grpc.secure_channel(target, self._credentials, _CHANNEL_OPTIONS)
            else:
                channel = grpc.insecure_channel(target, _CHANNEL_OPTIONS)
            conn = self._connections[index] = _Connection(index, endpoint, channel)
        return conn

    def _failover(self, failed: _Connection) -> _Connection:
        """Move to the endpoint after ``failed`` (unless another thread already moved)."""
        with self._lock:
            self._check_open()
            if self._active is failed or self._active is None:
                self._active = self._connect((failed.index + 1) % len(self._endpoints))
            return self._active

    def _token_metadata(self, timeout: float | None = None) -> tuple[tuple[str, str], ...] | None:
        """The metadata to send: ``(("token", t),)`` after logging in if needed, else None."""
        md = self._metadata
        if md is not None or self._password is None or self._auth_disabled:
            return md
        return self._relogin(None, timeout)

    def _relogin(
        self, stale: tuple[tuple[str, str], ...] | None, timeout: float | None = None
    ) -> tuple[tuple[str, str], ...] | None:
        """Log in again unless another thread already replaced the ``stale`` token."""
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

    def call(self, service: str, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Unary RPC, e.g. ``call("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(...))``.

        ``service`` is one of KV, Lease, Cluster, Maintenance, Auth. The auth token goes
        as ``token`` metadata; an expired or invalid token causes one new login; an
        ``UNAVAILABLE`` endpoint is failed over to the next one (with backoff once all
        were tried) until ``timeout`` (default: the client's) runs out.

        With several endpoints, a member that does not answer in time is left too: a
        call that leaves the same state when repeated (reads, puts, deletes, a Txn
        without compares) gives each attempt a third of ``timeout`` or of the client's
        timeout, whichever is shorter (at least 1 s), and retries on the next member;
        any call that times out moves later calls to the next member. A Txn with
        compares is never re-sent after it may have arrived.

        :raises InvalidValueError: the serialized request exceeds ``max_request_bytes``
            (nothing is sent), or the server refused it as too large
        :raises PermissionDeniedError: bad credentials, or the user may not do this
        :raises UnavailableError: no endpoint answered within the timeout
        :raises KVTimeoutError: the request did not complete within the timeout
        :raises KVStoreError: any other server error (its message is kept)
        """
        if service not in UNARY_SERVICES:
            raise InvalidArgumentError(
                f"etcd service {service!r} is not one of {sorted(UNARY_SERVICES)}"
            )
        size = request.ByteSize()
        if size + RAFT_OVERHEAD_BYTES > self.max_request_bytes:
            raise InvalidValueError(
                f"etcd {service}.{method} request is {size} bytes; the server limit is"
                f" {self.max_request_bytes} bytes (--max-request-bytes, less"
                f" {RAFT_OVERHEAD_BYTES} bytes of overhead): store smaller values"
            )
        return self._send(service, method, request, timeout)

    def _send(self, service: str, method: str, request: Any, timeout: float | None) -> Any:
        """:meth:`call` without the argument and size checks (the caller did them)."""
        md = self._metadata
        if md is None and self._password is not None and not self._auth_disabled:
            md = self._token_metadata(timeout)
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
        conn = self._connection()
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
                if code is grpc.StatusCode.UNAVAILABLE:
                    if _is_conditional(service, method, request) and not _never_sent(details):
                        # The request may have been applied ("request timed out, possibly
                        # due to previous leader failure"): re-sending a CAS would apply
                        # it twice (an add counted twice), so the caller must re-read.
                        raise UnavailableError(
                            f"etcd {service}.{method} failed on {conn.endpoint} ({details});"
                            " it may or may not have been applied: read the current state"
                            " before retrying"
                        ) from None
                    unavailable = exc
                    tried += 1
                    if tried % len(self._endpoints) == 0:
                        # Every endpoint failed once: give restarts a moment.
                        time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                        backoff = min(backoff * 2, 1.0)
                    conn = self._failover(conn)
                    continue
                if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    if several:
                        # The member may be hung: later calls go to the next one.
                        conn = self._failover(conn)
                        if attempt_cap is not None:
                            continue
                    error = self._deadline_error(service, method, total, unavailable)
                    error.code, error.details = code.name, details
                    raise error from None
                if may_relogin and self._password is not None and _is_token_error(code, details):
                    md = self._relogin(md, max(deadline - time.monotonic(), 0.001))
                    may_relogin = False
                    continue
                if md is None and not may_relogin and _AUTH_DISABLED in details:
                    raise _AuthDisabled() from None
                if self._closed and code is grpc.StatusCode.CANCELLED:
                    # close() in another thread cancelled this call ("Channel closed!").
                    raise StoreClosedError("the etcd client was closed during a call") from None
                error = self._map_error(service, method, code, details, conn, _quota_name(exc))
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
        self,
        service: str,
        method: str,
        code: grpc.StatusCode,
        details: str,
        conn: _Connection,
        quota: str | None = None,
    ) -> KVStoreError:
        where = f"etcd {service}.{method} at {conn.endpoint}"
        if quota is not None and code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            # An etha gateway's per-tenant quota: the message says which and what to do.
            return QuotaExceededError(f"{where}: {details}", quota=quota)
        if _NO_SPACE in details:
            return QuotaExceededError(
                f"{where}: etcd is full ({details}): its database reached --quota-backend-bytes;"
                " the etcd operator must compact, defragment and disarm the NOSPACE alarm"
                " (or raise the quota) before writes succeed again",
                quota="etcd_space",
            )
        if code is grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
            who = f"user {self.username!r}" if self.username else "this client"
            return PermissionDeniedError(
                f"{where}: permission denied for {who} ({details}); ask for a role that"
                " grants this key range"
            )
        if "authentication failed" in details or code is grpc.StatusCode.UNAUTHENTICATED:
            return PermissionDeniedError(
                f"{where}: authentication failed for user {self.username!r} ({details});"
                " check the username and password (ETHA_KV_USERNAME/ETHA_KV_PASSWORD)"
            )
        if any(t in details for t in _TOO_LARGE):
            return InvalidValueError(
                f"{where}: the server refused the request as too large ({details});"
                " store smaller values"
            )
        return KVStoreError(f"{where} failed: {code.name}: {details}")

    # -- convenience wrappers --------------------------------------------------------------

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        keys_only: bool = False,
        count_only: bool = False,
        limit: int = 0,
        revision: int = 0,
        serializable: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """``KV.Range``: one key, or ``[key, range_end)``; returns the RangeResponse."""
        # Only the fields that differ from the defaults: this is the hot path of get().
        request = etcdrpc.RangeRequest(key=key)
        if range_end:
            request.range_end = range_end
        if keys_only:
            request.keys_only = True
        if count_only:
            request.count_only = True
        if limit:
            request.limit = limit
        if revision:
            request.revision = revision
        if serializable:
            request.serializable = True
        self._check_key_size(key, range_end)
        return self._send("KV", "Range", request, timeout)

    def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> Any:
        """``KV.Put``; returns the PutResponse.

        :raises InvalidValueError: key and value exceed ``max_request_bytes`` (not sent)
        """
        # Protobuf framing of key and value is at most 2 x (1 tag + 5 length) bytes.
        if len(key) + len(value) + 12 + RAFT_OVERHEAD_BYTES > self.max_request_bytes:
            raise InvalidValueError(
                f"etcd put of {len(value)} bytes to {key[:80]!r} exceeds the server limit of"
                f" {self.max_request_bytes} bytes (--max-request-bytes, less"
                f" {RAFT_OVERHEAD_BYTES} bytes of overhead): store smaller values"
            )
        return self._send("KV", "Put", etcdrpc.PutRequest(key=key, value=value), timeout)

    def delete_range(
        self, key: bytes, range_end: bytes | None = None, *, timeout: float | None = None
    ) -> int:
        """``KV.DeleteRange``; returns the number of keys deleted."""
        request = etcdrpc.DeleteRangeRequest(key=key)
        if range_end:
            request.range_end = range_end
        self._check_key_size(key, range_end)
        return int(self._send("KV", "DeleteRange", request, timeout).deleted)

    def _check_key_size(self, key: bytes, range_end: bytes | None) -> None:
        if len(key) + len(range_end or b"") + 32 + RAFT_OVERHEAD_BYTES > self.max_request_bytes:
            raise InvalidValueError(
                f"etcd request for key {key[:80]!r}... exceeds the server limit of"
                f" {self.max_request_bytes} bytes: use shorter keys"
            )

    def txn(self, request: Any, *, timeout: float | None = None) -> Any:
        """``KV.Txn`` (at most 128 operations by default); returns the TxnResponse."""
        return self.call("KV", "Txn", request, timeout=timeout)


class _AuthDisabled(Exception):
    """Authenticate was refused because the server has auth disabled."""


def _quota_name(exc: grpc.RpcError) -> str | None:
    """The ``etha-quota`` trailing metadata of a gateway's quota refusal, if any."""
    trailing = getattr(exc, "trailing_metadata", None)
    try:
        metadata = trailing() if trailing is not None else None
    except Exception:  # a failed call without a server answer has none
        return None
    for key, value in metadata or ():
        if key == QUOTA_METADATA_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _is_token_error(code: grpc.StatusCode, details: str) -> bool:
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return "authentication failed" not in details
    return any(t in details for t in _TOKEN_ERRORS)


__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "QUOTA_METADATA_KEY", "EtcdClient", "prefix_range_end"]
