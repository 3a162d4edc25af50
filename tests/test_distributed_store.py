"""EthaStore: the c10d Store contract on real etcd (auth on), checked against a real TCPStore.

Modelled on torch's own store tests (test/distributed/test_store.py): set/get/add,
compare_set, wait with its timeout, num_keys, delete_key, multi_get/multi_set, the
Python-store trampoline check (``torch.distributed._test_python_store``) and calls
through a C++ ``PrefixStore``.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from etha.distributed.store import EthaStore
from etha.kvstore.config import EtcdConfig, parse_endpoints
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.etcd_users import all_keys, read_key
from tests.support.ports import free_port
from tests.support.tenants import gateway_tenant_fixture, namespace_fixture
from tests.support.workers import child_env, procs, tail

pytestmark = pytest.mark.timeout(120)


ns_a = namespace_fixture("store-a")
ns_b = namespace_fixture("store-b")


@pytest.fixture
def store(ns_a: EtcdConfig) -> Iterator[EthaStore]:
    s = EthaStore(ns_a, scope=f"t{uuid.uuid4().hex[:10]}", timeout=timedelta(seconds=1))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["auth", "plain"])
def either_store(request: pytest.FixtureRequest, ns_a: EtcdConfig) -> Iterator[EthaStore]:
    """A store on the etcd with auth (a namespace user) and on the one without auth."""
    if request.param == "auth":
        config = ns_a
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd_plain")
        endpoints, _ = parse_endpoints(",".join(cluster.endpoints))
        config = EtcdConfig(namespace=f"plain-{uuid.uuid4().hex[:8]}", endpoints=endpoints)
    s = EthaStore(config, scope=f"t{uuid.uuid4().hex[:10]}", timeout=timedelta(seconds=5))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def tcpstore() -> Iterator[Any]:
    s = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", free_port(), 1, True, timedelta(seconds=1), wait_for_workers=False
    )
    try:
        yield s
    finally:
        del s


# -- basic contract ----------------------------------------------------------------------


def test_set_get_str_and_bytes(store: EthaStore) -> None:
    store.set("key0", "value0")
    store.set("key1", b"\x00\xffbinary")
    store.set("key2", "")
    assert store.get("key0") == b"value0"
    assert store.get("key1") == b"\x00\xffbinary"
    assert store.get("key2") == b""
    store.set("key0", "overwritten")
    assert store.get("key0") == b"overwritten"


def test_torch_style_keys_with_slashes_and_spaces(store: EthaStore) -> None:
    # c10d writes keys like "default_pg/0//cuda//0"; they must round-trip unchanged.
    keys = ["default_pg/0//cuda//0", "a b", "/leading", "ü-unicode"]
    for i, key in enumerate(keys):
        store.set(key, str(i))
    assert [store.get(k) for k in keys] == [b"0", b"1", b"2", b"3"]
    assert sorted(store.list_keys()) == sorted(keys)


def test_get_blocks_until_another_thread_sets(store: EthaStore) -> None:
    timer = threading.Timer(0.3, store.set, args=("late", "here"))
    timer.start()
    try:
        store.set_timeout(timedelta(seconds=20))
        assert store.get("late") == b"here"
    finally:
        timer.cancel()


def test_get_missing_key_raises_dist_store_error_naming_it(store: EthaStore) -> None:
    store.set("present", "1")
    with pytest.raises(dist.DistStoreError, match=r"wait timeout after 1000ms.*keys: missing"):
        store.get("missing")


def test_wait_with_explicit_timeout_names_only_missing_keys(store: EthaStore) -> None:
    store.set("here", "1")
    with pytest.raises(dist.DistStoreError) as info:
        store.wait(["here", "gone1", "gone2"], timedelta(milliseconds=300))
    message = str(info.value)
    assert "wait timeout after 300ms" in message
    assert "gone1, gone2" in message
    assert "here" not in message.split("keys:")[1].split("(")[0]
    assert isinstance(info.value, RuntimeError)


def test_wait_returns_when_all_keys_appear(store: EthaStore) -> None:
    def writer() -> None:
        for i in range(3):
            time.sleep(0.1)
            store.set(f"w/{i}", "x")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        store.wait(["w/0", "w/1", "w/2"], timedelta(seconds=20))
        assert store.check(["w/0", "w/1", "w/2"])
    finally:
        thread.join()


def test_wait_survives_a_delete_before_the_set(store: EthaStore) -> None:
    # A key that exists, is deleted, then set again: wait must see the final state.
    store.set("flip/a", "1")
    store.delete_key("flip/a")
    timer = threading.Timer(0.2, store.set, args=("flip/a", "2"))
    timer.start()
    try:
        store.wait(["flip/a"], timedelta(seconds=20))
        assert store.get("flip/a") == b"2"
    finally:
        timer.cancel()


def test_set_timeout_changes_get_deadline(store: EthaStore) -> None:
    store.set_timeout(timedelta(milliseconds=200))
    assert store.timeout == timedelta(milliseconds=200)
    with pytest.raises(dist.DistStoreError, match="after 200ms"):
        store.get("never")


def test_check_num_keys_delete_key(store: EthaStore) -> None:
    assert store.num_keys() == 0
    assert not store.check(["a"])
    store.set("a", "1")
    store.set("b", "2")
    assert store.check(["a", "b"])
    assert not store.check(["a", "c"])
    assert store.num_keys() == 2
    assert store.delete_key("a") is True
    assert store.delete_key("a") is False
    assert store.num_keys() == 1
    assert not store.check(["a"])


def test_multi_set_multi_get(store: EthaStore) -> None:
    keys = [f"m/{i}" for i in range(300)]  # more than one 128-op transaction
    store.multi_set(keys, [str(i) for i in range(300)])
    assert store.multi_get(keys) == [str(i).encode() for i in range(300)]
    assert store.multi_get([]) == []
    with pytest.raises(dist.DistStoreError, match="keys: m/missing"):
        store.multi_get(["m/0", "m/missing"])


def test_multi_set_repeated_key_last_value_wins(either_store: EthaStore) -> None:
    # TCPStore, HashStore and FileStore accept a key twice; etcd refuses a Txn that puts
    # one key twice, so the store collapses them.
    either_store.multi_set(["a", "b", "a", "a"], ["1", "2", "3", b"4"])
    assert either_store.multi_get(["a", "b"]) == [b"4", b"2"]
    assert either_store.num_keys() == 2
    keys = [f"r/{i % 150}" for i in range(400)]  # repeats across 128-op batches too
    either_store.multi_set(keys, [str(i) for i in range(400)])
    assert either_store.multi_get(["r/0", "r/99", "r/149"]) == [b"300", b"399", b"299"]


def test_add_semantics(store: EthaStore) -> None:
    assert store.add("counter", 0) == 0
    assert store.check(["counter"])
    assert store.add("counter", 5) == 5
    assert store.add("counter", -7) == -2
    assert store.get("counter") == b"-2"
    store.set("text", "not a number")
    with pytest.raises(dist.DistStoreError, match="integer"):
        store.add("text", 1)
    assert store.get("text") == b"not a number"


@pytest.mark.parametrize("amount", [1.5, "3", None, 2**63, -(2**63) - 1])
def test_add_rejects_what_torch_rejects(store: EthaStore, tcpstore: Any, amount: Any) -> None:
    for s in (tcpstore, store):
        with pytest.raises(TypeError):
            s.add("typed", amount)
    assert not store.check(["typed"])


def test_add_accepts_bool_and_index_like_torch(store: EthaStore, tcpstore: Any) -> None:
    class Index:
        def __index__(self) -> int:
            return 2

    assert [s.add("i", True) for s in (tcpstore, store)] == [1, 1]
    assert [s.add("i", Index()) for s in (tcpstore, store)] == [3, 3]


def test_multi_set_with_mismatched_lengths_raises_dist_store_error(
    store: EthaStore, tcpstore: Any
) -> None:
    for keys, values in ((["x", "y"], ["1"]), (["x"], ["1", "2"])):
        for s in (tcpstore, store):
            with pytest.raises(dist.DistStoreError):
                s.multi_set(keys, values)
    assert not store.check(["x"])


def test_append(store: EthaStore) -> None:
    store.append("log", "a")
    store.append("log", b"b")
    assert store.get("log") == b"ab"


# -- side by side with a real TCPStore ----------------------------------------------------

Op = Callable[[Any], Any]

SEQUENCES: dict[str, list[Op]] = {
    "compare_set missing key, empty expected": [lambda s: s.compare_set("k", "", "v")],
    "compare_set missing key, non-empty expected": [
        lambda s: s.compare_set("k", "x", "v"),
        lambda s: s.check(["k"]),
    ],
    "compare_set match": [
        lambda s: s.set("k", "a"),
        lambda s: s.compare_set("k", "a", "b"),
        lambda s: s.get("k"),
    ],
    "compare_set mismatch": [
        lambda s: s.set("k", "a"),
        lambda s: s.compare_set("k", "zz", "c"),
        lambda s: s.get("k"),
    ],
    "compare_set existing key, empty expected": [
        lambda s: s.set("k", "a"),
        lambda s: s.compare_set("k", "", "d"),
        lambda s: s.get("k"),
    ],
    "compare_set existing empty value, empty expected": [
        lambda s: s.set("k", ""),
        lambda s: s.compare_set("k", "", "e"),
        lambda s: s.get("k"),
    ],
    "add": [
        lambda s: s.add("c", 0),
        lambda s: s.add("c", 3),
        lambda s: s.add("c", -10),
        lambda s: s.get("c"),
    ],
    "check/delete": [
        lambda s: s.set("d", "1"),
        lambda s: s.check(["d"]),
        lambda s: s.delete_key("d"),
        lambda s: s.delete_key("d"),
        lambda s: s.check(["d"]),
    ],
    "multi": [
        lambda s: s.multi_set(["x", "y"], ["1", b"2"]),
        lambda s: s.multi_get(["y", "x"]),
        lambda s: s.check(["x", "y", "z"]),
    ],
    "multi_set repeated key": [
        lambda s: s.multi_set(["x", "y", "x"], ["1", "2", "3"]),
        lambda s: s.multi_get(["x", "y"]),
    ],
    "add wraps like int64": [
        lambda s: s.set("w", str(2**63 - 1)),
        lambda s: s.add("w", 1),
        lambda s: s.get("w"),
        lambda s: s.add("w", -1),
        lambda s: s.add("w", -(2**63)),
        lambda s: s.add("w", -(2**63)),
    ],
    "append": [
        lambda s: s.append("ap", "x"),
        lambda s: s.append("ap", "y"),
        lambda s: s.get("ap"),
    ],
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_same_results_as_tcpstore(name: str, store: EthaStore, tcpstore: Any) -> None:
    ops = SEQUENCES[name]
    expected = [op(tcpstore) for op in ops]
    actual = [op(store) for op in ops]
    assert actual == expected


def test_num_keys_counts_like_tcpstore(store: EthaStore, tcpstore: Any) -> None:
    # TCPStore counts its own internal keys too, so compare the deltas.
    before = tcpstore.num_keys()
    for s in (tcpstore, store):
        s.set("n1", "1")
        s.add("n2", 1)
        s.compare_set("n3", "", "v")
        s.delete_key("n1")
    assert store.num_keys() == tcpstore.num_keys() - before == 2


def test_timeout_error_type_like_tcpstore(store: EthaStore, tcpstore: Any) -> None:
    errors = []
    for s in (tcpstore, store):
        with pytest.raises(dist.DistStoreError) as info:
            s.wait(["nope"], timedelta(milliseconds=200))
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1])
    assert all("nope" in str(e) for e in errors)


# -- through C++ -----------------------------------------------------------------------


def test_python_store_trampoline(store: EthaStore) -> None:
    # Runs set/get/add (and clone) from C++ through torch's PythonStore trampoline.
    dist._test_python_store(store)
    assert store.get("key") == b"6"
    assert store.get("key3") == b"15"


def test_prefix_store_reaches_every_method_from_cpp(store: EthaStore) -> None:
    prefixed = dist.PrefixStore("pfx", store)
    prefixed.set("a", "1")
    assert prefixed.get("a") == b"1"
    assert prefixed.add("n", 4) == 4
    assert prefixed.compare_set("a", "1", "2") == b"2"
    assert prefixed.check(["a", "n"])
    prefixed.wait(["a"], timedelta(seconds=5))
    assert prefixed.multi_get(["a", "n"]) == [b"2", b"4"]
    assert prefixed.num_keys() == 2
    assert prefixed.delete_key("a") is True
    assert sorted(store.list_keys()) == ["pfx/n"]
    with pytest.raises(dist.DistStoreError, match="pfx/missing"):
        prefixed.wait(["missing"], timedelta(milliseconds=200))


def test_a_store_torch_does_not_hold_is_freed_at_once(ns_a: EtcdConfig) -> None:
    s = EthaStore(ns_a, scope="freed", timeout=timedelta(seconds=5))
    s.set("p/k", "v")
    ref, client = weakref.ref(s), s.client
    wrapper = dist.PrefixStore("p", s)
    del s
    assert ref() is not None  # the PrefixStore (C++) still holds it
    assert wrapper.get("k") == b"v"
    del wrapper
    gc.collect()
    assert ref() is None
    assert client.closed


def test_the_cpp_reference_count_is_readable_on_this_torch(store: EthaStore) -> None:
    # Else stores fall back to staying alive while any process group exists: a torch
    # upgrade that changes pybind11's or c10's layout must be noticed here.
    from etha.distributed import store as store_module

    assert store_module._LAYOUT_CHECKED is True
    assert store_module._probe_cpp_refcount(store) == 1
    wrapper = dist.PrefixStore("p", store)
    assert store_module._probe_cpp_refcount(store) == 2
    del wrapper


def test_queue_methods_are_unsupported(store: EthaStore) -> None:
    with pytest.raises(NotImplementedError):
        store.queue_push("q", "x")


# -- keys and namespaces ----------------------------------------------------------------


def test_every_key_is_under_the_namespace_prefix(etcd_auth: EtcdCluster, ns_a: EtcdConfig) -> None:
    s = EthaStore(ns_a, component="c10d", scope="prefix-check")
    s.set("x", "1")
    s.add("y", 1)
    s.compare_set("z", "", "1")
    s.multi_set(["m1", "m2"], ["1", "2"])
    s.append("ap", "1")
    written = [k for k in all_keys(etcd_auth) if "prefix-check" in k]
    assert sorted(written) == sorted(
        f"{ns_a.namespace}/c10d/prefix-check/{k}" for k in ["x", "y", "z", "m1", "m2", "ap"]
    )
    s.close()


def test_namespace_a_credentials_cannot_touch_namespace_b(
    etcd_auth: EtcdCluster, ns_a: EtcdConfig, ns_b: EtcdConfig
) -> None:
    b_store = EthaStore(ns_b, scope="secret")
    b_store.set("token", "b-only")
    # A's user and password, B's namespace.
    intruder = EthaStore(
        EtcdConfig(
            namespace=ns_b.namespace,
            endpoints=ns_a.endpoints,
            username=ns_a.username,
            password=ns_a.password,
        ),
        scope="secret",
        timeout=timedelta(seconds=30),
    )
    started = time.monotonic()
    for action in (
        lambda: intruder.get("token"),
        lambda: intruder.get("not-there"),  # would block on a watch if the read passed
        lambda: intruder.set("token", "stolen"),
        lambda: intruder.add("counter", 1),
        lambda: intruder.compare_set("token", "b-only", "stolen"),
        lambda: intruder.delete_key("token"),
        lambda: intruder.num_keys(),
        lambda: intruder.wait(["token"], timedelta(seconds=30)),
    ):
        with pytest.raises(dist.DistStoreError, match="permission denied"):
            action()
    # Refused at once, not after the 30 s store timeout.
    assert time.monotonic() - started < 20
    assert read_key(etcd_auth, f"{ns_b.namespace}/torch/secret/token") == b"b-only"
    assert read_key(etcd_auth, f"{ns_b.namespace}/torch/secret/counter") is None
    intruder.close()
    b_store.close()


# -- concurrency ---------------------------------------------------------------------------

ADD_WORKER = """
import sys, time
from datetime import timedelta
from etha.distributed.store import EthaStore
scope, n = sys.argv[1], int(sys.argv[2])
store = EthaStore(scope=scope, timeout=timedelta(seconds=60))
store.add("ready", 1)
store.wait(["go"])
for _ in range(n):
    store.add("counter", 1)
