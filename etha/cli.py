"""``etha``: inspect and diagnose a job's key namespace from any pod the operator injected.

Reads the same ``ETHA_KV_*`` variables as :func:`etha.kvstore.from_env`, so
``kubectl exec <pod> -- etha doctor`` checks exactly what the workers use::

    etha doctor                       # environment, endpoint, TLS, log-in, write/read/delete
    etha ls ['default/rank:*']        # keys as {component}/{key}
    etha get default/model/config
    etha put default/flag 1           # or `-` to read the value from stdin
    etha rm default/flag
    etha watch 'default/*'            # PUT/DELETE events as they happen
    etha barrier 'default/rank:*/ready' 8 [--value 1] [--watch --timeout 60]

Keys are named in the ``{component}/{key}`` view of the namespace (the part of the
stored key after ``{namespace}/``). ``--json`` makes every command print JSON for scripts.

Exit status: 0 success; 1 the operation failed, the key does not exist, the barrier is
incomplete, or a ``doctor`` check failed; 2 bad usage or a bad ``ETHA_KV_*`` environment.
Expected failures print one line on stderr, never a traceback. Only the etcd backend
supports ``ls``, ``watch`` and ``barrier``; ``get``/``put``/``rm`` and ``doctor`` also work
with TCPStore.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import re
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

from etha.kvstore import keys as _keys
from etha.kvstore.config import (
    ENDPOINTS,
    NAMESPACE,
    PASSWORD,
    USERNAME,
    EtcdConfig,
    StoreConfig,
    TCPStoreConfig,
    parse_env,
)
from etha.kvstore.errors import (
    ConfigurationError,
    InvalidArgumentError,
    KVStoreError,
    KVTimeoutError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)

PROG = "etha"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Segment under which ``etha doctor`` writes (and deletes) its probe key.
PROBE_SEGMENT = ".etha-doctor"
#: Upper bound of the TCP and TLS probes of one endpoint.
PROBE_TIMEOUT = 5.0
DEFAULT_WAIT = 300.0
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS = 0x04


class CliError(Exception):
    """An expected failure: printed as one line on stderr, exit status ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


# -- output --------------------------------------------------------------------------------


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _value_json(value: bytes) -> dict[str, Any]:
    try:
        return {"value": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode("ascii")}


def _show(value: bytes, limit: int = 60) -> str:
    try:
        text = repr(value.decode("utf-8"))
    except UnicodeDecodeError:
        text = f"<{len(value)} bytes of binary data>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the namespace view --------------------------------------------------------------------


def split_key(view_key: str) -> tuple[str, str]:
    """``"component/key"`` -> (component, key), both validated.

    :raises CliError: (usage) the key is not in the ``{component}/{key}`` form
    """
    component, sep, key = view_key.partition("/")
    if not sep:
        raise CliError(
            f"KEY {view_key!r} must be '<component>/<key>' (as `etha ls` prints it),"
            " e.g. default/rank:0/ready",
            EXIT_USAGE,
        )
    try:
        return _keys.validate_name(component, "component"), _keys.validate_key(key)
    except InvalidArgumentError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def check_view_pattern(pattern: str) -> str:
    """A pattern over ``{component}/{key}`` (``*`` matches anything, ``/`` included)."""
    try:
        return _keys.validate_pattern(pattern)
    except InvalidArgumentError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@dataclass
class Session:
    """An open etcd client on the environment's namespace."""

    config: EtcdConfig
    client: Any  # etha.kvstore.etcd_client.EtcdClient (imported lazily: grpc is heavy)

    @property
    def prefix(self) -> bytes:
        return _keys.namespace_prefix(self.config.namespace).encode()

    def full(self, view_key: str) -> bytes:
        return self.prefix + view_key.encode()

    def view(self, full_key: bytes) -> str:
        return full_key[len(self.prefix) :].decode("utf-8", "replace")

    def pattern_range(self, pattern: str) -> tuple[bytes, bytes]:
        """The key range every match of ``pattern`` lies in (its literal prefix)."""
        from etha.kvstore.etcd_client import prefix_range_end

        start = self.full(_keys.literal_prefix(pattern))
        return start, prefix_range_end(start)


def load_config() -> StoreConfig:
    try:
        return parse_env()
    except ConfigurationError as exc:
        raise CliError(f"{exc} (see docs/configuration.md)", EXIT_USAGE) from None


