"""The operator is SIGKILLed in the middle of provisioning and restarted: it converges.

The emulator holds the operator's next API request (and then drops it), so the crash
happens at a known point: after the etcd user exists but before the Secret does; or
after the Secret exists but before the status says Ready.
"""

from __future__ import annotations

import pytest

from tests.operator.helpers import (
    API,
    PLURAL,
    etcd_users,
    kvnamespace,
    secret_env,
    store_from_secret,
    wait_phase,
)
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess

pytestmark = pytest.mark.timeout(240)


def _etha_users(etcd: EtcdCluster) -> set[str]:
    return {u for u in etcd_users(etcd) if u.startswith("etha-")}


def _first_run(
    etcd: EtcdCluster, operator_factory: OperatorFactory
) -> tuple[set[str], OperatorProcess]:
    """The operator-made users before the test, and the operator that is to be killed."""
    return _etha_users(etcd), operator_factory().start()


def test_killed_before_the_secret_is_written(
    kube: EmulatorServer, operator_factory: OperatorFactory, etcd: EtcdCluster, k8s_ns: str
) -> None:
    before, first = _first_run(etcd, operator_factory)
    with kube.hold("POST", "secrets", name="crashy-etha-kv") as hold:
        uid = kube.create(API, PLURAL, kvnamespace("crashy", "crashy-job"), k8s_ns)["metadata"][
            "uid"
        ]
        assert hold.reached.wait(60), first.log_tail()
        # The user exists with a password that nobody will ever learn.
        assert f"etha-{uid}" in etcd_users(etcd)
        first.kill()
        hold.release(fail=True)
    assert kube.find("v1", "secrets", "crashy-etha-kv", k8s_ns) is None

    second = operator_factory().start()
    try:
        wait_phase(kube, k8s_ns, "crashy", "Ready")
        # Converged: one user for this object, nothing else added, and the Secret's
        # (new) password works.
        assert _etha_users(etcd) - before == {f"etha-{uid}"}
        with store_from_secret(kube, k8s_ns, "crashy-etha-kv") as store:
            store.set("after-crash", "1")
            assert store.get("after-crash") == b"1"
        assert "given a new password" in second.log()
    finally:
        second.stop()


def test_killed_after_the_secret_but_before_ready(
    kube: EmulatorServer, operator_factory: OperatorFactory, etcd: EtcdCluster, k8s_ns: str
) -> None:
    before, first = _first_run(etcd, operator_factory)
    with kube.hold("PATCH", "kvnamespaces", subresource="status", name="late") as hold:
        uid = kube.create(API, PLURAL, kvnamespace("late", "late-job"), k8s_ns)["metadata"]["uid"]
        assert hold.reached.wait(60), first.log_tail()
        password = secret_env(kube, k8s_ns, "late-etha-kv")["ETHA_KV_PASSWORD"]
        first.kill()
        hold.release(fail=True)
    assert (kube.get(API, PLURAL, "late", k8s_ns).get("status") or {}).get("phase") is None

    second = operator_factory().start()
    try:
        wait_phase(kube, k8s_ns, "late", "Ready")
        assert _etha_users(etcd) - before == {f"etha-{uid}"}
        # The Secret's password still logs in, so it was kept rather than rotated.
        assert secret_env(kube, k8s_ns, "late-etha-kv")["ETHA_KV_PASSWORD"] == password
        with store_from_secret(kube, k8s_ns, "late-etha-kv") as store:
            store.set("k", "v")
    finally:
        second.stop()
