"""One conformance suite for every KVStore backend: real etcd and a real TCPStore.

Every test runs against each backend through the same calls and asserts the same
results; the legitimate differences (``candidate_keys``, ``get()`` of ``set_bytes`` data,
cleanup on close) are tested in the backend-specific files. ``wait_for_keys`` always gets
``candidate_keys`` here, because TCPStore requires them and etcd ignores them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ warnings carry stack traces

import contextlib
import math
import multiprocessing
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from etha.kvstore import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidValueError,
    KVStore,
    KVStoreError,
    KVTimeoutError,
    StoreClosedError,
)
from etha.kvstore.etcd_client import EtcdClient
from etha.kvstore.keys import validate_name
from etha.kvstore.tcpstore import TCPStoreKVStore
from tests.support.etcd_server import EtcdCluster
from tests.support.etcd_users import root_client
from tests.support.gateway import GatewayProcess, register_tenant
from tests.support.local_tcpstore import local_tcpstore_server
from tests.support.tenants import root_gateway

pytestmark = pytest.mark.timeout(90)

# "etcd-gateway": etcd behind a real etha gateway process, one tenant per namespace.
BACKENDS = ["etcd", "tcpstore", "etcd-gateway"]
# Upper slack for "a wait ends within its timeout": generous, the machine is noisy.
SLACK = 5.0
REQUEST_TIMEOUT = 30.0


def open_spec(spec: dict[str, Any], namespace: str, component: str = "default") -> KVStore:
    """Open a store from a picklable description (also used in child processes)."""
    if spec["backend"] == "tcpstore":
        return TCPStoreKVStore(
            namespace, component, host=spec["host"], port=spec["port"], timeout=REQUEST_TIMEOUT
        )
    from etha.kvstore.etcd import EtcdKVStore

    return EtcdKVStore(
        namespace,
        component,
        endpoints=spec["endpoints"],
        username=spec.get("username"),
        password=spec.get("password"),
        timeout=REQUEST_TIMEOUT,
    )


@dataclass
class Backend:
    """A backend under test: opens stores on one server, in the test's namespace.

    Behind a gateway every namespace is a tenant of its own: ``register`` provisions one
    (as the operator does) and returns its credentials, and ``spec`` carries those of the
    test's namespace (child processes get the spec).
    """

    name: str
    spec: dict[str, Any]
    namespace: str
    opened: list[KVStore] = field(default_factory=list)
    register: Callable[[str], dict[str, str]] | None = None

    def __post_init__(self) -> None:
        if self.register is not None:
            self.spec = {**self.spec, **self.register(self.namespace)}

    def open(self, component: str = "default", namespace: str | None = None) -> KVStore:
        spec = self.spec
        if self.register is not None and namespace is not None and namespace != self.namespace:
            # An invalid namespace is not registered: the store's own check must refuse it.
            with contextlib.suppress(InvalidKeyError):
                spec = {**spec, **self.register(namespace)}
        store = open_spec(spec, self.namespace if namespace is None else namespace, component)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(scope="module")
def tcpstore_server() -> Iterator[TCPStoreKVStore]:
    """A real TCPStore server in this process on a free port; stopped after the module."""
    with local_tcpstore_server(timeout=60) as server:
        yield server


@pytest.fixture(scope="module")
def conformance_gateway(
    etcd_auth: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, EtcdClient]]:
    """A real gateway in front of the session's etcd, and root's client to provision tenants."""
    with (
        root_client(etcd_auth) as root,
        root_gateway(etcd_auth, tmp_path_factory.mktemp("conformance-gateway")) as gateway,
    ):
        yield gateway, root


def _register(name: str, request: pytest.FixtureRequest) -> Callable[[str], dict[str, str]] | None:
    if name != "etcd-gateway":
        return None
    _, root = request.getfixturevalue("conformance_gateway")

    def register(namespace: str) -> dict[str, str]:
        validate_name(namespace, "namespace")
        username, secret, _ = register_tenant(root, namespace)
        return {"username": username, "password": secret}

    return register


def _spec(name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if name == "etcd-gateway":
        gateway, _ = request.getfixturevalue("conformance_gateway")
        return {"backend": "etcd", "endpoints": [gateway.endpoint]}
    if name == "tcpstore":
        server: TCPStoreKVStore = request.getfixturevalue("tcpstore_server")
        return {"backend": "tcpstore", "host": "127.0.0.1", "port": server.port}
    if name == "etcd":
        cluster = request.getfixturevalue("etcd_plain")
        return {"backend": "etcd", "endpoints": list(cluster.endpoints)}
    if name == "etcd-auth":
        cluster = request.getfixturevalue("etcd_auth")
        return {
            "backend": "etcd",
            "endpoints": list(cluster.endpoints),
            "username": "root",
            "password": cluster.root_password,
        }
    raise AssertionError(name)


def _backend(request: pytest.FixtureRequest, namespace: str) -> Iterator[Backend]:
    """The backend ``request.param`` names; its stores are closed after the test."""
    b = Backend(
        request.param,
        _spec(request.param, request),
        namespace,
        register=_register(request.param, request),
    )
    try:
        yield b
    finally:
        b.close_all()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, namespace: str) -> Iterator[Backend]:
    """Each backend in turn; the stores it opens are closed after the test."""
    yield from _backend(request, namespace)


@pytest.fixture(params=[*BACKENDS, "etcd-auth"])
def backend_with_auth(request: pytest.FixtureRequest, namespace: str) -> Iterator[Backend]:
    """Like ``backend``, plus etcd with auth enabled (root credentials)."""
    yield from _backend(request, namespace)


@pytest.fixture
def store(backend: Backend) -> KVStore:
    return backend.open()


def later(delay: float, action: Callable[[], object]) -> threading.Thread:
    """Run ``action`` in a thread after ``delay`` seconds (the caller joins it)."""

    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def ranks(n: int, suffix: str = "ready") -> list[str]:
    return [f"rank:{i}/{suffix}" for i in range(n)]


# -- plain reads and writes ------------------------------------------------------------------


def test_set_then_get_returns_utf8_bytes(backend_with_auth: Backend) -> None:
    store = backend_with_auth.open()
    store.set("greeting", "hello")
    assert store.get("greeting") == b"hello"
    store.set("greeting", "grüße ✓")
    assert store.get("greeting") == "grüße ✓".encode()
    assert store.exists("greeting") is True


def test_empty_value_is_a_value_not_a_missing_key(store: KVStore) -> None:
    store.set("empty", "")
    assert store.get("empty") == b""
    assert store.exists("empty") is True
    assert store.wait_for_key("empty", timeout=5) == b""


def test_missing_keys(store: KVStore) -> None:
    assert store.get("nope") is None
    assert store.get_bytes("nope") is None
    assert store.exists("nope") is False
    assert store.delete("nope") is False


def test_delete_returns_whether_it_deleted(store: KVStore) -> None:
    store.set("k", "v")
    assert store.delete("k") is True
    assert store.exists("k") is False
    assert store.get("k") is None
    assert store.delete("k") is False


def test_writes_are_seen_by_other_clients(backend: Backend) -> None:
    writer, reader = backend.open(), backend.open()
    for i in range(50):
        writer.set("counter", str(i))
        assert reader.get("counter") == str(i).encode()
    writer.delete("counter")
    assert reader.exists("counter") is False


def test_component_override(backend: Backend) -> None:
    store = backend.open("trainer")
    store.set("k", "in-other", component="other")
    store.set("k", "in-trainer")
    assert store.get("k") == b"in-trainer"
    assert store.get("k", component="other") == b"in-other"
    assert store.exists("k", component="other") is True
    other = backend.open("other")
    assert other.get("k") == b"in-other"
    assert other.get("k", component="trainer") == b"in-trainer"
    store.set_bytes("b", b"\x00\x01", component="other")
    assert other.get_bytes("b") == b"\x00\x01"
    assert store.delete("k", component="other") is True
    assert other.get("k") is None
    assert store.get("k") == b"in-trainer"
    assert store.component == "trainer" and other.component == "other"


def test_namespaces_are_isolated(backend: Backend) -> None:
    mine = backend.open()
    theirs = backend.open(namespace=f"t-{uuid.uuid4().hex[:12]}")
    mine.set("shared-name", "mine")
    assert theirs.get("shared-name") is None
    assert theirs.exists("shared-name") is False
    theirs.set("shared-name", "theirs")
    assert mine.get("shared-name") == b"mine"
    assert theirs.delete("shared-name") is True
    assert mine.get("shared-name") == b"mine"


def test_keys_with_every_allowed_character(store: KVStore) -> None:
    key = "a-Z_0.9:x=y@h+i,j~k%20/rank:3/ready"
    store.set(key, "1")
    assert store.get(key) == b"1"
    assert store.wait_for_keys("a-Z_0.9:x=y@h+i,j~k%20/*", 1, candidate_keys=[key], timeout=5) == [
        key
    ]


# -- binary values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"a\x00b\x00",
        bytes(range(256)),
        bytes(range(255, -1, -1)) * 4,
        b"\xff\xfe not utf-8 \x80",
        os.urandom(64 * 1024),
    ],
    ids=["empty", "nul", "embedded-nul", "all-256", "all-256-reversed", "not-utf8", "random-64k"],
)
def test_binary_values_round_trip(backend: Backend, data: bytes) -> None:
    writer, reader = backend.open(), backend.open()
    writer.set_bytes("blob", data)
    assert reader.get_bytes("blob") == data
    assert reader.exists("blob") is True


def test_set_bytes_accepts_bytearray_and_memoryview(store: KVStore) -> None:
    store.set_bytes("ba", bytearray(b"\x00ab"))
    store.set_bytes("mv", memoryview(b"\x01cd"))
    assert store.get_bytes("ba") == b"\x00ab"
    assert store.get_bytes("mv") == b"\x01cd"


# -- wait_for_key ---------------------------------------------------------------------------------


def test_wait_for_key_already_set(store: KVStore) -> None:
    store.set("early", "v1")
    assert store.wait_for_key("early", timeout=5) == b"v1"
    assert store.wait_for_key("early", timeout=0) == b"v1"


def test_wait_for_key_set_later_by_another_client(backend: Backend) -> None:
    waiter, writer = backend.open(), backend.open()
    assert waiter.exists("late") is False
    thread = later(0.3, lambda: writer.set("late", "arrived"))
    try:
        assert waiter.wait_for_key("late", timeout=30) == b"arrived"
    finally:
        thread.join()


def test_wait_for_key_with_component_override(backend: Backend) -> None:
    waiter, writer = backend.open(), backend.open("other")
    thread = later(0.2, lambda: writer.set("late", "x"))
    try:
        assert waiter.wait_for_key("late", timeout=30, component="other") == b"x"
    finally:
        thread.join()
    assert waiter.get("late") is None


def test_wait_for_key_times_out(store: KVStore) -> None:
    timeout = 0.5
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        store.wait_for_key("never-set", timeout=timeout)
    elapsed = time.monotonic() - start
    assert isinstance(info.value, KVTimeoutError)
    assert "never-set" in str(info.value)
    assert timeout <= elapsed < timeout + SLACK
    with pytest.raises(KVTimeoutError):
        store.wait_for_key("never-set", timeout=0)


def test_wait_for_key_ignores_other_keys_and_components(backend: Backend) -> None:
    waiter, writer = backend.open(), backend.open()
    writer.set("never-set-2", "x", component="elsewhere")
    writer.set("never-set-2x", "x")
    writer.set("never-set-2/child", "x")
    with pytest.raises(KVTimeoutError):
        waiter.wait_for_key("never-set-2", timeout=0.5)


# -- wait_for_value -------------------------------------------------------------------------------


def test_wait_for_value_already_matching(store: KVStore) -> None:
    store.set("state", "ready")
    assert store.wait_for_value("state", "ready", timeout=5) == b"ready"
    assert store.wait_for_value("state", "ready", timeout=0) == b"ready"


def test_wait_for_value_follows_changing_values(backend: Backend) -> None:
    waiter, writer = backend.open(), backend.open()
    writer.set("phase", "a")

    def progress() -> None:
        for value in ("b", "c", "d"):
            time.sleep(0.15)
            writer.set("phase", value)

    thread = later(0.1, progress)
    try:
        assert waiter.wait_for_value("phase", "c", timeout=30) == b"c"
    finally:
        thread.join()
    assert waiter.get("phase") == b"d"


def test_wait_for_value_of_a_key_created_later(backend: Backend) -> None:
    waiter, writer = backend.open(), backend.open()

    def create() -> None:
        writer.set("status", "starting")
        time.sleep(0.1)
        writer.delete("status")
        time.sleep(0.1)
        writer.set("status", "done")

    thread = later(0.2, create)
    try:
        assert waiter.wait_for_value("status", "done", timeout=30) == b"done"
    finally:
        thread.join()


def test_wait_for_value_times_out_on_another_value(store: KVStore) -> None:
    store.set("state", "running")
    timeout = 0.5
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        store.wait_for_value("state", "finished", timeout=timeout)
    elapsed = time.monotonic() - start
    assert isinstance(info.value, KVTimeoutError)
    assert "state" in str(info.value)
    assert timeout <= elapsed < timeout + SLACK
    assert store.get("state") == b"running"


# -- wait_for_keys --------------------------------------------------------------------------------


def test_wait_for_keys_already_complete(store: KVStore) -> None:
    for key in ranks(4):
        store.set(key, "1")
    assert store.wait_for_keys("rank:*/ready", 4, candidate_keys=ranks(4), timeout=5) == ranks(4)
    assert store.wait_for_keys("rank:*/ready", 4, candidate_keys=ranks(4), timeout=0) == ranks(4)


def test_wait_for_keys_completed_later_by_other_clients(backend: Backend) -> None:
    waiter = backend.open()
    writers = [backend.open() for _ in range(4)]

    def arrive() -> None:
        for i, writer in enumerate(writers):
            time.sleep(0.1)
            writer.set(f"rank:{i}/ready", "1")

    thread = later(0.1, arrive)
    try:
        result = waiter.wait_for_keys("rank:*/ready", 4, candidate_keys=ranks(4), timeout=30)
    finally:
        thread.join()
    assert result == ranks(4)


def test_wait_for_keys_returns_every_match_sorted(store: KVStore) -> None:
    keys = ranks(12)
    for key in reversed(keys):
        store.set(key, "1")
    result = store.wait_for_keys("rank:*/ready", 3, candidate_keys=keys, timeout=5)
    assert result == sorted(keys)
    assert result != keys  # sorted as strings: rank:10 before rank:2


def test_star_matches_across_slashes(store: KVStore) -> None:
    keys = ["job/a/ready", "job/b/c/ready", "job/d/e/f/ready"]
    for key in keys:
        store.set(key, "1")
    store.set("job/a/ready/not", "1")
    store.set("job/x/notready", "1")
    candidates = [*keys, "job/g/ready"]
    assert store.wait_for_keys("job/*/ready", 3, candidate_keys=candidates, timeout=5) == keys
    everything = sorted([*keys, "job/a/ready/not", "job/x/notready"])
    assert store.wait_for_keys("job/*", 5, candidate_keys=everything, timeout=5) == everything
    assert store.wait_for_keys("*/ready", 3, candidate_keys=keys, timeout=5) == keys
    assert store.wait_for_keys("job/*/*/ready", 2, candidate_keys=keys[1:], timeout=5) == keys[1:]


def test_wait_for_keys_filters_on_the_value(backend: Backend) -> None:
    waiter, writer = backend.open(), backend.open()
    writer.set("rank:0/ready", "1")
    writer.set("rank:1/ready", "0")
    writer.set("rank:2/ready", "1")
    candidates = ranks(3)
    assert waiter.wait_for_keys("rank:*/ready", 2, candidate_keys=candidates, timeout=5) == [
        "rank:0/ready",
        "rank:2/ready",
    ]
    assert waiter.wait_for_keys(
        "rank:*/ready", 1, value="0", candidate_keys=candidates, timeout=5
    ) == ["rank:1/ready"]
    thread = later(0.3, lambda: writer.set("rank:1/ready", "1"))
    try:
        assert (
            waiter.wait_for_keys("rank:*/ready", 3, candidate_keys=candidates, timeout=30)
            == candidates
        )
    finally:
        thread.join()


def test_wait_for_keys_sees_a_value_change_away(backend: Backend) -> None:
    waiter, writer = backend.open(), backend.open()
    for key in ranks(3, "state"):
        writer.set(key, "done")
    writer.set("rank:1/state", "failed")
    with pytest.raises(KVTimeoutError):
        waiter.wait_for_keys(
            "rank:*/state", 3, value="done", candidate_keys=ranks(3, "state"), timeout=0.5
        )


def test_wait_for_keys_custom_value(store: KVStore) -> None:
    for i, key in enumerate(ranks(3, "phase")):
        store.set(key, "epoch-7" if i != 1 else "epoch-6")
    assert store.wait_for_keys(
        "rank:*/phase", 2, value="epoch-7", candidate_keys=ranks(3, "phase"), timeout=5
    ) == ["rank:0/phase", "rank:2/phase"]


def test_wait_for_keys_ignores_other_components_and_namespaces(backend: Backend) -> None:
    waiter = backend.open()
    other_component = backend.open("other")
    other_namespace = backend.open(namespace=f"t-{uuid.uuid4().hex[:12]}")
    for key in ranks(3):
        other_component.set(key, "1")
        other_namespace.set(key, "1")
    waiter.set("rank:0/ready", "1")
    with pytest.raises(KVTimeoutError):
        waiter.wait_for_keys("rank:*/ready", 2, candidate_keys=ranks(3), timeout=0.5)
    assert other_component.wait_for_keys(
        "rank:*/ready", 3, candidate_keys=ranks(3), timeout=5
    ) == ranks(3)
    assert waiter.wait_for_keys(
        "rank:*/ready", 3, candidate_keys=ranks(3), timeout=5, component="other"
    ) == ranks(3)


def test_wait_for_keys_times_out(store: KVStore) -> None:
    store.set("rank:0/ready", "1")
    timeout = 0.5
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        store.wait_for_keys("rank:*/ready", 2, candidate_keys=ranks(2), timeout=timeout)
    elapsed = time.monotonic() - start
    assert isinstance(info.value, KVTimeoutError)
    assert "rank:*/ready" in str(info.value)
    assert timeout <= elapsed < timeout + SLACK


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_writer_threads_sharing_one_store(store: KVStore) -> None:
    def write(t: int) -> None:
        for i in range(25):
            store.set(f"t{t}/k{i}", f"{t}:{i}")

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t in range(8):
        for i in range(25):
            assert store.get(f"t{t}/k{i}") == f"{t}:{i}".encode()


def test_concurrent_threads_with_their_own_stores_meet_at_a_barrier(backend: Backend) -> None:
    n = 6
    stores = [backend.open() for _ in range(n)]
    results: list[list[str] | BaseException] = [[] for _ in range(n)]

    def worker(rank: int) -> None:
        try:
            store = stores[rank]
            for i in range(10):
                store.set(f"rank:{rank}/item:{i}", str(i))
            store.set(f"rank:{rank}/ready", "1")
            results[rank] = store.wait_for_keys(
                "rank:*/ready", n, candidate_keys=ranks(n), timeout=60
            )
        except BaseException as exc:
            results[rank] = exc

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [ranks(n)] * n
    for rank in range(n):
        for i in range(10):
            assert stores[0].get(f"rank:{rank}/item:{i}") == str(i).encode()


def _barrier_child(
    spec: dict[str, Any],
    namespace: str,
    rank: int,
    world: int,
    start: Any,
    results: Any,
) -> None:
    """One worker process: connect, meet the others twice through the store, report."""
    try:
        store = open_spec(spec, namespace)
        try:
            start.wait(timeout=120)
            store.set(f"rank:{rank}/ready", "1")
            ready = store.wait_for_keys(
                "rank:*/ready", world, candidate_keys=ranks(world), timeout=120
            )
            # Each worker publishes what it saw; then everyone reads everyone's report.
            store.set(f"rank:{rank}/saw", ",".join(ready))
            reports = {
                r: store.wait_for_key(f"rank:{r}/saw", timeout=120).decode() for r in range(world)
            }
            store.set_bytes(f"rank:{rank}/blob", bytes([rank]) * 3 + b"\x00")
            store.set(f"rank:{rank}/done", "1")
            store.wait_for_keys(
                "rank:*/done", world, candidate_keys=ranks(world, "done"), timeout=120
            )
            blobs = [store.get_bytes(f"rank:{r}/blob") for r in range(world)]
            results.put((rank, ready, reports, blobs))
        finally:
            # etcd's cleanup would delete keys that slower workers may still be reading.
            store.close(cleanup=False)
    except BaseException as exc:
        results.put((rank, repr(exc), None, None))


@pytest.mark.timeout(300)
def test_several_processes_meet_at_a_barrier(backend_with_auth: Backend) -> None:
    world = 4
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(world)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_barrier_child,
            args=(backend_with_auth.spec, backend_with_auth.namespace, rank, world, start, results),
        )
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    collected = {}
    try:
        for _ in range(world):
            rank, ready, reports, blobs = results.get(timeout=240)
            collected[rank] = (ready, reports, blobs)
    except queue.Empty:
        pass
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert sorted(collected) == list(range(world)), collected
    everyone = ",".join(ranks(world))
    for rank, (ready, reports, blobs) in collected.items():
        assert ready == ranks(world), (rank, ready)
        assert reports == dict.fromkeys(range(world), everyone)
        assert blobs == [bytes([r]) * 3 + b"\x00" for r in range(world)]
    assert all(proc.exitcode == 0 for proc in procs)


# -- invalid input: both backends reject it identically, before sending --------------------------

BAD_KEYS: list[object] = [
    "",
    "/lead",
    "trail/",
    "dou//ble",
    ".",
    "..",
    "a/../b",
    "a/./b",
    "st*r",
    "sp ace",
    "tab\t",
    "new\nline",
    "nul\x00",
    "ü",
    "x" * 1025,
    b"bytes",
    42,
    None,
]
BAD_NAMES: list[object] = ["", "a/b", "st*r", ".", "..", "sp ace", "x" * 129, 7, None]


def _key_operations(key: Any) -> list[Callable[[KVStore], object]]:
    return [
        lambda s: s.set(key, "v"),
        lambda s: s.set_bytes(key, b"v"),
        lambda s: s.get(key),
        lambda s: s.get_bytes(key),
        lambda s: s.exists(key),
        lambda s: s.delete(key),
        lambda s: s.wait_for_key(key, timeout=1),
        lambda s: s.wait_for_value(key, "v", timeout=1),
    ]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_invalid_keys_are_rejected(store: KVStore, key: object) -> None:
    for operation in _key_operations(key):
        with pytest.raises(InvalidKeyError):
            operation(store)


@pytest.mark.parametrize("component", [n for n in BAD_NAMES if n is not None], ids=repr)
def test_invalid_component_overrides_are_rejected(store: KVStore, component: object) -> None:
    for operation in [
        lambda s: s.set("k", "v", component=component),
        lambda s: s.set_bytes("k", b"v", component=component),
        lambda s: s.get("k", component=component),
        lambda s: s.get_bytes("k", component=component),
        lambda s: s.exists("k", component=component),
        lambda s: s.delete("k", component=component),
        lambda s: s.wait_for_key("k", timeout=1, component=component),
        lambda s: s.wait_for_value("k", "v", timeout=1, component=component),
        lambda s: s.wait_for_keys("k*", 1, candidate_keys=["k"], timeout=1, component=component),
    ]:
        with pytest.raises(InvalidKeyError):
            operation(store)


@pytest.mark.parametrize("name", [n for n in BAD_NAMES if n is not None], ids=repr)
def test_invalid_namespace_or_component_in_the_constructor(backend: Backend, name: Any) -> None:
    with pytest.raises(InvalidKeyError):
        backend.open(namespace=name)
    with pytest.raises(InvalidKeyError):
        backend.open(component=name)


@pytest.mark.parametrize(
    "pattern",
    ["", "/rank:*", "rank:*/", "rank:**//x", "../*", "a/../*", "./*", "sp ace*", "*\n", 5, None],
    ids=repr,
)
def test_invalid_patterns_are_rejected(store: KVStore, pattern: Any) -> None:
    with pytest.raises(InvalidKeyError):
        store.wait_for_keys(pattern, 1, candidate_keys=["rank:0"], timeout=1)


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.set("k", b"bytes"),
        lambda s: s.set("k", 42),
        lambda s: s.set("k", None),
        lambda s: s.set("k", "lone surrogate \ud800"),
        lambda s: s.set_bytes("k", "text"),
        lambda s: s.set_bytes("k", 42),
        lambda s: s.set_bytes("k", None),
        lambda s: s.wait_for_value("k", b"bytes", timeout=1),
        lambda s: s.wait_for_keys("k*", 1, value=1, candidate_keys=["k"], timeout=1),
    ],
    ids=[
        "set-bytes",
        "set-int",
        "set-none",
        "set-surrogate",
        "set_bytes-str",
        "set_bytes-int",
        "set_bytes-none",
        "wait_for_value-bytes",
        "wait_for_keys-int-value",
    ],
)
def test_invalid_values_are_rejected_and_nothing_is_stored(
    store: KVStore, operation: Callable[[KVStore], object]
) -> None:
    with pytest.raises(InvalidValueError):
        operation(store)
    assert store.exists("k") is False


def test_oversized_values_are_rejected_and_the_store_still_works(store: KVStore) -> None:
    huge = 9 * 1024 * 1024  # above both backends' limits (etcd 1.5 MiB, TCPStore 8 MiB)
    with pytest.raises(InvalidValueError):
        store.set("huge", "x" * huge)
    with pytest.raises(InvalidValueError):
        store.set_bytes("huge", b"\x00" * huge)
    assert store.exists("huge") is False
    store.set("small", "ok")
    assert store.get("small") == b"ok"


@pytest.mark.parametrize(
    "timeout", [-1, -0.001, math.nan, math.inf, "5", True, None, [1]], ids=repr
)
def test_invalid_timeouts_are_rejected(store: KVStore, timeout: Any) -> None:
    for operation in [
        lambda s: s.wait_for_key("k", timeout=timeout),
        lambda s: s.wait_for_value("k", "v", timeout=timeout),
        lambda s: s.wait_for_keys("k*", 1, candidate_keys=["k"], timeout=timeout),
    ]:
        with pytest.raises(InvalidArgumentError) as info:
            operation(store)
        assert isinstance(info.value, ValueError)
        assert not isinstance(info.value, InvalidKeyError | InvalidValueError)


@pytest.mark.parametrize("count", [0, -1, True, 2.0, "2", None, 10**7], ids=repr)
def test_invalid_expected_counts_are_rejected(store: KVStore, count: Any) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        store.wait_for_keys("k*", count, candidate_keys=["k1", "k2"], timeout=1)
    assert not isinstance(info.value, InvalidKeyError | InvalidValueError)


# -- lifetime -------------------------------------------------------------------------------------


def _all_operations() -> list[Callable[[KVStore], object]]:
    return [
        lambda s: s.set("k", "v"),
        lambda s: s.set_bytes("k", b"v"),
        lambda s: s.get("k"),
        lambda s: s.get_bytes("k"),
        lambda s: s.exists("k"),
        lambda s: s.delete("k"),
        lambda s: s.wait_for_key("k", timeout=1),
        lambda s: s.wait_for_value("k", "v", timeout=1),
        lambda s: s.wait_for_keys("k*", 1, candidate_keys=["k"], timeout=1),
    ]


def test_a_closed_store_raises_store_closed(backend: Backend) -> None:
    store = backend.open()
    store.set("k", "v")
    store.close()
    store.close()  # idempotent
    store.close(cleanup=False)
    for operation in _all_operations():
        with pytest.raises(StoreClosedError) as info:
            operation(store)
        assert isinstance(info.value, KVStoreError)


def test_the_context_manager_closes_the_store(backend: Backend) -> None:
    with backend.open() as store:
        store.set("k", "v")
        assert store.get("k") == b"v"
    with pytest.raises(StoreClosedError):
        store.get("k")
    other = backend.open()
    other.set("k2", "still works")
    assert other.get("k2") == b"still works"


def test_repr_names_namespace_and_component(backend: Backend) -> None:
    store = backend.open("trainer")
    assert backend.namespace in repr(store)
    assert "trainer" in repr(store)
    assert store.namespace == backend.namespace


def test_both_backends_reject_bad_input_with_the_same_error_and_message(
    request: pytest.FixtureRequest, namespace: str
) -> None:
    stores = {
        name: Backend(name, _spec(name, request), namespace, register=_register(name, request))
        for name in BACKENDS
    }
    bad_calls: list[Callable[[KVStore], object]] = [
        *(_key_operations(key)[i] for key in BAD_KEYS for i in range(8)),
        lambda s: s.get("k", component="a/b"),
        lambda s: s.set("k", b"x"),
        lambda s: s.set("k", "\ud800"),
        lambda s: s.set_bytes("k", "x"),
        lambda s: s.wait_for_key("k", timeout=-1),
        lambda s: s.wait_for_value("k", "v", timeout=math.nan),
        lambda s: s.wait_for_keys("a//*", 1, candidate_keys=["a/b"], timeout=1),
        lambda s: s.wait_for_keys("a/*", 0, candidate_keys=["a/b"], timeout=1),
        lambda s: s.wait_for_keys("a/*", 1, value=b"1", candidate_keys=["a/b"], timeout=1),
    ]
    try:
        opened = {name: b.open() for name, b in stores.items()}
        for call in bad_calls:
            outcomes = {}
            for name, store in opened.items():
                with pytest.raises(KVStoreError) as info:
                    call(store)
                outcomes[name] = (type(info.value), str(info.value))
            assert len(set(outcomes.values())) == 1, outcomes
    finally:
        for b in stores.values():
            b.close_all()
