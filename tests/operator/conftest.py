"""Operator fixtures: the kmock-based Kubernetes emulator, real etcd with auth, the operator.

One emulator and one operator process per test module (tests use distinct Kubernetes
namespaces so they do not see each other's objects); the etcd server is the session's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorProcess, wait_for

API = "etha.io/v1alpha1"
PLURAL = "kvnamespaces"


@pytest.fixture(scope="module")
def kube() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


@pytest.fixture(scope="module")
def kubeconfig(kube: EmulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kube.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="module")
def operator_factory(
    kubeconfig: Path, etcd_auth: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., OperatorProcess]]:
    """Build (not start) operator processes; every one built is stopped at the end."""
    made: list[OperatorProcess] = []

    def make(**env: str) -> OperatorProcess:
        proc = OperatorProcess(
            kubeconfig=kubeconfig,
            etcd_endpoints=etcd_auth.urls,
            root_password=etcd_auth.root_password,
            log_path=tmp_path_factory.mktemp("operator") / "operator.log",
            env=env,
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


def kvnamespace(name: str, job: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "KVNamespace",
        "metadata": {"name": name},
        "spec": {"jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": job}, **spec},
    }


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "metadata": {"labels": {"etha.io/kvnamespace": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "worker", "image": "python:3.11-slim"}],
                },
            }
        },
    }


def wait_phase(
    kube: EmulatorServer, namespace: str, name: str, phase: str, timeout: float = 30.0
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = kube.find(API, PLURAL, name, namespace)
        if obj is not None and (obj.get("status") or {}).get("phase") == phase:
            return obj
        return None

    try:
        return wait_for(probe, timeout=timeout, what=f"KVNamespace {namespace}/{name} {phase}")
    except TimeoutError:
        obj = kube.find(API, PLURAL, name, namespace)
        raise TimeoutError(f"{namespace}/{name} never became {phase}; last: {obj!r}") from None
