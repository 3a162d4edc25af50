"""Ready vs etcd alarms: a KVNamespace is not Ready while etcd holds NOSPACE or CORRUPT.

The alarm is raised for real (``Maintenance.Alarm`` ACTIVATE as root, what etcd itself
does when its backend is full) on this module's own etcd, so no other test sees it, and
cleared again (DEACTIVATE, what ``etcdctl alarm disarm`` does).
"""

from __future__ import annotations

import time

import pytest
from etha_operator.reconciler import ALARM_CACHE_SECONDS
from pyetcd import etcdrpc

from tests.operator.helpers import (
    API,
    PLURAL,
    event_reasons,
    job,
    kvnamespace,
    root_client,
    wait_phase,
)
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess, wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.own_etcd]

NOSPACE, CORRUPT = 1, 2  # etcd's AlarmType numbers


@pytest.fixture(scope="module")
def operator(operator_factory: OperatorFactory) -> OperatorProcess:
    return operator_factory(ETHA_OPERATOR_JOB_CHECK_INTERVAL="1").start()


def _alarm(etcd: EtcdCluster, action: int, alarm: int) -> list[int]:
    with root_client(etcd) as client:
        member = client.call("Maintenance", "Status", etcdrpc.StatusRequest()).header.member_id
        response = client.call(
            "Maintenance",
            "Alarm",
            etcdrpc.AlarmRequest(action=action, memberID=member, alarm=alarm),
        )
        listed = client.call(
            "Maintenance", "Alarm", etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET)
        )
    assert response is not None
    return [a.alarm for a in listed.alarms]


@pytest.mark.parametrize("alarm", [NOSPACE, CORRUPT], ids=["NOSPACE", "CORRUPT"])
def test_no_ready_while_etcd_holds_an_alarm(
    kube: EmulatorServer,
    etcd: EtcdCluster,
    operator: OperatorProcess,
    k8s_ns: str,
    alarm: int,
) -> None:
    name = "before" if alarm == NOSPACE else "before-c"
    kube.create("batch/v1", "jobs", job(name), k8s_ns)
    kube.create(API, PLURAL, kvnamespace(name, name), k8s_ns)
    wait_phase(kube, k8s_ns, name, "Ready")
    label = "NOSPACE" if alarm == NOSPACE else "CORRUPT"
    assert _alarm(etcd, etcdrpc.AlarmRequest.ACTIVATE, alarm) == [alarm]
    # The operator reuses one answer about alarms for up to ALARM_CACHE_SECONDS.
    time.sleep(ALARM_CACHE_SECONDS + 0.5)
    try:
        # A new KVNamespace waits, saying why and what to do.
        fresh = "during" if alarm == NOSPACE else "during-c"
        kube.create("batch/v1", "jobs", job(fresh), k8s_ns)
        kube.create(API, PLURAL, kvnamespace(fresh, fresh), k8s_ns)
        held = wait_phase(kube, k8s_ns, fresh, "Pending", timeout=30)
        (ready,) = [c for c in held["status"]["conditions"] if c["type"] == "Ready"]
        assert (ready["status"], ready["reason"]) == ("False", "EtcdAlarm")
        assert label in ready["message"] and "etcdctl alarm disarm" in ready["message"]
        assert "EtcdAlarm" in event_reasons(kube, k8s_ns, fresh)
        # The one that was Ready leaves Ready at its next re-check.
        before = wait_phase(kube, k8s_ns, name, "Pending", timeout=30)
        assert label in before["status"]["message"]
        assert not kube.find("v1", "secrets", f"{fresh}-etha-kv", k8s_ns)
    finally:
        assert _alarm(etcd, etcdrpc.AlarmRequest.DEACTIVATE, alarm) == []
    # Cleared: both become Ready by themselves, with working Secrets.
    for obj in (name, fresh):
        status = wait_phase(kube, k8s_ns, obj, "Ready", timeout=60)["status"]
        (ready,) = [c for c in status["conditions"] if c["type"] == "Ready"]
        assert ready["status"] == "True"
    wait_for(lambda: kube.find("v1", "secrets", f"{fresh}-etha-kv", k8s_ns), what="the Secret")
