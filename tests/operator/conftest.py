"""Operator fixtures: the kmock-based Kubernetes emulator, real etcd with auth, the operator.

One emulator and one operator process per test module (tests use distinct Kubernetes
namespaces so they do not see each other's objects); the etcd server is the session's.
``operator_factory(gateway=[...])`` runs the operator in gateway mode, handing workers
those gateway endpoints; without, in direct mode (see OperatorProcess).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorProcess


def pytest_configure(config: pytest.Config) -> None:
    # kmock 0.8 loads its bundled resource list with a deprecated importlib call.
    config.addinivalue_line("filterwarnings", "ignore:read_binary is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def kube() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


@pytest.fixture(scope="module")
def kubeconfig(kube: EmulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kube.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="module")
def etcd(etcd_auth: EtcdCluster) -> EtcdCluster:
    """The etcd (auth on) the module's operator uses; modules that stop etcd override it."""
    return etcd_auth


@pytest.fixture(scope="module")
def operator_factory(
    kubeconfig: Path, etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., OperatorProcess]]:
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
def operator(operator_factory: Callable[..., OperatorProcess]) -> Iterator[OperatorProcess]:
    proc = operator_factory().start()
    yield proc
    proc.stop()


@pytest.fixture
def k8s_ns() -> str:
    """A Kubernetes namespace name unique to the test."""
    return f"ns-{uuid.uuid4().hex[:8]}"
