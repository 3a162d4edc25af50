"""Deletion while etcd is down (the finalizer gives up after its deadline and says what it
left), and the periodic audit that removes orphaned etcd users and roles.

This module runs its own etcd (auth on), because it stops it.
"""

from __future__ import annotations

import uuid

import pytest
from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2

from etha.kvstore.etcd_client import prefix_range_end
from tests.operator.helpers import (
    API,
    PLURAL,
    count_keys,
    create_ready,
    restart_etcd,
    root_client,
    wait_gone_from_etcd,
    write_keys,
)
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.own_etcd]

DEADLINE = 3


@pytest.fixture(scope="module")
def operator(operator_factory: OperatorFactory) -> OperatorProcess:
    return operator_factory(
        ETHA_OPERATOR_CLEANUP_DEADLINE=str(DEADLINE),
        ETHA_OPERATOR_AUDIT_INTERVAL="1",
        ETHA_OPERATOR_ETCD_TIMEOUT="1",
    ).start()


def test_delete_with_etcd_down_gives_up_after_the_deadline_and_the_audit_cleans_later(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    status = create_ready(kube, k8s_ns, "stranded", "stranded-job")
    write_keys(kube, k8s_ns, "stranded-etha-kv", 5)

    etcd.stop()
    try:
        kube.delete(API, PLURAL, "stranded", k8s_ns)
        # Not stuck: the finalizer lets go after its deadline although etcd never answered.
        wait_for(
            lambda: kube.find(API, PLURAL, "stranded", k8s_ns) is None,
            timeout=DEADLINE + 60,
            what="the KVNamespace to be deleted despite etcd being down",
        )
        # kopf posts events asynchronously: the object may be gone before its event lands.
        [event] = wait_for(
            lambda: [
                e for e in kube.events_for("stranded", k8s_ns) if e["reason"] == "CleanupIncomplete"
            ],
            what="a CleanupIncomplete event",
        )
        assert event["type"] == "Warning"
        assert status["etcdUser"] in event["message"]
        assert "keys" in event["message"]
        assert kube.find("v1", "secrets", "stranded-etha-kv", k8s_ns) is None
    finally:
        restart_etcd(etcd)

    # What the finalizer left behind is still in etcd, until the audit finds it.
    wait_gone_from_etcd(
        etcd,
        status["etcdUser"],
        status["etcdRole"],
        "the audit to remove the stranded user and role",
    )
    assert count_keys(etcd, status["keyPrefix"]) == 0
    assert "audit: removed orphaned etcd user/etcd role" in operator.log()


def test_audit_removes_orphans_created_behind_the_operators_back(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    alive = create_ready(kube, k8s_ns, "alive", "alive-job")
    write_keys(kube, k8s_ns, "alive-etha-kv", 1)

    orphan = f"etha-{uuid.uuid4()}"
    orphan_prefix = f"orphan-{uuid.uuid4().hex[:6]}"
    key = f"{orphan_prefix}/".encode()
    with root_client(etcd) as client:
        # Keys first, then the role and its grant back to back: the audit may look at
        # any moment, and the role's permission is how it finds the keys.
        for i in range(3):
            client.put(key + f"default/k{i}".encode(), b"v")
        for name in ("etha-not-a-uid", "alice"):
            client.call(
                "Auth", "UserAdd", etcdrpc.AuthUserAddRequest(name=name, password="pw-" + name)
            )
        perm = auth_pb2.Permission(
            permType=auth_pb2.Permission.READWRITE, key=key, range_end=prefix_range_end(key)
        )
        client.call("Auth", "RoleAdd", etcdrpc.AuthRoleAddRequest(name=orphan))
        client.call(
            "Auth",
            "RoleGrantPermission",
            etcdrpc.AuthRoleGrantPermissionRequest(name=orphan, perm=perm),
        )
        client.call("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(name=orphan, password="pw"))

    wait_gone_from_etcd(etcd, orphan, orphan, "the audit to remove the orphan")
    assert count_keys(etcd, orphan_prefix) == 0
    users = etcd.users()
    # Only operator-made names (etha-<uid>) without a KVNamespace are orphans.
    assert "alice" in users and "etha-not-a-uid" in users
    assert alive["etcdUser"] in users and alive["etcdRole"] in etcd.roles()
    assert count_keys(etcd, alive["keyPrefix"]) == 1


def test_audit_cleans_up_after_a_finalizer_removed_by_hand(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    status = create_ready(kube, k8s_ns, "forced", "forced-job")
    write_keys(kube, k8s_ns, "forced-etha-kv", 4)
    # What `kubectl patch --type=merge -p '{"metadata":{"finalizers":null}}'` does to a
    # stuck object: it goes without the operator's clean-up.
    kube.patch(API, PLURAL, "forced", {"metadata": {"finalizers": None}}, k8s_ns)
    kube.delete(API, PLURAL, "forced", k8s_ns)
    if kube.find(API, PLURAL, "forced", k8s_ns) is not None:
        # The operator put its finalizer back between the patch and the delete (it keeps
        # one on every live object), so the delete only marked the object: drop the
        # finalizer again, as a user does to an object stuck in Terminating.
        kube.patch(API, PLURAL, "forced", {"metadata": {"finalizers": None}}, k8s_ns)
    assert kube.find(API, PLURAL, "forced", k8s_ns) is None
    wait_gone_from_etcd(
        etcd,
        status["etcdUser"],
        status["etcdRole"],
        "the audit to remove the user and role of the force-deleted KVNamespace",
    )
    assert count_keys(etcd, status["keyPrefix"]) == 0
