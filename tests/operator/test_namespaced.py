"""ETHA_OPERATOR_NAMESPACES: the operator serves only the namespaces it is told to."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.operator.helpers import API, PLURAL, kvnamespace, wait_phase
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess, run_operator

pytestmark = pytest.mark.timeout(90)

WATCHED = f"watched-{uuid.uuid4().hex[:6]}"
IGNORED = f"ignored-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def operator(kube: EmulatorServer, operator_factory: OperatorFactory) -> OperatorProcess:
    # Namespace-restricted kopf lists Namespace objects to learn which of its namespaces exist.
    for namespace in (WATCHED, IGNORED):
        kube.create("v1", "namespaces", {"metadata": {"name": namespace}})
    return operator_factory(ETHA_OPERATOR_NAMESPACES=WATCHED).start()


def test_only_watched_namespaces_are_served(
    kube: EmulatorServer, operator: OperatorProcess
) -> None:
    kube.create(API, PLURAL, kvnamespace("other", "job"), IGNORED)
    kube.create(API, PLURAL, kvnamespace("mine", "job"), WATCHED)
    wait_phase(kube, WATCHED, "mine", "Ready")
    # Give the operator the time it took for "mine" once more: "other" must stay untouched.
    time.sleep(2)
    other = kube.get(API, PLURAL, "other", IGNORED)
    assert "status" not in other and not other["metadata"].get("finalizers")
    assert kube.find("v1", "secrets", "other-etha-kv", IGNORED) is None
    assert "cluster-wide" not in operator.log().split("etha operator started", 1)[1][:200]


def test_bad_settings_stop_the_operator_with_the_variable_named() -> None:
    result = run_operator({"PATH": "/usr/bin:/bin", "ETHA_OPERATOR_ETCD_PASSWORD": "x"})
    assert result.returncode == 2
    assert "ETHA_OPERATOR_ETCD_ENDPOINTS is not set" in result.stderr