@contextmanager
def etcd_session(command: str) -> Iterator[Session]:
    config = load_config()
    if not isinstance(config, EtcdConfig):
        raise CliError(
            f"`etha {command}` needs the etcd backend; ETHA_KV_BACKEND is tcpstore, which"
            " cannot list or watch keys",
            EXIT_USAGE,
        )
    from etha.kvstore.etcd_client import EtcdClient

    client = EtcdClient.from_config(config)
    try:
        yield Session(config, client)
    finally:
        client.close()


def _hint(exc: KVStoreError) -> str:
    if isinstance(exc, (PermissionDeniedError, UnavailableError, QuotaExceededError)):
        return f"{exc} (`etha doctor` diagnoses the environment)"
    return str(exc)


# -- get / put / rm --------------------------------------------------------------------------


def cmd_get(args: argparse.Namespace) -> int:
    component, key = split_key(args.key)
    config = load_config()
    from etha.kvstore import open_store

    with open_store(config) as store:
        value = store.get_bytes(key, component=component)
    if value is None:
        if args.json:
            _emit_json({"key": args.key, "exists": False})
        raise CliError(f"key {args.key!r} does not exist in namespace {config.namespace!r}")
    if args.json:
        _emit_json({"key": args.key, "exists": True, **_value_json(value)})
        return EXIT_OK
    sys.stdout.buffer.write(value)
    if sys.stdout.isatty() and not value.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_put(args: argparse.Namespace) -> int:
    component, key = split_key(args.key)
    value: bytes = sys.stdin.buffer.read() if args.value == "-" else args.value.encode("utf-8")
    config = load_config()
    from etha.kvstore import open_store

    store = open_store(config)
    try:
        store.set_bytes(key, value, component=component)
    finally:
        store.close(cleanup=False)  # the key outlives this command
    if args.json:
        _emit_json({"key": args.key, "bytes": len(value)})
    else:
        _say(f"put {args.key} ({len(value)} bytes)")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    component, key = split_key(args.key)
    config = load_config()
    from etha.kvstore import open_store

    with open_store(config) as store:
        existed = store.delete(key, component=component)
    if args.json:
        _emit_json({"key": args.key, "deleted": existed})
    if not existed:
        raise CliError(f"key {args.key!r} does not exist in namespace {config.namespace!r}")
    if not args.json:
        _say(f"deleted {args.key}")
    return EXIT_OK


# -- ls / watch --------------------------------------------------------------------------------


def _matcher(pattern: str | None) -> Callable[[str], bool]:
    if pattern is None:
        return lambda _: True
    regex = _keys.compile_pattern(pattern)
    return lambda view_key: regex.fullmatch(view_key) is not None


def cmd_ls(args: argparse.Namespace) -> int:
    pattern = check_view_pattern(args.pattern) if args.pattern else None
    matches = _matcher(pattern)
    with etcd_session("ls") as session:
        start, end = session.pattern_range(pattern or "")
        response = session.client.range(start, end)
        rows = []
        for kv in response.kvs:
            view_key = session.view(kv.key)
            if matches(view_key):
                rows.append((view_key, len(kv.value), int(kv.mod_revision)))
    if args.json:
        _emit_json([{"key": k, "bytes": n, "mod_revision": r} for k, n, r in rows])
    else:
        for view_key, size, revision in rows:
            _say(f"{view_key}\t{size}\t{revision}" if args.long else view_key)
    return EXIT_OK


