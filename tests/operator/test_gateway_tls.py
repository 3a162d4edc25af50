"""The operator in gateway mode with a TLS gateway: https endpoints and the gateway's CA
reach the tenant Secret, and a worker talks to the gateway over TLS with only that.
Every Kubernetes API request of the whole lifecycle is recorded: the chart's RBAC (its
default, gateway mode) grants each verb used.

Its own module: its own emulator, so no other operator handles its objects.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from etha.kvstore import from_env
from etha.kvstore.errors import KVStoreError
from tests.operator.helpers import (
    API,
    PLURAL,
    finish_job,
    gateway_etcd_user,
    job,
    kvnamespace,
    secret_env,
    store_from_secret,
    wait_phase,
)
from tests.reliability.conftest import ApiRecorder
from tests.support.etcd_server import EtcdCluster
from tests.support.gateway import GatewayProcess
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorProcess, wait_for
from tests.support.tls import TLSFiles, make_tls
from tests.test_chart import manifests

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("gateway-tls"))


def test_a_tls_gateway_puts_https_and_its_ca_into_the_secret(
    kube: EmulatorServer,
    etcd: EtcdCluster,
    tls: TLSFiles,
    operator_factory: Callable[..., OperatorProcess],
    tmp_path: Path,
    k8s_ns: str,
) -> None:
    user, password = gateway_etcd_user(etcd)
    with GatewayProcess(
        etcd.endpoints,
        tmp_path / "gw",
        username=user,
        password=password,
        env={
            "ETHA_GATEWAY_TLS_CERT_FILE": str(tls.server_cert),
            "ETHA_GATEWAY_TLS_KEY_FILE": str(tls.server_key),
        },
    ) as gateway:
        recorder = ApiRecorder(kube)
        op = operator_factory(
            gateway=[f"https://{gateway.endpoint}"],
            ETHA_OPERATOR_GATEWAY_CA_FILE=str(tls.ca_cert),
        ).start()
        try:
            kube.create("batch/v1", "jobs", job("sec"), k8s_ns)
            kube.create(API, PLURAL, kvnamespace("sec", "sec"), k8s_ns)
            wait_phase(kube, k8s_ns, "sec", "Ready")
            env = secret_env(kube, k8s_ns, "sec-etha-kv")
            assert env["ETHA_KV_ENDPOINTS"] == f"https://{gateway.endpoint}"
            assert env["ETHA_KV_CA_PEM"].strip() == tls.ca_cert.read_text().strip()
            with store_from_secret(kube, k8s_ns, "sec-etha-kv") as store:
                store.set("over-tls", "1")
                assert store.get("over-tls") == b"1"
            # Without the CA the worker cannot talk to the gateway.
            stripped = {k: v for k, v in env.items() if k != "ETHA_KV_CA_PEM"}
            with pytest.raises(KVStoreError):
                from_env({**stripped, "ETHA_KV_TIMEOUT": "2"}).set("no-ca", "1")
            finish_job(kube, k8s_ns, "sec")
            wait_phase(kube, k8s_ns, "sec", "Cleaned")
            kube.delete(API, PLURAL, "sec", k8s_ns)
            wait_for(lambda: kube.find(API, PLURAL, "sec", k8s_ns) is None, what="deletion")
        finally:
            op.stop()
    # Least privilege: the chart (gateway mode, cluster-wide) grants every verb used.
    granted: dict[tuple[str, str], set[str]] = {}
    for role in (d for d in manifests() if d["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    used = recorder.verbs()
    assert used, "nothing recorded"
    missing = {
        f"{group or 'core'}/{resource}": sorted(verbs - granted.get((group, resource), set()))
        for (_, group, resource), verbs in used.items()
        if verbs - granted.get((group, resource), set())
    }
    assert not missing, f"the chart does not grant {missing}"
