"""etcd behind TLS: the operator verifies it with its CA file and hands the CA to workers
(``ETHA_KV_CA_PEM``) together with https endpoints, so ``from_env()`` works in the pod."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.operator.helpers import create_ready, secret_env, store_from_secret
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess
from tests.support.tls import TLSFiles

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[EtcdCluster]:
    """The module's own etcd: auth on, clients over TLS with the module's CA."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd-tls-auth"), auth=True, tls=tls) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def operator(operator_factory: OperatorFactory, tls: TLSFiles) -> OperatorProcess:
    return operator_factory(ETHA_OPERATOR_ETCD_CA_FILE=str(tls.ca_cert)).start()


def test_worker_secret_carries_https_endpoints_and_the_ca(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, tls: TLSFiles, k8s_ns: str
) -> None:
    assert all(url.startswith("https://") for url in etcd.urls)
    create_ready(kube, k8s_ns, "secure", "secure-job")
    env = secret_env(kube, k8s_ns, "secure-etha-kv")
    assert env["ETHA_KV_ENDPOINTS"].startswith("https://")
    assert env["ETHA_KV_CA_PEM"] == tls.ca_cert.read_text()
    assert "ETHA_KV_CA_FILE" not in env  # a path would not exist inside the pod
    with store_from_secret(kube, k8s_ns, "secure-etha-kv") as store:
        store.set("over-tls", "1")
        assert store.get("over-tls") == b"1"