def _watch_batches(watcher: Any, timeout: float, done: Callable[[], bool]) -> Iterator[Any]:
    """The watch's event batches until ``done()``, ``timeout`` seconds pass or the stream
    ends (the caller cancels the watch)."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        events = watcher.get(remaining)
        if events is None:
            return
        yield events


def cmd_watch(args: argparse.Namespace) -> int:
    pattern = check_view_pattern(args.pattern)
    matches = _matcher(pattern)
    from etha.kvstore.etcd_watch import PUT

    seen = 0
    with etcd_session("watch") as session:
        start, end = session.pattern_range(pattern)
        revision = int(session.client.range(start, end, count_only=True).header.revision)
        watcher = session.client.watch_hub.watch(start, end, revision + 1)
        # On stderr, so that scripts can wait for it and stdout stays the event stream.
        print(
            f"{PROG}: watching {pattern!r} in namespace {session.config.namespace!r}"
            f" from revision {revision + 1}",
            file=sys.stderr,
            flush=True,
        )

        def done() -> bool:
            return args.count is not None and seen >= args.count

        try:
            for events in _watch_batches(watcher, args.timeout, done):
                for event in events:
                    view_key = session.view(event.kv.key)
                    if not matches(view_key):
                        continue
                    kind = "PUT" if event.type == PUT else "DELETE"
                    value = event.kv.value if event.type == PUT else None
                    if args.json:
                        row: dict[str, Any] = {
                            "type": kind,
                            "key": view_key,
                            "mod_revision": int(event.kv.mod_revision),
                        }
                        if value is not None:
                            row.update(_value_json(value))
                        _emit_json(row)
                    else:
                        _say(f"{kind} {view_key}" + ("" if value is None else f" {_show(value)}"))
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        break
        finally:
            watcher.cancel()
    return EXIT_OK


# -- barrier -------------------------------------------------------------------------------------


@dataclass
class BarrierState:
    """Which of ``expected`` keys matching ``pattern`` hold ``want``.

    With exactly one ``*`` the expected keys are the pattern with ``*`` replaced by the
    ranks ``0 .. expected-1``; any other match is "unexpected". Without a ``*`` the one
    expected key is the pattern itself; with several, only counts are known.
    """

    pattern: str
    expected: int
    want: bytes
    values: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = self.pattern.split("*")
        self._ranked = len(parts) == 2
        if self._ranked:
            rank = r"(0|[1-9][0-9]*)"
            self._rank_re: re.Pattern[str] | None = re.compile(
                re.escape(parts[0]) + rank + re.escape(parts[1])
            )
        else:
            self._rank_re = None
        self._match = _matcher(self.pattern)

    def apply(self, view_key: str, value: bytes | None) -> bool:
        """Record a key's value (None: deleted); True if the key concerns this barrier."""
        if not self._match(view_key):
            return False
        if value is None:
            self.values.pop(view_key, None)
        else:
            self.values[view_key] = value
        return True

    def _rank_of(self, view_key: str) -> int | None:
        if self._rank_re is None:
            return None
        found = self._rank_re.fullmatch(view_key)
        if found is None:
            return None
        rank = int(found.group(1))
        return rank if rank < self.expected else None

    def complete(self) -> bool:
        """True once the barrier holds (``summary()["complete"]``)."""
        return bool(self.summary()["complete"])

    def summary(self) -> dict[str, Any]:
        present: list[Any] = []
        other: dict[str, Any] = {}
        unexpected: list[str] = []
        for view_key, value in sorted(self.values.items()):
            if self._ranked:
                rank = self._rank_of(view_key)
                if rank is None:
                    unexpected.append(view_key)
                    continue
                label: Any = rank
            else:
                label = view_key
            if value == self.want:
                present.append(label)
            else:
                other[str(label)] = _value_json(value)
        if self._ranked:
            present.sort()
            known = set(present) | {int(r) for r in other}
            missing: list[Any] = [r for r in range(self.expected) if r not in known]
            complete = len(present) == self.expected
        elif "*" not in self.pattern:
            missing = [] if (present or other) else [self.pattern]
            complete = bool(present)
        else:
            missing = []
            complete = len(present) >= self.expected
        return {
            "pattern": self.pattern,
            "expected": self.expected,
            "value": _value_json(self.want),
            "present": present,
            "missing": missing,
            "missing_count": max(0, self.expected - len(present)),
            "other": other,
            "unexpected": unexpected,
            "complete": complete,
        }

    def describe(self) -> str:
        s = self.summary()
        noun = "ranks" if self._ranked else "keys"

        def items(values: Sequence[Any]) -> str:
            return " ".join(str(v) for v in values) if values else "-"

        lines = [
            f"barrier {self.pattern}: {len(s['present'])} of {self.expected} present"
            f" (value {_show(self.want)})" + (" - complete" if s["complete"] else ""),
            f"present {noun}: {items(s['present'])}",
            f"missing {noun}: {items(s['missing'])}"
            if self._ranked or "*" not in self.pattern
            else f"missing: {s['missing_count']} (unnamed: the pattern has several '*')",
        ]
        if s["other"]:
            shown = ", ".join(
                f"{label}={_show(v['value'].encode()) if 'value' in v else '<binary>'}"
                for label, v in s["other"].items()
            )
            lines.append(f"other value: {shown}")
        if s["unexpected"]:
            lines.append(f"unexpected keys: {items(s['unexpected'])}")
        return "\n".join(lines)


