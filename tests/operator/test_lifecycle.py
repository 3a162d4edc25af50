"""The KVNamespace lifecycle with the real operator, real etcd (auth on) and the emulator.

create -> Ready with working, isolated credentials; job end -> one range delete and the
count in status; policies Keep/Revoke; TTL; delete -> finalizer; no password anywhere.
"""

from __future__ import annotations

import base64
import json

import pytest
from etha_operator.etcd_admin import READWRITE, EtcdAdmin, Grant

from etha.kvstore.errors import PermissionDeniedError
from tests.operator.helpers import (
    API,
    PLURAL,
    count_keys,
    create_ready,
    etcd_roles,
    etcd_users,
    event_reasons,
    finish_job,
    job,
    kvnamespace,
    root_client,
    secret_env,
    store_from_secret,
    wait_phase,
    write_keys,
)
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorProcess, wait_for

pytestmark = pytest.mark.timeout(120)


def test_create_gives_ready_status_and_an_owned_secret_with_working_credentials(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    created = kube.create(API, PLURAL, kvnamespace("train", "train-job"), k8s_ns)
    uid = created["metadata"]["uid"]
    obj = wait_phase(kube, k8s_ns, "train", "Ready")
    status = obj["status"]
    assert status["keyPrefix"] == f"{k8s_ns}.train.{uid[:8]}"
    assert status["etcdUser"] == status["etcdRole"] == f"etha-{uid}"
    assert status["secretName"] == "train-etha-kv"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    ready = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    assert "etha.io/cleanup" in obj["metadata"]["finalizers"]

    secret = kube.get("v1", "secrets", "train-etha-kv", k8s_ns)
    [owner] = secret["metadata"]["ownerReferences"]
    assert owner["uid"] == uid and owner["kind"] == "KVNamespace" and owner["controller"] is True
    env = secret_env(kube, k8s_ns, "train-etha-kv")
    assert set(env) == {
        "ETHA_KV_BACKEND",
        "ETHA_KV_NAMESPACE",
        "ETHA_KV_COMPONENT",
        "ETHA_KV_ENDPOINTS",
        "ETHA_KV_TIMEOUT",
        "ETHA_KV_USERNAME",
        "ETHA_KV_PASSWORD",
    }
    assert env["ETHA_KV_NAMESPACE"] == status["keyPrefix"]
    assert env["ETHA_KV_USERNAME"] == status["etcdUser"]
    assert len(env["ETHA_KV_PASSWORD"]) >= 32

    # The role grants read-write on exactly "<prefix>/" and nothing else.
    with root_client(etcd) as client:
        grants = EtcdAdmin(client).role_grants(status["etcdRole"])
    prefix = status["keyPrefix"].encode()
    assert grants == [Grant(prefix + b"/", prefix + b"0", READWRITE)]

    with store_from_secret(kube, k8s_ns, "train-etha-kv") as store:
        store.set("rank:0/ready", "1")
        assert store.get("rank:0/ready") == b"1"
    assert count_keys(etcd, status["keyPrefix"]) == 1


def test_two_kvnamespaces_are_isolated_from_each_other(
    kube: EmulatorServer, operator: OperatorProcess, k8s_ns: str
) -> None:
    kube.create(API, PLURAL, kvnamespace("a", "job-a"), k8s_ns)
    kube.create(API, PLURAL, kvnamespace("b", "job-b"), k8s_ns)
    prefix_a = wait_phase(kube, k8s_ns, "a", "Ready")["status"]["keyPrefix"]
    prefix_b = wait_phase(kube, k8s_ns, "b", "Ready")["status"]["keyPrefix"]
    assert prefix_a != prefix_b

    with (
        store_from_secret(kube, k8s_ns, "a-etha-kv") as a,
        store_from_secret(kube, k8s_ns, "b-etha-kv") as b,
    ):
        a.set("shared", "from-a")
        b.set("shared", "from-b")
        assert a.get("shared") == b"from-a"
        assert b.get("shared") == b"from-b"

    # A's credentials pointed at B's prefix: etcd refuses every operation.
    with store_from_secret(kube, k8s_ns, "a-etha-kv", ETHA_KV_NAMESPACE=prefix_b) as intruder:
        attempts = {
            "get": lambda: intruder.get("shared"),
            "set": lambda: intruder.set("shared", "overwritten"),
            "delete": lambda: intruder.delete("shared"),
        }
        for attempt in attempts.values():
            with pytest.raises(PermissionDeniedError):
                attempt()
    with store_from_secret(kube, k8s_ns, "b-etha-kv") as b:
        assert b.get("shared") == b"from-b"


def test_job_completion_deletes_every_key_with_one_range_delete(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    prefix = create_ready(kube, k8s_ns, "trainer")["keyPrefix"]
    other = create_ready(kube, k8s_ns, "bystander", "other-job")["keyPrefix"]
    # More keys than etcd allows in one transaction (128): one DeleteRange handles any count.
    with store_from_secret(kube, k8s_ns, "trainer-etha-kv") as store:
        for i in range(300):
            store.set(f"rank:{i}/ready", "1")
        store.set("x", "1", component="other-component")
    with store_from_secret(kube, k8s_ns, "bystander-etha-kv") as store:
        store.set("keep-me", "1")
    assert count_keys(etcd, prefix) == 301

    finish_job(kube, k8s_ns, "trainer")
    obj = wait_phase(kube, k8s_ns, "trainer", "Cleaned")
    status = obj["status"]
    assert status["keysDeleted"] == 301
    assert status["jobEndReason"] == "Complete"
    assert status["jobEndedAt"] and status["keysCleanedAt"]
    assert count_keys(etcd, prefix) == 0
    assert count_keys(etcd, other) == 1
    reasons = wait_for(
        lambda: (r := event_reasons(kube, k8s_ns, "trainer")) and "KeysDeleted" in r and r,
        what="a KeysDeleted event",
    )
    assert "JobEnded" in reasons
    [deleted_event] = [
        e for e in kube.events_for("trainer", k8s_ns) if e["reason"] == "KeysDeleted"
    ]
    assert "301 keys" in deleted_event["message"]
    # Delete keeps the credentials: the workers of a finished job may still be shutting down.
    assert f"etha-{obj['metadata']['uid']}" in etcd_users(etcd)


def test_keep_policy_keeps_the_keys(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    prefix = create_ready(kube, k8s_ns, "keeper", onJobEnd="Keep")["keyPrefix"]
    with store_from_secret(kube, k8s_ns, "keeper-etha-kv") as store:
        store.set("result", "42")
    finish_job(kube, k8s_ns, "keeper", "Failed")
    status = wait_phase(kube, k8s_ns, "keeper", "JobEnded")["status"]
    assert status["jobEndReason"] == "Failed"
    assert "keysDeleted" not in status
    assert count_keys(etcd, prefix) == 1


def test_revoke_policy_deletes_keys_user_role_and_secret_after_the_ttl(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    status = create_ready(kube, k8s_ns, "revoker", onJobEnd="Revoke", ttlSecondsAfterJobEnd=2)
    with store_from_secret(kube, k8s_ns, "revoker-etha-kv") as store:
        store.set("a", "1")
    env = secret_env(kube, k8s_ns, "revoker-etha-kv")
    finish_job(kube, k8s_ns, "revoker")
    final = wait_phase(kube, k8s_ns, "revoker", "Revoked")["status"]
    assert final["keysDeleted"] == 1
    ended_at, cleaned_at = final["jobEndedAt"], final["keysCleanedAt"]
    # The TTL is a lower bound on when the policy runs (timestamps have 1 s resolution).
    from etha_operator.k8s import parse_time

    t0, t1 = parse_time(ended_at), parse_time(cleaned_at)
    assert t0 is not None and t1 is not None and (t1 - t0).total_seconds() >= 2
    assert status["etcdUser"] not in etcd_users(etcd)
    assert status["etcdRole"] not in etcd_roles(etcd)
    assert kube.find("v1", "secrets", "revoker-etha-kv", k8s_ns) is None
    from etha.kvstore import from_env

    with pytest.raises(PermissionDeniedError), from_env(env) as store:
        store.get("a")


def test_deleted_job_counts_as_ended(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    create_ready(kube, k8s_ns, "vanishing")
    # The operator records the Job's uid once it has seen it; only then does absence mean
    # "deleted" rather than "not created yet".
    wait_for(
        lambda: (kube.get(API, PLURAL, "vanishing", k8s_ns).get("status") or {}).get("jobUID"),
        what="status.jobUID",
    )
    with store_from_secret(kube, k8s_ns, "vanishing-etha-kv") as store:
        store.set("k", "v")
    kube.delete("batch/v1", "jobs", "vanishing", k8s_ns)
    status = wait_phase(kube, k8s_ns, "vanishing", "Cleaned")["status"]
    assert status["jobEndReason"] == "Deleted"
    assert status["keysDeleted"] == 1


def test_a_job_that_does_not_exist_yet_is_not_treated_as_ended(
    kube: EmulatorServer, operator: OperatorProcess, k8s_ns: str
) -> None:
    create_ready(kube, k8s_ns, "early", "later-job")
    kube.create("batch/v1", "jobs", job("later-job"), k8s_ns)
    wait_for(
        lambda: (kube.get(API, PLURAL, "early", k8s_ns).get("status") or {}).get("jobUID"),
        what="status.jobUID",
    )
    assert kube.get(API, PLURAL, "early", k8s_ns)["status"]["phase"] == "Ready"


def test_delete_runs_the_finalizer(
    kube: EmulatorServer, operator: OperatorProcess, etcd: EtcdCluster, k8s_ns: str
) -> None:
    status = create_ready(kube, k8s_ns, "doomed", "doomed-job")
    write_keys(kube, k8s_ns, "doomed-etha-kv", 10)
    assert status["etcdUser"] in etcd_users(etcd)

    kube.delete(API, PLURAL, "doomed", k8s_ns)
    wait_for(lambda: kube.find(API, PLURAL, "doomed", k8s_ns) is None, what="the object to go")
    assert count_keys(etcd, status["keyPrefix"]) == 0
    assert status["etcdUser"] not in etcd_users(etcd)
    assert status["etcdRole"] not in etcd_roles(etcd)
    assert kube.find("v1", "secrets", "doomed-etha-kv", k8s_ns) is None
    assert "CleanedUp" in wait_for(
        lambda: (r := event_reasons(kube, k8s_ns, "doomed")) and "CleanedUp" in r and r,
        what="a CleanedUp event",
    )


def test_no_password_in_logs_events_or_status(
    kube: EmulatorServer, operator: OperatorProcess, k8s_ns: str
) -> None:
    """Runs a whole lifecycle (operator at DEBUG) and greps everything for the password."""
    create_ready(kube, k8s_ns, "secretive", onJobEnd="Revoke")
    password = secret_env(kube, k8s_ns, "secretive-etha-kv")["ETHA_KV_PASSWORD"]
    encoded = base64.b64encode(password.encode()).decode()
    finish_job(kube, k8s_ns, "secretive")
    final = wait_phase(kube, k8s_ns, "secretive", "Revoked")
    kube.delete(API, PLURAL, "secretive", k8s_ns)
    wait_for(lambda: kube.find(API, PLURAL, "secretive", k8s_ns) is None, what="deletion")

    seen = {
        "operator log": operator.log(),
        "events": json.dumps(kube.list("v1", "events")),
        "status": json.dumps(final["status"]),
        "KVNamespace objects": json.dumps(kube.list(API, PLURAL)),
    }
    assert "DEBUG" in seen["operator log"]  # the log really is verbose
    for where, text in seen.items():
        assert password not in text, f"password found in {where}"
        assert encoded not in text, f"base64 password found in {where}"
