"""TCPStore-specific behaviour of TCPStoreKVStore, against real TCPStore servers.

The behaviour both backends share is in tests/test_conformance.py; this file covers what
only TCPStore does (base64 storage, candidate_keys, keys kept on close, a dying server,
connection-breaking misuse) and the places where the backends legitimately differ.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ warnings carry stack traces

import base64
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

import etha.kvstore
from etha.kvstore import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidValueError,
    KVTimeoutError,
    StoreClosedError,
    UnavailableError,
)
from etha.kvstore.config import TCPStoreConfig
from etha.kvstore.tcpstore import MAX_BYTES_DATA, MAX_VALUE_BYTES, TCPStoreKVStore
from tests.support.ports import free_port
from tests.support.tcpstore_server import TCPStoreServer
from tests.support.threads import Waiter

pytestmark = pytest.mark.timeout(60)

# Slack for "did not outlast its timeout" checks: generous, this machine is noisy.
SLACK = 5.0


@contextmanager
def flickering(client: TCPStoreKVStore, key: str, value: str) -> Iterator[threading.Thread]:
    """While the body runs, a thread sets ``key`` and deletes it again, over and over.

    Yields that thread; it has stopped and been joined when the block is left.
    """
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            client.set(key, value)
            client.delete(key)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def server() -> Iterator[TCPStoreKVStore]:
    """An in-process TCPStore server on a free port, stopped at the end of the module."""
    srv = TCPStoreKVStore("server", host="127.0.0.1", port=0, is_server=True, timeout=30)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def connect(server: TCPStoreKVStore, namespace: str) -> Iterator[Callable[..., TCPStoreKVStore]]:
    """Open client stores on the module's server; all are closed after the test."""
    opened: list[TCPStoreKVStore] = []

    def make(component: str = "default", *, timeout: float = 30.0) -> TCPStoreKVStore:
        store = TCPStoreKVStore(
            namespace, component, host="127.0.0.1", port=server.port, timeout=timeout
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def raw(server: TCPStoreKVStore) -> Iterator[Any]:
    """A plain torch client of the module's server, to look at what is really stored."""
    store = dist.TCPStore(
        "127.0.0.1",
        server.port,
        None,
        False,
        timeout=timedelta(seconds=30),
        wait_for_workers=False,
    )
    yield store
    del store


class CountingStore:
    """A real torch store that counts the requests made through it (never fakes one)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


# -- storage format ------------------------------------------------------------------------


def test_set_stores_utf8_text_and_set_bytes_stores_base64(
    connect: Callable[..., TCPStoreKVStore], raw: Any, namespace: str
) -> None:
    store = connect()
    store.set("text", "grüße")
    store.set_bytes("blob", b"\x00\xffbin")
    assert raw.get(f"{namespace}/default/text") == "grüße".encode()
    assert raw.get(f"{namespace}/default/blob") == base64.b64encode(b"\x00\xffbin")
    # get() returns what is stored: for set_bytes data that is the base64 text (etcd
    # returns the raw bytes instead; the interface makes this difference).
    assert store.get("blob") == base64.b64encode(b"\x00\xffbin")
    assert store.get_bytes("blob") == b"\x00\xffbin"


def test_get_bytes_of_a_set_value_says_it_was_not_written_with_set_bytes(
    connect: Callable[..., TCPStoreKVStore],
) -> None:
    store = connect()
    store.set("plain", "not base64!")
    with pytest.raises(InvalidValueError, match="set_bytes"):
        store.get_bytes("plain")


def test_get_of_a_missing_key_neither_blocks_nor_creates_it(
    connect: Callable[..., TCPStoreKVStore], raw: Any, namespace: str
) -> None:
    # A 3600 s request timeout: a get() that fell back on TCPStore.get would hang until
    # the test's own timeout kills it.
    store = connect(timeout=3600)
    assert store.get("missing") is None
    assert store.get_bytes("missing") is None
    assert store.exists("missing") is False
    assert raw.check([f"{namespace}/default/missing"]) is False


def test_get_racing_with_deletes_never_blocks(connect: Callable[..., TCPStoreKVStore]) -> None:
    reader, writer = connect(timeout=3600), connect(timeout=3600)
    with flickering(writer, "flicker", "on"):
        seen = {reader.get("flicker") for _ in range(2000)}
    assert seen <= {None, b"on"}


def test_set_is_visible_to_other_clients_when_it_returns(
    connect: Callable[..., TCPStoreKVStore],
) -> None:
    # torch's set() does not wait for the server; the backend must, or another process
    # reading right after a barrier could miss the write.
    writer, reader = connect(), connect()
    for i in range(300):
        writer.set("counter", str(i))
        assert reader.get("counter") == str(i).encode()


# -- size guard and connection-breaking misuse -----------------------------------------------


def test_values_over_the_server_limit_are_refused_and_the_connection_survives(
    connect: Callable[..., TCPStoreKVStore],
) -> None:
    store = connect()
    with pytest.raises(InvalidValueError, match=str(MAX_VALUE_BYTES)):
        store.set("big", "a" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(InvalidValueError):
        store.set_bytes("big", b"\x01" * (MAX_BYTES_DATA + 1))
    assert store.exists("big") is False
    store.set("after", "ok")
    assert store.get("after") == b"ok"


def test_values_at_the_limit_are_stored(connect: Callable[..., TCPStoreKVStore]) -> None:
    # The limit is the server's real one: a value of exactly MAX_VALUE_BYTES goes through.
    store = connect()
    store.set("edge", "b" * MAX_VALUE_BYTES)
    value = store.get("edge")
    assert value is not None and len(value) == MAX_VALUE_BYTES
    data = bytes(range(256)) * (MAX_BYTES_DATA // 256)
    store.set_bytes("edge-bytes", data)
    assert store.get_bytes("edge-bytes") == data


def test_no_request_uses_add_and_waits_poll_all_candidates_at_once(
    server: TCPStoreKVStore, raw: Any, namespace: str
) -> None:
    counting = CountingStore(raw)
    store = TCPStoreKVStore(namespace, store=counting)  # type: ignore[arg-type]
    candidates = [f"rank:{i}/ready" for i in range(16)]
    for key in candidates[:10]:
        store.set(key, "1")

    def calls_of_a_wait_that_times_out(expected: int) -> Counter[str]:
        counting.calls.clear()
        with pytest.raises(KVTimeoutError):
            store.wait_for_keys("rank:*/ready", expected, candidate_keys=candidates, timeout=0.3)
        return counting.calls

    calls = calls_of_a_wait_that_times_out(16)
    assert calls["check"] >= 2
    # one check() per poll for all 16 candidates; nothing per key
    assert set(calls) == {"check"}

    calls = calls_of_a_wait_that_times_out(11)
    assert calls["list_keys"] >= 2
    assert set(calls) == {"list_keys"}

    counting.calls.clear()
    assert store.wait_for_keys("rank:*/ready", 10, candidate_keys=candidates, timeout=5) == sorted(
        candidates[:10]
    )
    assert counting.calls == Counter({"list_keys": 1, "multi_get": 1})

    store.set("n", "x")
    store.get("n")
    store.exists("n")
    store.delete("n")
    assert "add" not in counting.calls
    store.close()


# -- wait_for_keys and candidate_keys -----------------------------------------------------------


def test_wait_for_keys_requires_candidate_keys(connect: Callable[..., TCPStoreKVStore]) -> None:
    store = connect()
    with pytest.raises(InvalidArgumentError, match="candidate_keys"):
        store.wait_for_keys("rank:*", 1, timeout=1)
    with pytest.raises(InvalidArgumentError, match="candidate_keys"):
        store.wait_for_keys("rank:*", 1, timeout=1, candidate_keys="rank:0")  # type: ignore[arg-type]


def test_candidates_must_be_valid_keys_matching_the_pattern(
    connect: Callable[..., TCPStoreKVStore],
) -> None:
    store = connect()
    with pytest.raises(InvalidKeyError, match="does not match"):
        store.wait_for_keys("rank:*/ready", 1, candidate_keys=["rank:0/ready", "other"], timeout=1)
    with pytest.raises(InvalidKeyError):
        store.wait_for_keys("rank:*/ready", 1, candidate_keys=["rank:*/ready"], timeout=1)
    with pytest.raises(InvalidKeyError, match=re.escape("'..' segment")):
        store.wait_for_keys("rank:*/ready", 1, candidate_keys=["rank:0/../ready"], timeout=1)


def test_validated_candidates_are_remembered_per_pattern(
    connect: Callable[..., TCPStoreKVStore],
) -> None:
    # Validated candidate lists are cached (barrier loops repeat them); the cache must
    # never let a list that is valid for one pattern through for another, nor remember
    # a list that failed.
    store = connect()
    candidates = ["rank:0/ready", "rank:1/ready"]
    store.set("rank:0/ready", "1")
    store.set("rank:1/ready", "1")
    for _ in range(2):
        assert store.wait_for_keys("rank:*/ready", 2, candidate_keys=candidates, timeout=5) == (
            candidates
        )
    with pytest.raises(InvalidKeyError, match="does not match"):
        store.wait_for_keys("rank:*/done", 1, candidate_keys=candidates, timeout=1)
    for _ in range(2):
        with pytest.raises(InvalidKeyError, match=re.escape("'..' segment")):
            store.wait_for_keys("rank:*", 1, candidate_keys=["rank:0/../x"], timeout=1)
    with pytest.raises(InvalidKeyError):
        store.wait_for_keys("rank:*", 1, candidate_keys=[["rank:0"]], timeout=1)  # type: ignore[list-item]


def test_an_unreachable_count_fails_at_once(connect: Callable[..., TCPStoreKVStore]) -> None:
    store = connect()
    # duplicates count once: 2 distinct candidates can never give 3 keys
    with pytest.raises(InvalidArgumentError, match="could never be reached"):
        store.wait_for_keys(
            "rank:*", 3, candidate_keys=["rank:0", "rank:1", "rank:1"], timeout=3600
        )
    with pytest.raises(InvalidArgumentError):
        store.wait_for_keys("rank:*", 1, candidate_keys=[], timeout=3600)


def test_only_candidates_are_considered(connect: Callable[..., TCPStoreKVStore]) -> None:
    store = connect()
    for i in range(4):
        store.set(f"rank:{i}", "1")
    assert store.wait_for_keys("rank:*", 2, candidate_keys=["rank:1", "rank:3"], timeout=5) == [
        "rank:1",
        "rank:3",
    ]


def test_timeout_message_reports_progress(connect: Callable[..., TCPStoreKVStore]) -> None:
    store = connect()
    store.set("rank:0", "1")
    store.set("rank:1", "0")
    store.set("rank:2", "1")
    with pytest.raises(KVTimeoutError) as info:
        store.wait_for_keys("rank:*", 3, candidate_keys=["rank:0", "rank:1", "rank:2"], timeout=0.2)
    text = str(info.value)
    assert "rank:*" in text
    assert "2 of 3 needed keys" in text
    assert "3 of 3 candidate keys existed" in text


def test_wait_survives_a_candidate_deleted_between_requests(
    connect: Callable[..., TCPStoreKVStore],
) -> None:
    # A key seen by list_keys and deleted before multi_get must not block the wait for
    # the store's request timeout (3600 s here) nor break it.
    store, churner = connect(timeout=3600), connect(timeout=3600)
    candidates = ["k:a", "k:b", "k:c"]
    store.set("k:a", "1")
    with flickering(churner, "k:b", "1") as churn, pytest.raises(KVTimeoutError):
        store.wait_for_keys("k:*", 3, candidate_keys=candidates, timeout=1.0)
    assert not churn.is_alive()
    store.set("k:b", "1")
    store.set("k:c", "1")
    assert store.wait_for_keys("k:*", 2, candidate_keys=candidates, timeout=5) == candidates


# -- close ------------------------------------------------------------------------------------


def test_close_keeps_the_keys_and_is_idempotent(connect: Callable[..., TCPStoreKVStore]) -> None:
    writer, reader = connect(), connect()
    writer.set("kept", "yes")
    writer.close(cleanup=True)
    writer.close()
    assert reader.get("kept") == b"yes"
    with pytest.raises(StoreClosedError):
        writer.get("kept")


def test_closing_a_wrapping_store_leaves_the_torch_store_usable(raw: Any, namespace: str) -> None:
    store = TCPStoreKVStore(namespace, store=raw)
    store.set("k", "v")
    store.close()
    assert raw.get(f"{namespace}/default/k") == b"v"
    with pytest.raises(StoreClosedError):
        store.set("k", "w")


def error_of_an_endless_wait(
    store: TCPStoreKVStore, interrupt: Callable[[], object], after: float
) -> BaseException | None:
    """Start a wait for a key that never comes, ``interrupt()`` it ``after`` seconds in.

    The wait must then end within 30 s; returns what it raised (None if it returned).
    """
    waiter = Waiter(lambda: store.wait_for_key("never", timeout=3600))
    waiter.start()
    time.sleep(after)
    interrupt()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    return waiter.error


def test_wait_in_another_thread_ends_when_the_store_is_closed(
    connect: Callable[..., TCPStoreKVStore],
) -> None:
    store = connect()
    error = error_of_an_endless_wait(store, store.close, after=0.2)
    assert isinstance(error, StoreClosedError), error


# -- construction and configuration ---------------------------------------------------------------


def test_constructor_rejects_contradictory_arguments(raw: Any) -> None:
    with pytest.raises(ConfigurationError, match="either store="):
        TCPStoreKVStore("ns", store=raw, host="127.0.0.1")
    with pytest.raises(ConfigurationError, match="host"):
        TCPStoreKVStore("ns", port=1234)
    with pytest.raises(ConfigurationError, match="port"):
        TCPStoreKVStore("ns", host="127.0.0.1", port=0)  # 0 only for a server
    with pytest.raises(ConfigurationError, match="port"):
        TCPStoreKVStore("ns", host="127.0.0.1", port=70000)
    with pytest.raises(ConfigurationError, match="world_size"):
        TCPStoreKVStore("ns", host="127.0.0.1", port=1234, world_size=0)
    with pytest.raises(InvalidArgumentError, match="timeout"):
        TCPStoreKVStore("ns", host="127.0.0.1", port=1234, timeout=0)
    with pytest.raises(ConfigurationError, match="timeout"):
        TCPStoreKVStore("ns", host="127.0.0.1", port=1234, timeout=1e20)
    with pytest.raises(InvalidKeyError):
        TCPStoreKVStore("bad/ns", store=raw)


def test_from_env_opens_a_tcpstore_client(server: TCPStoreKVStore, namespace: str) -> None:
    env = TCPStoreConfig(
        namespace=namespace,
        host="127.0.0.1",
        port=server.port,
        is_server=False,
        component="trainer",
        timeout=20,
    ).to_env()
    with etha.kvstore.from_env(env) as store:
        assert isinstance(store, TCPStoreKVStore)
        assert store.component == "trainer"
        store.set("from-env", "1")
    with etha.kvstore.from_env(
        {
            "ETHA_KV_BACKEND": "tcpstore",
            "ETHA_KV_NAMESPACE": namespace,
            "ETHA_KV_COMPONENT": "trainer",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(server.port),
            "RANK": "3",
        }
    ) as store:
        assert store.get("from-env") == b"1"


def test_rank_zero_config_starts_a_server(namespace: str) -> None:
    port = free_port()
    config = TCPStoreConfig(namespace=namespace, host="127.0.0.1", port=port, is_server=True)
    with TCPStoreKVStore.from_config(config) as srv:
        assert srv.port == port
        srv.set("k", "v")
        with TCPStoreKVStore(namespace, host="127.0.0.1", port=port) as client:
            assert client.get("k") == b"v"


def test_connecting_to_no_server_is_unavailable() -> None:
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with pytest.raises(UnavailableError, match=str(port)):
        TCPStoreKVStore("ns", host="127.0.0.1", port=port, timeout=1)
    assert time.monotonic() - start < 1 + SLACK


def test_import_without_torch_and_the_error_that_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import etha.kvstore\n"
        "from etha.kvstore.tcpstore import TCPStoreKVStore\n"
        "try:\n"
        "    TCPStoreKVStore('ns', host='127.0.0.1', port=1)\n"
        "except etha.kvstore.ConfigurationError as exc:\n"
        "    print('ERR', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "ERR" in result.stdout
    assert "pip install etha[tcpstore]" in result.stdout


# -- a dying server -------------------------------------------------------------------------------


@pytest.fixture
def external_server() -> Iterator[TCPStoreServer]:
    server = TCPStoreServer().start()
    try:
        yield server
    finally:
        server.kill()


def test_calls_fail_fast_with_unavailable_after_the_server_died(
    external_server: TCPStoreServer, namespace: str
) -> None:
    store = TCPStoreKVStore(namespace, host="127.0.0.1", port=external_server.port, timeout=5)
    store.set("k", "v")
    external_server.kill()
    operations: list[Callable[[], object]] = [
        lambda: store.get("k"),
        lambda: store.set("k", "w"),
        lambda: store.exists("k"),
        lambda: store.delete("k"),
        lambda: store.wait_for_key("k", timeout=3600),
        lambda: store.wait_for_keys("k*", 1, candidate_keys=["k"], timeout=3600),
    ]
    for operation in operations:
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            operation()
        assert time.monotonic() - start < 5 + SLACK
    assert isinstance(UnavailableError("x"), ConnectionError)
    store.close()


def test_a_wait_in_progress_fails_when_the_server_dies(
    external_server: TCPStoreServer, namespace: str
) -> None:
    store = TCPStoreKVStore(namespace, host="127.0.0.1", port=external_server.port, timeout=5)
    error = error_of_an_endless_wait(store, external_server.kill, after=0.3)
    assert isinstance(error, UnavailableError), error
    store.close()


def test_closing_the_server_store_stops_the_server(namespace: str) -> None:
    srv = TCPStoreKVStore(namespace, host="127.0.0.1", port=0, is_server=True, timeout=5)
    client = TCPStoreKVStore(namespace, host="127.0.0.1", port=srv.port, timeout=5)
    client.set("k", "v")
    assert srv.get("k") == b"v"
    srv.close()
    with pytest.raises(UnavailableError, match="rank-0 server"):
        client.get("k")
    # the broken connection is remembered: no second attempt, the same error at once
    with pytest.raises(UnavailableError, match="broke earlier"):
        client.exists("k")
    client.close()
