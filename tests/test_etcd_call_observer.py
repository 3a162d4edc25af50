"""EtcdClient's ``on_call`` observer against real etcd: one report per request sent,
with its duration and its error, and none for a request refused before sending."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from pyetcd import etcdrpc

from etha.kvstore.config import EtcdConfig, parse_endpoints
from etha.kvstore.errors import (
    InvalidValueError,
    KVStoreError,
    PermissionDeniedError,
    UnavailableError,
)
from etha.kvstore.etcd_client import EtcdClient
from etha.kvstore.etcdv3.client import put_op
from tests.support.etcd_server import EtcdCluster
from tests.support.etcd_users import grant_prefix_user, root_client
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(120)

Report = tuple[str, float, BaseException | None]


class Recorder:
    """An ``on_call`` observer that keeps every report and the thread it came from."""

    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.threads: set[int] = set()

    def __call__(self, call: str, seconds: float, error: BaseException | None) -> None:
        self.reports.append((call, seconds, error))
        self.threads.add(threading.get_ident())

    def calls(self) -> list[str]:
        return [call for call, _, _ in self.reports]


def unique() -> bytes:
    return f"obs-{uuid.uuid4().hex[:10]}/".encode()


def test_every_kind_of_call_is_reported_once_with_its_duration(etcd_plain: EtcdCluster) -> None:
    recorder = Recorder()
    key = unique() + b"k"
    with EtcdClient(etcd_plain.endpoints, on_call=recorder) as client:
        client.put(key, b"v")
        client.range(key)
        client.range(key, count_only=True, serializable=True)
        client.txn(etcdrpc.TxnRequest(success=[put_op(key, b"w")]))
        client.call("Maintenance", "Status", etcdrpc.StatusRequest())
        assert client.delete_range(key) == 1
    assert recorder.calls() == [
        "KV.Put",
        "KV.Range",
        "KV.Range",
        "KV.Txn",
        "Maintenance.Status",
        "KV.DeleteRange",
    ]
    assert all(error is None for _, _, error in recorder.reports)
    assert all(0 < seconds < 10 for _, seconds, _ in recorder.reports)
    # Reported in the calling thread, as documented.
    assert recorder.threads == {threading.get_ident()}


def test_a_refusal_is_reported_with_the_exception_the_caller_gets(
    etcd_auth: EtcdCluster,
) -> None:
    prefix = unique()
    user = f"obs-{uuid.uuid4().hex[:8]}"
    with root_client(etcd_auth) as root:
        grant_prefix_user(root, user, "pw", prefix)
    recorder = Recorder()
    with EtcdClient(etcd_auth.endpoints, username=user, password="pw", on_call=recorder) as client:
        client.put(prefix + b"mine", b"v")
        with pytest.raises(PermissionDeniedError) as raised:
            client.put(b"someone-else/" + prefix, b"v")
    [(call, _, error)] = recorder.reports[-1:]
    assert call == "KV.Put"
    assert error is raised.value
    # The log-in is part of the first call, not a report of its own.
    assert "Auth.Authenticate" not in recorder.calls()
    assert recorder.calls() == ["KV.Put", "KV.Put"]


def test_an_unreachable_server_is_reported_after_the_whole_timeout() -> None:
    recorder = Recorder()
    with EtcdClient([f"127.0.0.1:{free_port()}"], timeout=1.0, on_call=recorder) as client:
        began = time.monotonic()
        with pytest.raises(UnavailableError) as raised:
            client.range(b"x")
        took = time.monotonic() - began
    [(call, seconds, error)] = recorder.reports
    assert (call, error) == ("KV.Range", raised.value)
    # Failover and backoff included: the report covers the call, not one attempt.
    assert 0.9 <= seconds <= took + 0.01


def test_a_request_refused_before_sending_is_not_reported(etcd_plain: EtcdCluster) -> None:
    recorder = Recorder()
    with EtcdClient(etcd_plain.endpoints, max_request_bytes=4096, on_call=recorder) as client:
        with pytest.raises(InvalidValueError):
            client.put(unique() + b"big", b"x" * 8192)
        with pytest.raises(KVStoreError):
            client.call("Watch", "Watch", etcdrpc.WatchRequest())
    assert recorder.reports == []


def test_from_config_passes_the_observer_and_shared_clients_have_none(
    etcd_plain: EtcdCluster,
) -> None:
    recorder = Recorder()
    endpoints, _ = parse_endpoints(",".join(etcd_plain.endpoints))
    config = EtcdConfig(namespace="obs", endpoints=endpoints)
    with EtcdClient.from_config(config, on_call=recorder) as client:
        client.range(unique())
    assert recorder.calls() == ["KV.Range"]
    shared = EtcdClient.shared(config)
    try:
        assert shared.on_call is None
    finally:
        shared.release()