print("done", flush=True)
"""

PROCESSES = 8
INCREMENTS = 1000


def test_add_from_8_processes_is_exact(ns_a: EtcdConfig, tmp_path: Path) -> None:
    script = tmp_path / "add_worker.py"
    script.write_text(ADD_WORKER)
    scope = f"add-{uuid.uuid4().hex[:8]}"
    control = EthaStore(ns_a, scope=scope, timeout=timedelta(seconds=60))
    with procs() as p:
        env = child_env(ns_a)
        logs = [tmp_path / f"w{i}.log" for i in range(PROCESSES)]
        workers = [
            p.python(script, [scope, str(INCREMENTS)], env, logs[i]) for i in range(PROCESSES)
        ]
        deadline = time.monotonic() + 60

        def all_ready() -> bool:
            return control.check(["ready"]) and control.get("ready") == str(PROCESSES).encode()

        while not all_ready():
            assert time.monotonic() < deadline, "workers did not start"
            assert all(w.poll() is None for w in workers), tail(logs[0])
            time.sleep(0.1)
        control.set("go", "1")
        codes = p.wait_all(workers, timeout=100)
        assert codes == [0] * PROCESSES, "\n".join(tail(log) for log in logs)
    assert control.get("counter") == str(PROCESSES * INCREMENTS).encode()
    control.close()


# -- etcd unavailable ----------------------------------------------------------------------


def test_etcd_down_surfaces_as_dist_store_error_without_hanging(tmp_path: Path) -> None:
    from etha.kvstore.config import parse_endpoints

    with etcd_cluster(tmp_path / "etcd") as cluster:
        endpoints, _ = parse_endpoints(",".join(cluster.endpoints))
        config = EtcdConfig(namespace="down", endpoints=endpoints, timeout=2.0)
        store = EthaStore(config, timeout=timedelta(seconds=2))
        store.set("k", "v")
        assert store.get("k") == b"v"
        cluster.stop()
        for action in (lambda: store.get("missing"), lambda: store.set("k", "w")):
            started = time.monotonic()
            with pytest.raises(
                (dist.DistStoreError, dist.DistNetworkError), match=r"etcd|wait timeout"
            ):
                action()
            assert time.monotonic() - started < 10
        store.close()


def _read_calls(cluster: EtcdCluster) -> float:
    """Range and Txn requests the server has handled so far (etcd's own /metrics)."""
    import re
    import urllib.request

    url = f"{cluster.urls[0]}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 - http://
    pattern = re.compile(r'^grpc_server_handled_total\{.*grpc_method="(?:Range|Txn)".*\}\s+(\S+)$')
    return sum(float(m.group(1)) for line in text.splitlines() if (m := pattern.match(line)))


def test_wait_is_driven_by_a_watch_not_by_polling(etcd_auth: EtcdCluster, store: EthaStore) -> None:
    store.check(["warm-up"])  # log in first
    start = _read_calls(etcd_auth)
    store.check(["counted"])  # one Range: proves the counter is read correctly
    before = _read_calls(etcd_auth)
    assert before - start == 1
    with pytest.raises(dist.DistStoreError):
        store.wait(["absent-1", "absent-2"], timedelta(seconds=2))
    timer = threading.Timer(0.5, store.set, args=("late-key", "v"))
    timer.start()
    try:
        assert store.get("late-key") == b"v"
    finally:
        timer.cancel()
    # One read per wait (a re-read only after a compaction); a poller would make
    # hundreds in these 2.5 s.
    assert _read_calls(etcd_auth) - before <= 3


@pytest.mark.parametrize(
    ("namespace", "component", "scope"),
    [("a/b", "torch", None), ("..", "torch", None), ("ns", "x/y", None), ("ns", "c", "../up")],
)
def test_prefix_parts_are_validated(
    ns_a: EtcdConfig, namespace: str, component: str, scope: str | None
) -> None:
    import dataclasses

    config = dataclasses.replace(ns_a, namespace=namespace)
    with pytest.raises(ValueError):
        EthaStore(config, component=component, scope=scope)


# -- values larger than one etcd request ------------------------------------------------

MiB = 1024 * 1024


def _pattern(size: int, seed: int) -> bytes:
    """``size`` bytes that differ at every MiB boundary and between seeds."""
    block = bytes((seed * 31 + i) % 251 for i in range(4096))
    data = (block * (size // len(block) + 1))[:size]
    return data


def _raw_keys(cluster: EtcdCluster, store: EthaStore) -> list[str]:
    """Every raw etcd key of the store: its own range and its chunks (read as root)."""
    stem = store.prefix.rstrip("/")
    return [k for k in all_keys(cluster) if k.startswith(stem + "/") or k.startswith(stem + "!")]


@pytest.mark.parametrize("size", [2 * MiB, 16 * MiB], ids=["2MiB", "16MiB"])
def test_large_value_round_trips(either_store: EthaStore, size: int) -> None:
    data = _pattern(size, 1)
    either_store.set("big", data)
    assert either_store.get("big") == data
    assert either_store.multi_get(["big", "big"]) == [data, data]
    either_store.wait(["big"], timedelta(seconds=5))
    assert either_store.check(["big"])
    assert either_store.num_keys() == 1  # the chunks are not keys
    assert either_store.list_keys() == ["big"]


def test_64_mib_value_round_trips(store: EthaStore) -> None:
    data = _pattern(64 * MiB, 2)
    store.set_timeout(timedelta(seconds=60))
    store.set("huge", data)
    assert store.get("huge") == data
    assert store.multi_get(["huge"]) == [data]
    store.wait(["huge"], timedelta(seconds=5))


def test_value_over_the_bound_is_refused_naming_it(store: EthaStore) -> None:
    from etha.distributed.store import MAX_VALUE_BYTES

    with pytest.raises(dist.DistStoreError, match="MAX_VALUE_BYTES"):
        store.set("too-big", b"x" * (MAX_VALUE_BYTES + 1))
    assert not store.check(["too-big"])


def test_large_values_through_multi_set_and_a_blocked_get(store: EthaStore) -> None:
    big, other = _pattern(3 * MiB, 3), _pattern(2 * MiB + 5, 4)
    store.multi_set(["m/big", "m/small", "m/other", "m/big"], [b"first", b"s", other, big])
    assert store.multi_get(["m/big", "m/small", "m/other"]) == [big, b"s", other]
    store.set_timeout(timedelta(seconds=20))
    late = _pattern(2 * MiB, 5)
    timer = threading.Timer(0.3, store.set, args=("late-big", late))
    timer.start()
    try:
        assert store.get("late-big") == late  # woken by the watch, then read whole
    finally:
        timer.cancel()


def test_multi_set_of_values_larger_together_than_one_request(store: EthaStore) -> None:
    # Six 600 KiB values: each fits one request, together they need several.
    keys = [f"mid/{i}" for i in range(6)]
    values = [_pattern(600 * 1024, 20 + i) for i in range(6)]
    store.multi_set(keys, values)
    assert store.multi_get(keys) == values


def test_chunked_value_is_one_value_to_every_method(store: EthaStore) -> None:
    data = _pattern(2 * MiB, 6)
    store.set("v", data)
    assert store.compare_set("v", b"wrong", b"x") == data
    assert store.compare_set("v", data, b"small") == b"small"
    assert store.compare_set("v", b"small", data) == data
    assert store.get("v") == data
    store.append("v", b"tail")
    assert store.get("v") == data + b"tail"
    store.set("n", data)
    with pytest.raises(dist.DistStoreError, match="integer"):
        store.add("n", 1)
    store.append("grow", b"a" * (MiB - 10))
    store.append("grow", b"b" * 100)  # crosses into chunks
    assert store.get("grow") == b"a" * (MiB - 10) + b"b" * 100
    # A small value that looks like the store's chunk marker is stored safely.
    from etha.distributed.store import _CHUNKED_MARK

    store.set("mark", _CHUNKED_MARK + b"not a manifest")
    assert store.get("mark") == _CHUNKED_MARK + b"not a manifest"
    assert store.num_keys() == 4


def test_chunks_go_with_the_value(etcd_auth: EtcdCluster, store: EthaStore) -> None:
    store.set("a", _pattern(3 * MiB, 7))
    first = _raw_keys(etcd_auth, store)
    assert len(first) == 1 + 3  # the key and three 1 MiB chunks
    store.set("a", _pattern(2 * MiB, 8))  # replaced: the old generation goes
    second = _raw_keys(etcd_auth, store)
    assert len(second) == 1 + 2
    chunks = [k for k in first if "!/" in k]
    assert len(chunks) == 3
    assert not set(chunks) & set(second)
    store.set("a", b"small")  # replaced by an inline value: every chunk goes
    assert _raw_keys(etcd_auth, store) == [f"{store.prefix}a"]
    store.set("a", _pattern(2 * MiB, 9))
    assert store.delete_key("a") is True
    assert _raw_keys(etcd_auth, store) == []
    store.set("b", _pattern(2 * MiB, 10))
    store.compare_set("b", _pattern(2 * MiB, 10), b"c")
    assert _raw_keys(etcd_auth, store) == [f"{store.prefix}b"]
    # Every chunk is inside the namespace prefix the operator deletes.
    assert all(k.startswith(f"{store.prefix.split('/')[0]}/") for k in first + second)


def test_reader_never_sees_a_mixed_value_while_a_writer_replaces_it(store: EthaStore) -> None:
    size = 16 * MiB
    versions = [_pattern(size, seed) for seed in range(7)]
    store.set_timeout(timedelta(seconds=60))
    store.set("hot", versions[0])
    done = threading.Event()
    seen: list[int] = []
    bad: list[str] = []

    def reader() -> None:
        while not done.is_set():
            try:
                value = store.get("hot")
            except Exception as exc:  # a torn read may also surface as an error
                bad.append(repr(exc))
                continue
            if value in versions:
                seen.append(versions.index(value))
            else:
                bad.append(f"{len(value)} bytes, starting {value[:8]!r}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in versions[1:]:
            store.set("hot", version)
    finally:
        done.set()
        thread.join(timeout=120)
    assert not bad, bad[:3]
    assert len(seen) >= 2
    assert store.get("hot") == versions[-1]


def test_concurrent_writers_and_a_deleter_leave_one_whole_value_and_no_stray_chunks(
    etcd_auth: EtcdCluster, store: EthaStore
) -> None:
    values = {seed: _pattern(3 * MiB, seed) for seed in (11, 12)}
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            for _ in range(4):
                store.set("contended", values[seed])
        except BaseException as exc:
            errors.append(exc)

    def deleter() -> None:
        try:
            for _ in range(4):
                store.delete_key("contended")
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in values]
    threads.append(threading.Thread(target=deleter))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    # Whatever won, the key is missing or holds one whole value (never a manifest whose
    # chunks another writer deleted).
    if store.check(["contended"]):
        assert store.get("contended") in values.values()
    store.set("contended", values[11])  # a last write after the race
    assert store.get("contended") == values[11]
    raw = _raw_keys(etcd_auth, store)
    assert len([k for k in raw if "!/" in k]) == 3, raw  # exactly the last value's chunks


def test_chunks_read_at_a_compacted_revision_are_read_again(
    etcd_auth: EtcdCluster, store: EthaStore
) -> None:
    from pyetcd import etcdrpc

    from etha.distributed.store import _Stale
    from tests.support.etcd_users import root_client

    old, new = _pattern(2 * MiB, 13), _pattern(2 * MiB, 14)
    store.set("compacted", old)
    full = store.prefix.encode() + b"compacted"
    response = store.client.range(full)
    manifest, revision = bytes(response.kvs[0].value), int(response.header.revision)
    store.set("compacted", new)
    with root_client(etcd_auth) as root:
        current = int(root.range(b"x").header.revision)
        root.call("KV", "Compact", etcdrpc.CompactionRequest(revision=current, physical=True))
    with pytest.raises(_Stale):
        store._resolve(full, manifest, revision)
    assert store.get("compacted") == new


# -- through an etha gateway -----------------------------------------------------------


#: A tenant (no quotas set) behind one real gateway process, as an EtcdConfig.
gateway_config = gateway_tenant_fixture("store-gateway", timeout=30)


def test_chunked_values_through_the_gateway(
    etcd_auth: EtcdCluster, gateway_config: EtcdConfig
) -> None:
    store = EthaStore(gateway_config, scope="big", timeout=timedelta(seconds=30))
    try:
        first, second = _pattern(16 * MiB, 30), _pattern(3 * MiB, 31)
        store.set("v", first)
        assert store.get("v") == first
        store.set("v", second)
        assert store.multi_get(["v"]) == [second]
        assert len(_raw_keys(etcd_auth, store)) == 1 + 3
        assert store.delete_key("v") is True
        assert _raw_keys(etcd_auth, store) == []
    finally:
        store.close()
