"""The operator tests' world: the kmock-based Kubernetes emulator, real etcd with auth, the
real gateway, the operator and its webhook server.

One emulator and one operator process per test module (tests use distinct Kubernetes
namespaces so they do not see each other's objects). The etcd server is the session's,
unless the module is marked ``own_etcd``: then it gets a private one (modules that stop
etcd, raise alarms, or run the audit, which must not see other modules' leftovers).
``operator_factory(gateway=[...])`` runs the operator in gateway mode, handing workers
those gateway endpoints; without, in direct mode (see OperatorProcess). A module
overrides ``operator`` to run it with other settings; every operator built is stopped by
``operator_factory``, every gateway by ``gateway_factory``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.helpers import gateway_etcd_user
from tests.support.admission import Webhook
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.gateway import GatewayFactory, GatewayProcess
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess
from tests.support.ports import free_port
from tests.support.tls import TLSFiles, make_tls


def pytest_configure(config: pytest.Config) -> None:
    # kmock 0.8 loads its bundled resource list with a deprecated importlib call.
    config.addinivalue_line("filterwarnings", "ignore:read_binary is deprecated:DeprecationWarning")
    config.addinivalue_line(
        "markers",
        "own_etcd: the module's operator uses a private etcd (auth on), not the shared one",
    )


@pytest.fixture(scope="module")
def kube() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


@pytest.fixture(scope="module")
def kubeconfig(kube: EmulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kube.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="module")
def etcd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EtcdCluster]:
    """The etcd (auth on) the module's operator uses: the session's, or with the module's
    ``own_etcd`` mark a private one, stopped and removed after the module."""
    if request.node.get_closest_marker("own_etcd") is None:
        yield request.getfixturevalue("etcd_auth")
        return
    with etcd_cluster(tmp_path_factory.mktemp("etcd-own"), auth=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    # kopf's own certificate generator fails on OpenSSL 3; these come from `cryptography`.
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def webhook(tls: TLSFiles) -> Webhook:
    """Where the module's operator serves its webhook (pass ``**webhook.settings()``)."""
    return Webhook(tls, free_port())


@pytest.fixture(scope="module")
def gateway_factory(
    etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayFactory]:
    """Start gateways on the module's etcd, each logged in as the least-privilege user the
    chart's bootstrap script makes; ``env`` adds ETHA_GATEWAY_* settings (e.g. TLS)."""
    made: list[GatewayProcess] = []

    def make(**env: str) -> GatewayProcess:
        user, password = gateway_etcd_user(etcd)
        proc = GatewayProcess(
            etcd.endpoints,
            tmp_path_factory.mktemp("gateway"),
            username=user,
            password=password,
            env=env,
        )
        made.append(proc)
        return proc.start()

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(gateway_factory: GatewayFactory) -> GatewayProcess:
    """One plain-HTTP gateway for the module."""
    return gateway_factory()


@pytest.fixture(scope="module")
def operator_factory(
    kubeconfig: Path, etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorFactory]:
    """Build (not start) operator processes; every one built is stopped at the end."""
    made: list[OperatorProcess] = []

    def make(gateway: list[str] | None = None, **env: str) -> OperatorProcess:
        proc = OperatorProcess(
            kubeconfig=kubeconfig,
            etcd_endpoints=etcd.urls,
            root_password=etcd.root_password,
            log_path=tmp_path_factory.mktemp("operator") / "operator.log",
            env=env,
            gateway_endpoints=gateway,
        )
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(scope="module")
def operator(operator_factory: OperatorFactory) -> OperatorProcess:
    """The module's operator, direct mode, default settings."""
    return operator_factory().start()


@pytest.fixture
def k8s_ns() -> str:
    """A Kubernetes namespace name unique to the test."""
    return f"ns-{uuid.uuid4().hex[:8]}"
