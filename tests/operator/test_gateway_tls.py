"""The operator in gateway mode with a TLS gateway: https endpoints and the gateway's CA
reach the tenant Secret, and a worker talks to the gateway over TLS with only that.
Every Kubernetes API request of the whole lifecycle is recorded: the chart's RBAC (its
default, gateway mode) grants each verb used.

Its own module: its own emulator, so no other operator handles its objects.
"""

from __future__ import annotations

import pytest

from etha.kvstore import from_env
from etha.kvstore.errors import KVStoreError
from tests.operator.helpers import (
    API,
    PLURAL,
    chart_grants,
    create_ready,
    finish_job,
    secret_env,
    store_from_secret,
    ungranted,
    wait_phase,
)
from tests.reliability.conftest import ApiRecorder
from tests.support.etcd_server import EtcdCluster
from tests.support.gateway import GatewayFactory
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, wait_for
from tests.support.tls import TLSFiles

pytestmark = pytest.mark.timeout(180)


def test_a_tls_gateway_puts_https_and_its_ca_into_the_secret(
    kube: EmulatorServer,
    etcd: EtcdCluster,
    tls: TLSFiles,
    operator_factory: OperatorFactory,
    gateway_factory: GatewayFactory,
    k8s_ns: str,
) -> None:
    with gateway_factory(
        ETHA_GATEWAY_TLS_CERT_FILE=str(tls.server_cert),
        ETHA_GATEWAY_TLS_KEY_FILE=str(tls.server_key),
    ) as gateway:
        recorder = ApiRecorder(kube)
        op = operator_factory(
            gateway=[f"https://{gateway.endpoint}"],
            ETHA_OPERATOR_GATEWAY_CA_FILE=str(tls.ca_cert),
        ).start()
        try:
            create_ready(kube, k8s_ns, "sec")
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
    granted = chart_grants()
    used = recorder.verbs()
    assert used, "nothing recorded"
    missing = ungranted(used, granted)
    assert not missing, f"the chart does not grant {missing}"