def cmd_barrier(args: argparse.Namespace) -> int:
    pattern = check_view_pattern(args.pattern)
    if args.count < 1:
        raise CliError(f"N must be at least 1, got {args.count}", EXIT_USAGE)
    if "*" not in pattern and args.count != 1:
        raise CliError(
            f"pattern {pattern!r} has no '*', so it names one key: N must be 1", EXIT_USAGE
        )
    state = BarrierState(pattern, args.count, args.value.encode("utf-8"))
    from etha.kvstore.etcd_watch import PUT

    with etcd_session("barrier") as session:
        start, end = session.pattern_range(pattern)
        response = session.client.range(start, end)
        for kv in response.kvs:
            state.apply(session.view(kv.key), kv.value)
        if args.watch and not state.complete():
            revision = int(response.header.revision)
            watcher = session.client.watch_hub.watch(start, end, revision + 1)
            if not args.json:
                _say(state.describe())
            try:
                for events in _watch_batches(watcher, args.timeout, state.complete):
                    changed = False
                    for event in events:
                        value = event.kv.value if event.type == PUT else None
                        changed |= state.apply(session.view(event.kv.key), value)
                    if changed and not args.json:
                        s = state.summary()
                        _say(
                            f"{len(s['present'])} of {state.expected} present;"
                            f" missing: {' '.join(str(m) for m in s['missing']) or '-'}"
                        )
            finally:
                watcher.cancel()
    summary = state.summary()
    if args.json:
        _emit_json(summary)
    else:
        _say(state.describe())
    if summary["complete"]:
        return EXIT_OK
    if args.watch:
        raise CliError(f"barrier {pattern!r} incomplete after {args.timeout:g}s")
    return EXIT_FAILED


# -- doctor ------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    problem: str | None = None  # machine label of a failure, e.g. "unreachable"
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "problem": self.problem,
            "fix": self.fix,
        }


