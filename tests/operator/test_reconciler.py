"""The Reconciler without kopf: called directly, against the emulator and real etcd."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from etha_operator.etcd_admin import EtcdAdmin
from etha_operator.k8s import KubeApi
from etha_operator.reconciler import Reconciler
from etha_operator.settings import load_settings

from etha.kvstore.etcd_client import EtcdClient
from tests.operator.helpers import API, PLURAL, etcd_users, kvnamespace, secret_env
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)


class Events:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    def __call__(self, body: Any, *, type: str, reason: str, message: str) -> None:
        self.posted.append((type, reason, message))


@pytest.fixture
def kube_api(kubeconfig: Path) -> Iterator[KubeApi]:
    api = KubeApi(kubernetes.config.new_client_from_config(str(kubeconfig)))
    yield api
    api.close()


def make(etcd: EtcdCluster, kube_api: KubeApi, endpoints: list[str], **env: str) -> Reconciler:
    settings = load_settings(
        {
            "ETHA_OPERATOR_ETCD_ENDPOINTS": ",".join(endpoints),
            "ETHA_OPERATOR_ETCD_PASSWORD": etcd.root_password,
            "ETHA_OPERATOR_ETCD_TIMEOUT": "0.5",
            "ETHA_OPERATOR_MODE": "direct",
            **env,
        }
    )
    client = EtcdClient(
        endpoints, username="root", password=etcd.root_password, timeout=settings.etcd_timeout
    )
    return Reconciler(settings, EtcdAdmin(client), kube_api, Events())


def test_provision_twice_keeps_the_password_and_creates_one_user(
    kube: EmulatorServer, kube_api: KubeApi, etcd: EtcdCluster, k8s_ns: str
) -> None:
    reconciler = make(etcd, kube_api, etcd.urls)
    body = kube.create(API, PLURAL, kvnamespace("direct", "direct-job"), k8s_ns)
    try:
        first = reconciler.provision(body)
        assert first is not None and first["phase"] == "Ready"
        password = secret_env(kube, k8s_ns, "direct-etha-kv")["ETHA_KV_PASSWORD"]
        again = reconciler.provision(kube.get(API, PLURAL, "direct", k8s_ns))
        assert again is not None and again["phase"] == "Ready"
        assert secret_env(kube, k8s_ns, "direct-etha-kv")["ETHA_KV_PASSWORD"] == password
        uid = body["metadata"]["uid"]
        assert [u for u in etcd_users(etcd) if uid in u] == [f"etha-{uid}"]
        events: Events = reconciler.emit  # type: ignore[assignment]
        assert [reason for _, reason, _ in events.posted] == ["Provisioned"]
    finally:
        reconciler.cleanup(kube.get(API, PLURAL, "direct", k8s_ns))
        reconciler.admin.close()


def test_cleanup_with_unreachable_etcd_returns_within_the_deadline(
    kube: EmulatorServer, kube_api: KubeApi, etcd: EtcdCluster, k8s_ns: str
) -> None:
    dead = [f"http://127.0.0.1:{free_port()}"]  # nothing listens there
    reconciler = make(etcd, kube_api, dead, ETHA_OPERATOR_CLEANUP_DEADLINE="2")
    body = kube.create(API, PLURAL, kvnamespace("unreachable", "j"), k8s_ns)
    body["status"] = {"keyPrefix": "some.prefix", "phase": "Ready"}
    try:
        started = time.monotonic()
        report = reconciler.cleanup(body)
        elapsed = time.monotonic() - started
    finally:
        reconciler.admin.close()
    # Bounded by the deadline (plus one etcd timeout in flight), not by retries of etcd:
    # the slack is for a loaded CI machine.
    assert elapsed < 2 + 0.5 + 12
    assert set(report.failed) == {
        "the keys",
        f"etcd user etha-{body['metadata']['uid']}",
        f"etcd role etha-{body['metadata']['uid']}",
        f"tenant etha-{body['metadata']['uid']}",
    }
    events: Events = reconciler.emit  # type: ignore[assignment]
    [(kind, reason, message)] = events.posted
    assert (kind, reason) == ("Warning", "CleanupIncomplete")
    assert "gave up after 2s" in message


def test_a_name_too_long_for_the_secret_fails_clearly(
    kube: EmulatorServer, kube_api: KubeApi, etcd: EtcdCluster, k8s_ns: str
) -> None:
    reconciler = make(etcd, kube_api, etcd.urls)
    name = "n" * 250
    body = kube.create(API, PLURAL, kvnamespace(name, "job"), k8s_ns)
    try:
        status = reconciler.provision(body)
    finally:
        reconciler.admin.close()
    assert status is not None and status["phase"] == "Failed"
    assert "at most 245" in status["message"]
    assert f"etha-{body['metadata']['uid']}" not in etcd_users(etcd)
