"""The KVNamespace status: its phases and fields against the CRD, the phase rule over its
whole table, and the one clock every timestamp the operator writes comes from."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from etha_operator import k8s, metrics
from etha_operator.etcd_admin import EtcdAdmin
from etha_operator.model import (
    REMOVE,
    STATUS_KEYS,
    KVNamespaceStatus,
    Phase,
    Situation,
    Step,
    Trigger,
    next_steps,
)
from etha_operator.reconciler import Reconciler
from etha_operator.settings import load_settings

from etha.kvstore.etcd_client import EtcdClient
from tests.operator.helpers import API, PLURAL, count_keys, job, kvnamespace, root_client
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer

CRD = Path(__file__).resolve().parents[2] / "crds" / "kvnamespace.yaml"


def crd_status_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    return schema


# -- phases and fields --------------------------------------------------------------------------


def test_the_phases_are_exactly_the_crds_enum_and_the_metrics_labels() -> None:
    values = [phase.value for phase in Phase]
    assert values == crd_status_schema()["properties"]["phase"]["enum"]
    assert tuple(values) == metrics.PHASES
    # Written as the plain strings they always were.
    assert [str(phase) for phase in Phase] == values
    assert f"{Phase.JOB_ENDED}" == "JobEnded"


def test_phase_of_a_status_that_has_none_or_a_foreign_one_is_none() -> None:
    assert Phase.of({"phase": "Ready"}) is Phase.READY
    assert Phase.of(None) is None
    assert Phase.of({}) is None
    assert Phase.of({"phase": "ready"}) is None  # phases are case-sensitive
    assert Phase.of({"phase": "Bogus"}) is None
    assert Phase.of({"phase": 3}) is None


def test_the_status_type_has_exactly_the_crds_status_fields() -> None:
    assert set(STATUS_KEYS.values()) == set(crd_status_schema()["properties"])
    full = {field: "x" for field in STATUS_KEYS}
    assert set(KVNamespaceStatus(**full).to_patch()) == set(STATUS_KEYS.values())


def test_a_status_patch_writes_what_is_set_and_removes_what_is_marked() -> None:
    status = KVNamespaceStatus(
        phase=Phase.READY,
        observed_generation=2,
        etcd_role=REMOVE,
        job_uid="u-1",
        keys_deleted=0,
    )
    patch = status.to_patch()
    assert patch == {
        "phase": "Ready",
        "observedGeneration": 2,
        "etcdRole": None,  # merge patch: deletes the stored field
        "jobUID": "u-1",
        "keysDeleted": 0,  # zero is a value, not "unset"
    }
    assert type(patch["phase"]) is str  # no enum on the wire
    assert status.as_dict() == {
        "phase": "Ready",
        "observedGeneration": 2,
        "jobUID": "u-1",
        "keysDeleted": 0,
    }
    assert KVNamespaceStatus().to_patch() == {}


def test_a_status_differs_only_when_writing_it_would_change_something() -> None:
    status = KVNamespaceStatus(phase=Phase.READY, message="m", etcd_role=REMOVE)
    stored = {"phase": "Ready", "message": "m", "keyPrefix": "p"}
    assert not status.differs_from(stored)  # fields it does not set do not count
    assert status.differs_from({**stored, "etcdRole": "etha-x"})  # would be removed
    assert status.differs_from({**stored, "message": "other"})
    assert status.differs_from(None)


# -- the phase rule -----------------------------------------------------------------------------

P, A, J = Step.PROVISION, Step.CHECK_ALARMS, Step.CHECK_JOB
NOTHING: tuple[Step, ...] = ()
#: phase -> {(jobEndedAt set, onJobEnd Keep): (steps on a CHANGE, steps on a RECHECK)}
NOT_PROVISIONED = {
    (False, False): ((P, J), (P, J)),
    (False, True): ((P, J), (P, J)),
    (True, False): ((J,), (J,)),
    (True, True): (NOTHING, NOTHING),
}
SETTLED = dict.fromkeys(NOT_PROVISIONED, (NOTHING, NOTHING))
TABLE: dict[Phase | None, dict[tuple[bool, bool], tuple[tuple[Step, ...], tuple[Step, ...]]]] = {
    None: NOT_PROVISIONED,
    Phase.PENDING: NOT_PROVISIONED,
    Phase.FAILED: NOT_PROVISIONED,
    Phase.READY: {
        (False, False): ((P, J), (A, J)),
        (False, True): ((P, J), (A, J)),
        (True, False): ((J,), (J,)),
        (True, True): (NOTHING, NOTHING),
    },
    Phase.JOB_ENDED: {
        (False, False): ((J,), (J,)),
        (False, True): (NOTHING, NOTHING),
        (True, False): ((J,), (J,)),
        (True, True): (NOTHING, NOTHING),
    },
    Phase.CLEANED: SETTLED,
    Phase.REVOKED: SETTLED,
}
ROWS = [
    pytest.param(
        Situation(phase, job_ended=ended, keep=keep, deleting=deleting),
        trigger,
        NOTHING if deleting else expected[trigger is Trigger.RECHECK],
        id=f"{phase or 'none'}-ended={ended}-keep={keep}-deleting={deleting}-{trigger.value}",
    )
    for phase, by_case in TABLE.items()
    for (ended, keep), expected in by_case.items()
    for deleting in (False, True)
    for trigger in Trigger
]


def test_the_table_covers_every_situation() -> None:
    assert set(TABLE) == {None, *Phase}
    assert all(set(cases) == set(NOT_PROVISIONED) for cases in TABLE.values())
    assert len(ROWS) == (len(Phase) + 1) * 4 * 2 * len(Trigger)


@pytest.mark.parametrize(("situation", "trigger", "expected"), ROWS)
def test_next_steps(situation: Situation, trigger: Trigger, expected: tuple[Step, ...]) -> None:
    assert next_steps(situation, trigger) == expected


def test_the_situation_is_read_from_the_object_as_stored() -> None:
    body: dict[str, Any] = {
        "metadata": {"name": "x", "deletionTimestamp": "2030-01-01T00:00:00Z"},
        "spec": {"onJobEnd": "Keep"},
        "status": {"phase": "JobEnded", "jobEndedAt": "2030-01-01T00:00:00Z"},
    }
    assert Situation.of_body(body) == Situation(
        Phase.JOB_ENDED, job_ended=True, keep=True, deleting=True
    )
    # No status, no spec: not provisioned; a hand-edited phase counts as none.
    assert Situation.of_body({"metadata": {}}) == Situation(None)
    edited = {"metadata": {}, "status": {"phase": "Bogus"}, "spec": {"onJobEnd": "Delete"}}
    assert next_steps(Situation.of_body(edited), Trigger.RECHECK) == (P, J)


# -- one clock ----------------------------------------------------------------------------------

T0 = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def test_a_condition_transition_is_timed_by_the_given_now() -> None:
    first = k8s.condition("Ready", False, "EtcdAlarm", "m", 1, None, now=T0)
    assert first["lastTransitionTime"] == "2030-01-02T03:04:05Z"
    later = T0 + datetime.timedelta(hours=1)
    # Same status: the transition time stays; another status: it moves to now.
    same = k8s.condition("Ready", False, "Other", "m2", 2, [first], now=later)
    assert same["lastTransitionTime"] == "2030-01-02T03:04:05Z"
    flipped = k8s.condition("Ready", True, "Provisioned", "m", 2, [first], now=later)
    assert flipped["lastTransitionTime"] == "2030-01-02T04:04:05Z"
    # Any time zone is written as UTC.
    east = datetime.timezone(datetime.timedelta(hours=2))
    assert k8s.iso(T0.astimezone(east)) == "2030-01-02T03:04:05Z"


class FakeClock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


def ignore_event(body: Any, *, type: str, reason: str, message: str) -> None:
    pass


@pytest.fixture
def timed_reconciler(kubeconfig: Path, etcd: EtcdCluster) -> Iterator[Reconciler]:
    """A direct-mode Reconciler on the emulator and real etcd, with a :class:`FakeClock`."""
    settings = load_settings(
        {
            "ETHA_OPERATOR_ETCD_ENDPOINTS": ",".join(etcd.urls),
            "ETHA_OPERATOR_ETCD_PASSWORD": etcd.root_password,
            "ETHA_OPERATOR_MODE": "direct",
        }
    )
    client = EtcdClient(
        etcd.urls, username="root", password=etcd.root_password, timeout=settings.etcd_timeout
    )
    kube_api = k8s.KubeApi(kubernetes.config.new_client_from_config(str(kubeconfig)))
    reconciler = Reconciler(settings, EtcdAdmin(client), kube_api, ignore_event, FakeClock(T0))
    yield reconciler
    reconciler.admin.close()
    kube_api.close()


@pytest.mark.timeout(60)
def test_every_timestamp_comes_from_the_reconcilers_clock(
    kube: EmulatorServer, timed_reconciler: Reconciler, etcd: EtcdCluster, k8s_ns: str
) -> None:
    reconciler = timed_reconciler
    clock = reconciler.clock
    assert isinstance(clock, FakeClock)
    kube.create("batch/v1", "jobs", job("timed-job"), k8s_ns)
    body = kube.create(
        API, PLURAL, kvnamespace("timed", "timed-job", ttlSecondsAfterJobEnd=60), k8s_ns
    )
    try:
        status = reconciler.provision(body)
        assert status is not None and status["phase"] == "Ready"
        [ready] = kube.get(API, PLURAL, "timed", k8s_ns)["status"]["conditions"]
        assert (ready["type"], ready["status"]) == ("Ready", "True")
        assert ready["lastTransitionTime"] == "2030-01-02T03:04:05Z"

        prefix = status["keyPrefix"]
        with root_client(etcd) as client:
            client.put(f"{prefix}/step".encode(), b"1")
        # The job goes away: its end is stamped with the clock, not the wall clock.
        clock.advance(10)
        kube.delete("batch/v1", "jobs", "timed-job", k8s_ns)
        reconciler.check_job(kube.get(API, PLURAL, "timed", k8s_ns))
        ended = kube.get(API, PLURAL, "timed", k8s_ns)["status"]
        assert (ended["phase"], ended["jobEndReason"]) == ("JobEnded", "Deleted")
        assert ended["jobEndedAt"] == "2030-01-02T03:04:15Z"
        # The TTL runs on the same clock: 59 s later nothing is cleaned, 60 s later it is.
        clock.advance(59)
        reconciler.check_job(kube.get(API, PLURAL, "timed", k8s_ns))
        assert kube.get(API, PLURAL, "timed", k8s_ns)["status"]["phase"] == "JobEnded"
        assert count_keys(etcd, prefix) == 1
        clock.advance(1)
        reconciler.check_job(kube.get(API, PLURAL, "timed", k8s_ns))
        cleaned = kube.get(API, PLURAL, "timed", k8s_ns)["status"]
        assert (cleaned["phase"], cleaned["keysDeleted"]) == ("Cleaned", 1)
        assert cleaned["keysCleanedAt"] == "2030-01-02T03:05:15Z"
        assert count_keys(etcd, prefix) == 0
        # The condition set when it became Ready kept its time throughout.
        assert cleaned["conditions"] == [ready]
    finally:
        reconciler.cleanup(kube.get(API, PLURAL, "timed", k8s_ns))