class Doctor:
    """Runs the checks in order; stops at the first failure that makes later ones moot."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = environ
        self.checks: list[Check] = []

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, name: str, detail: str, problem: str, fix: str) -> None:
        self.checks.append(Check(name, False, detail, problem, fix))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def run(self) -> None:
        try:
            config = parse_env(self.environ)
        except ConfigurationError as exc:
            self.fail(
                "environment",
                str(exc),
                "environment",
                "set the ETHA_KV_* variables from the KVNamespace's Secret (pods labelled"
                " etha.io/kvnamespace=<name> get them injected); docs/configuration.md"
                " lists them",
            )
            return
        if isinstance(config, TCPStoreConfig):
            self.ok(
                "environment",
                f"tcpstore backend, namespace {config.namespace!r}, server"
                f" {config.host}:{config.port}",
            )
            if self._tcp(config.host, config.port, min(config.timeout, PROBE_TIMEOUT)):
                self._tcpstore(config)
            return
        auth = f"user {config.username!r}" if config.username else "no user (auth off)"
        self.ok(
            "environment",
            f"etcd backend, namespace {config.namespace!r}, component {config.component!r},"
            f" {len(config.endpoints)} endpoint(s), TLS {'on' if config.tls else 'off'}, {auth}",
        )
        reachable = [ep for ep in config.endpoints if self._endpoint(config, ep.host, ep.port)]
        if not reachable:
            return
        self._store(config)

    # -- network probes --

    def _tcp(self, host: str, port: int, timeout: float) -> bool:
        name = f"endpoint {host}:{port}"
        began = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except socket.gaierror as exc:
            self.fail(
                name,
                f"cannot resolve {host!r} ({exc.strerror})",
                "unreachable",
                f"check the host name in {ENDPOINTS} (the Service name and namespace)",
            )
            return False
        except TimeoutError:
            self.fail(
                name,
                f"no answer to a TCP connect within {timeout:g}s",
                "unreachable",
                "a firewall or NetworkPolicy drops the traffic, or the host is down:"
                " allow egress from this pod to the endpoint",
            )
            return False
        except OSError as exc:
            self.fail(
                name,
                f"TCP connect failed ({exc.strerror or exc})",
                "unreachable",
                f"nothing listens on {host}:{port}: check that etcd (or the etha gateway) is"
                f" running and that {ENDPOINTS} names its client port",
            )
            return False
        elapsed = (time.perf_counter() - began) * 1000
        self.ok(name, f"TCP connect in {elapsed:.1f} ms")
        return True

    def _endpoint(self, config: EtcdConfig, host: str, port: int) -> bool:
        timeout = min(config.timeout, PROBE_TIMEOUT)
        if not self._tcp(host, port, timeout):
            return False
        name = f"endpoint {host}:{port} TLS"
        if config.tls:
            try:
                version = _tls_handshake(host, port, timeout, config, verify=True)
            except ssl.SSLCertVerificationError as exc:
                self.fail(
                    name,
                    f"the server's certificate is not trusted: {exc.verify_message}",
                    "tls_untrusted",
                    "set ETHA_KV_CA_FILE or ETHA_KV_CA_PEM to the CA that signed the"
                    " server certificate, and name the endpoint as the certificate does",
                )
                return False
            except (ssl.SSLError, OSError) as exc:
                if _speaks_plain_http2(host, port, timeout):
                    self.fail(
                        name,
                        "TLS is configured but the endpoint speaks plaintext gRPC",
                        "tls_mismatch",
                        f"use http:// in {ENDPOINTS} and unset the ETHA_KV_CA_* /"
                        " ETHA_KV_CERT_FILE / ETHA_KV_KEY_FILE variables, or enable TLS"
                        " on the server",
                    )
                else:
                    self.fail(
                        name,
                        f"TLS handshake failed ({type(exc).__name__}: {exc})",
                        "tls_mismatch",
                        "check that the endpoint serves TLS and accepts this client's"
                        " certificate (ETHA_KV_CERT_FILE / ETHA_KV_KEY_FILE)",
                    )
                return False
            self.ok(name, f"{version} handshake, server certificate verified")
            return True
        if _speaks_plain_http2(host, port, timeout):
            self.ok(name, "TLS off; the endpoint speaks plaintext HTTP/2 (gRPC)")
            return True
        try:
            _tls_handshake(host, port, timeout, config, verify=False)
        except (ssl.SSLError, OSError):
            self.fail(
                name,
                "the endpoint accepts TCP but speaks neither plaintext gRPC nor TLS",
                "unreachable",
                f"{ENDPOINTS} must name the client port of etcd or of the etha gateway",
            )
            return False
        self.fail(
            name,
            "the endpoint requires TLS but the environment configures plaintext",
            "tls_mismatch",
            f"use https:// in {ENDPOINTS} and set ETHA_KV_CA_FILE or ETHA_KV_CA_PEM to"
            " the server's CA",
        )
        return False

    # -- the store itself --

    def _tcpstore(self, config: TCPStoreConfig) -> None:
        """Write, read and delete a probe key as a client (never as the server: a rank-0
        pod's environment says is_server, and the real server already holds the port)."""
        from etha.kvstore import open_store

        view = f"{config.component}/{PROBE_SEGMENT}/{secrets.token_hex(6)}"
        key = view.partition("/")[2]
        value = secrets.token_bytes(16)
        began = time.perf_counter()
        try:
            with open_store(dataclasses.replace(config, is_server=False)) as store:
                store.set_bytes(key, value)
                read = store.get_bytes(key)
                store.delete(key)
        except KVStoreError as exc:
            self._tcpstore_error(exc)
            return
        if read != value:
            self.fail(
                f"probe key {view}",
                "the value read back differs from the value written",
                "inconsistent",
                "another process writes under this key",
            )
            return
        elapsed = (time.perf_counter() - began) * 1000
        self.ok(f"probe key {view}", "write/read/delete on the TCPStore server")
        self.ok("round trip", f"{elapsed:.1f} ms for connect + put + get + delete")

    def _tcpstore_error(self, exc: KVStoreError) -> None:
        if isinstance(exc, (UnavailableError, KVTimeoutError)):
            self.fail(
                "TCPStore",
                str(exc),
                "unreachable",
                "the port accepts TCP but no TCPStore server answers: check that rank 0"
                " (ETHA_KV_TCPSTORE_IS_SERVER=true) runs and that the port is its store",
            )
        else:
            self.fail("TCPStore", str(exc), "error", "see the message above")

    def _store(self, config: EtcdConfig) -> None:
        from pyetcd import etcdrpc

        from etha.kvstore.etcd_client import EtcdClient

        client = EtcdClient.from_config(config)
        try:
            who = repr(config.username) if config.username else "anonymous"
            began = time.perf_counter()
            try:
                status = client.call("Maintenance", "Status", etcdrpc.StatusRequest())
            except PermissionDeniedError as exc:
                self.fail(
                    "log-in",
                    f"etcd refused the log-in of {who}: {exc.details or exc}",
                    "credentials",
                    f"{USERNAME}/{PASSWORD} must be the current ones from the KVNamespace's"
                    " Secret (it is replaced when the password rotates and deleted on"
                    " revocation: restart the pod to pick up the new one)",
                )
                return
            except KVStoreError as exc:
                self._store_error("log-in", exc, config)
                return
            elapsed = (time.perf_counter() - began) * 1000
            self.ok(
                "log-in",
                f"logged in as {who}; server version {status.version or 'unknown'}"
                f" ({elapsed:.1f} ms)",
            )
            self._probe(client, config)
        finally:
            client.close()

    def _probe(self, client: Any, config: EtcdConfig) -> None:
        view = f"{config.component}/{PROBE_SEGMENT}/{secrets.token_hex(6)}"
        key = _keys.full_key(config.namespace, config.component, view.partition("/")[2])
        full = key.encode()
        value = secrets.token_bytes(16)
        name = f"probe key {view}"
        timings: dict[str, float] = {}
        step = "put"
        try:
            began = time.perf_counter()
            client.put(full, value)
            timings["put"] = time.perf_counter() - began
            step = "get"
            began = time.perf_counter()
            kvs = client.range(full).kvs
            timings["get"] = time.perf_counter() - began
            if not kvs or kvs[0].value != value:
                self.fail(
                    name,
                    "the value read back differs from the value written",
                    "inconsistent",
                    "another process writes under this key, or a proxy rewrites values",
                )
                return
            step = "delete"
            began = time.perf_counter()
            client.delete_range(full)
            timings["delete"] = time.perf_counter() - began
        except KVStoreError as exc:
            self._store_error(f"{name} ({step})", exc, config)
            return
        total = sum(timings.values()) * 1000
        parts = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items())
        self.ok(name, f"write/read/delete under {config.namespace + '/'!r}: {parts}")
        self.ok("round trip", f"{total:.1f} ms for put + get + delete")

    def _store_error(self, name: str, exc: KVStoreError, config: EtcdConfig) -> None:
        if isinstance(exc, PermissionDeniedError):
            self.fail(
                name,
                f"refused: the credentials do not grant keys under {config.namespace + '/'!r}",
                "permission_denied",
                f"{NAMESPACE} must be the KVNamespace's status.keyPrefix (the Secret sets it);"
                " a prefix edited by hand is refused",
            )
        elif isinstance(exc, QuotaExceededError):
            fix = (
                "etcd's storage is full: its operator must compact, defragment and disarm"
                " the NOSPACE alarm (or raise --quota-backend-bytes)"
                if exc.quota == "etcd_space"
                else f"the namespace is over its {exc.quota!r} quota: delete keys it no longer"
                " needs, or ask for a larger quota"
            )
            self.fail(name, f"quota {exc.quota!r} exceeded: {exc}", "quota", fix)
        elif isinstance(exc, UnavailableError):
            self.fail(
                name,
                str(exc),
                "unreachable",
                "the endpoint accepts connections but gRPC calls fail: check that it is the"
                " client port of etcd or of the etha gateway, and the TLS settings",
            )
        elif isinstance(exc, KVTimeoutError):
            self.fail(
                name,
                str(exc),
                "timeout",
                "the server is overloaded or hung; raise ETHA_KV_TIMEOUT only if it is merely slow",
            )
        elif exc.code == "INVALID_ARGUMENT" and config.username is None:
            self.fail(
                name,
                f"the server requires a log-in ({exc.details})",
                "credentials",
                f"set {USERNAME} and {PASSWORD} from the KVNamespace's Secret",
            )
        else:
            self.fail(name, str(exc), "error", "see the server's message above")

    # -- report --

    def report(self, as_json: bool) -> int:
        failed = self.failed
        verdict = "OK" if not failed else f"FAILED: {failed[0].problem}"
        if as_json:
            _emit_json(
                {
                    "ok": not failed,
                    "verdict": verdict,
                    "problems": [c.problem for c in failed],
                    "checks": [c.as_json() for c in self.checks],
                }
            )
        else:
            for check in self.checks:
                _say(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
                if check.fix:
                    _say(f"       fix: {check.fix}")
            if failed:
                first = failed[0]
                _say(f"verdict: {first.problem}: {first.detail}")
                _say(f"fix: {first.fix}")
            else:
                _say("verdict: OK")
        return EXIT_OK if not failed else EXIT_FAILED


def _tls_handshake(host: str, port: int, timeout: float, config: EtcdConfig, verify: bool) -> str:
    """A TLS handshake as gRPC would make it; returns the TLS version.

    :raises ssl.SSLCertVerificationError: the certificate is not trusted (``verify``)
    :raises ssl.SSLError: the handshake failed otherwise
    """
    if verify:
        context = ssl.create_default_context(cafile=config.ca_file, cadata=config.ca_pem)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.cert_file and config.key_file:
        context.load_cert_chain(config.cert_file, config.key_file)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.version() or "TLS"


def _speaks_plain_http2(host: str, port: int, timeout: float) -> bool:
    """True if the endpoint answers a plaintext HTTP/2 preface with a SETTINGS frame."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_HTTP2_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[3] == _HTTP2_SETTINGS


def cmd_doctor(args: argparse.Namespace) -> int:
    doctor = Doctor()
    doctor.run()
    return doctor.report(args.json)


# -- entry point ---------------------------------------------------------------------------------


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{raw!r} must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and diagnose the etha key namespace described by ETHA_KV_*.",
        epilog="Keys are '<component>/<key>' within the namespace. Exit status: 0 ok,"
        " 1 failed, 2 usage or environment error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", parents=[common], help="diagnose the environment and store")
    p.set_defaults(run=cmd_doctor)

    p = sub.add_parser("ls", parents=[common], help="list keys (optionally matching PATTERN)")
    p.add_argument("pattern", nargs="?", help="'*' matches any characters, '/' included")
    p.add_argument("-l", "--long", action="store_true", help="also print size and revision")
    p.set_defaults(run=cmd_ls)

    p = sub.add_parser("get", parents=[common], help="print a key's value")
    p.add_argument("key", help="<component>/<key>")
    p.set_defaults(run=cmd_get)

    p = sub.add_parser("put", parents=[common], help="set a key ('-' reads the value from stdin)")
    p.add_argument("key", help="<component>/<key>")
    p.add_argument("value", help="the value, or '-' for stdin")
    p.set_defaults(run=cmd_put)

    p = sub.add_parser("rm", parents=[common], help="delete a key")
    p.add_argument("key", help="<component>/<key>")
    p.set_defaults(run=cmd_rm)

    p = sub.add_parser("watch", parents=[common], help="print changes to keys matching PATTERN")
    p.add_argument("pattern")
    p.add_argument(
        "--timeout", type=_positive_seconds, default=3600.0, help="stop after this many seconds"
    )
    p.add_argument("--count", type=int, default=None, help="stop after this many events")
    p.set_defaults(run=cmd_watch)

    p = sub.add_parser(
        "barrier", parents=[common], help="which of N expected keys are present or missing"
    )
    p.add_argument("pattern", help="e.g. 'default/rank:*/ready' (ranks 0..N-1 replace '*')")
    p.add_argument("count", type=int, metavar="N")
    p.add_argument("--value", default="1", help="the value that counts as present (default 1)")
    p.add_argument("--watch", action="store_true", help="follow until complete or --timeout")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_WAIT,
        help=f"with --watch: give up after this many seconds (default {DEFAULT_WAIT:g})",
    )
    p.set_defaults(run=cmd_barrier)
    return parser


def _fail(message: str, status: int) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``etha`` console script; exits with the command's status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        status = run(args)
    except CliError as exc:
        _fail(str(exc), exc.status)
    except ConfigurationError as exc:
        _fail(str(exc), EXIT_USAGE)
    except InvalidArgumentError as exc:
        _fail(str(exc), EXIT_USAGE)
    except KVStoreError as exc:
        _fail(_hint(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `etha ls | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)
    sys.exit(status)


if __name__ == "__main__":
    main()
