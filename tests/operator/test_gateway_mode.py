"""The operator in gateway mode, end to end with a real ``etha-gateway`` process.

The gateway logs in to etcd as the least-privilege user the chart's bootstrap script
makes (read-write on the tenant keyspace, read-only on the registry), so these tests
also prove that this role is enough. Workers get only the Secret's variables, which
name the gateway, never etcd. This module runs its own etcd: its operator runs the
audit, which must not see other modules' leftovers.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from etha.gateway.tenancy import TenantRecord, hash_secret, new_secret, tenant_key
from etha.kvstore import from_env
from etha.kvstore.errors import PermissionDeniedError, QuotaExceededError
from tests.operator.helpers import (
    API,
    PLURAL,
    count_keys,
    create_ready,
    event_reasons,
    finish_job,
    kvnamespace,
    root_client,
    secret_env,
    store_from_secret,
    wait_phase,
)
from tests.support.etcd_server import EtcdCluster
from tests.support.gateway import GatewayProcess
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.own_etcd]

PASSWORD = "ETHA_KV_PASSWORD"


@pytest.fixture(scope="module")
def operator(operator_factory: OperatorFactory, gateway: GatewayProcess) -> OperatorProcess:
    gateways = [f"http://{gateway.endpoint}"]
    return operator_factory(gateway=gateways, ETHA_OPERATOR_AUDIT_INTERVAL="1").start()


def _record(etcd: EtcdCluster, user: str) -> tuple[TenantRecord | None, bytes]:
    with root_client(etcd) as client:
        kvs = client.range(tenant_key(user)).kvs
    if not kvs:
        return None, b""
    return TenantRecord.from_json(kvs[0].value), bytes(kvs[0].value)


def _refused(env: dict[str, str]) -> str:
    """Use ``env`` once more: the gateway must refuse it (at log-in or at the write)."""
    try:
        store = from_env(env)
    except PermissionDeniedError as exc:
        return type(exc).__name__
    try:
        store.set("after-revocation", "x")
    except PermissionDeniedError as exc:
        return type(exc).__name__
    finally:
        store.close(cleanup=False)
    raise AssertionError("the revoked credentials still write through the gateway")


def test_lifecycle_through_the_gateway(
    kube: EmulatorServer,
    etcd: EtcdCluster,
    gateway: GatewayProcess,
    operator: OperatorProcess,
    k8s_ns: str,
) -> None:
    status = create_ready(kube, k8s_ns, "train", quotas={"keys": 50})
    uid = kube.find(API, PLURAL, "train", k8s_ns)["metadata"]["uid"]
    user, prefix = f"etha-{uid}", status["keyPrefix"]
    assert status["etcdUser"] == user and "etcdRole" not in status
    assert "through the etha gateway" in status["message"]

    # The Secret names the gateway, never etcd; the registry holds only the hash.
    env = secret_env(kube, k8s_ns, "train-etha-kv")
    assert env["ETHA_KV_ENDPOINTS"] == f"http://{gateway.endpoint}"
    assert env["ETHA_KV_USERNAME"] == user and env["ETHA_KV_NAMESPACE"] == prefix
    secret = env[PASSWORD]
    record, raw = _record(etcd, user)
    assert record is not None
    assert record.prefix == prefix and record.owner == f"{k8s_ns}/train"
    assert record.secret_sha256 == hash_secret(secret)
    assert dict(record.quotas) == {"keys": 50}
    assert secret.encode() not in raw
    raw_secret = json.dumps(kube.get("v1", "secrets", "train-etha-kv", k8s_ns))
    for text in (raw_secret, *env.values()):
        assert record.secret_sha256 not in text
    # No etcd user exists for the tenant: the credentials do not open etcd itself.
    assert user not in etcd.etcdctl("user", "list").stdout.split()
    with pytest.raises(PermissionDeniedError):
        from_env({**env, "ETHA_KV_ENDPOINTS": etcd.urls[0]}).set("direct", "x")

    # A worker with only the Secret's variables writes through the gateway.
    with store_from_secret(kube, k8s_ns, "train-etha-kv") as store:
        for rank in range(5):
            store.set(f"rank:{rank}/ready", "1")
        assert store.get("rank:3/ready") == b"1"
    assert count_keys(etcd, prefix) == 5

    # Job end: one DeleteRange by the operator; the credentials outlive it (Delete).
    finish_job(kube, k8s_ns, "train")
    cleaned = wait_phase(kube, k8s_ns, "train", "Cleaned")["status"]
    assert cleaned["keysDeleted"] == 5 and count_keys(etcd, prefix) == 0
    assert _record(etcd, user)[0] is not None

    # Deletion: the record goes, and the gateway refuses the same credentials at once.
    kube.delete(API, PLURAL, "train", k8s_ns)
    wait_for(lambda: kube.find(API, PLURAL, "train", k8s_ns) is None, what="deletion")
    assert _record(etcd, user)[0] is None
    assert _refused(env) == "PermissionDeniedError"
    assert "CleanedUp" in event_reasons(kube, k8s_ns, "train")

    # Nothing secret in the log, the Events or any status the operator ever wrote.
    assert kube.emulator is not None
    statuses = [
        event["object"].get("status")
        for _, event in kube.emulator.store.history[("etha.io", "kvnamespaces")]
    ]
    seen = {
        "log": operator.log(),
        "events": json.dumps(kube.list("v1", "events", k8s_ns)),
        "statuses": json.dumps(statuses),
    }
    for where, text in seen.items():
        for value in (secret, base64.b64encode(secret.encode()).decode()):
            assert value not in text, f"the secret is in the {where}"


def test_a_secret_that_does_not_match_the_record_is_replaced(
    kube: EmulatorServer, etcd: EtcdCluster, operator: OperatorProcess, k8s_ns: str
) -> None:
    """Crash safety: the record is written before the Secret, so a Secret whose secret
    does not match the record (a crash in between, or tampering) gets a new one, and
    the gateway refuses the old one."""
    create_ready(kube, k8s_ns, "rot")
    first = secret_env(kube, k8s_ns, "rot-etha-kv")
    user = first["ETHA_KV_USERNAME"]
    # What a crash between "record written" and "Secret written" leaves behind.
    record, _ = _record(etcd, user)
    assert record is not None
    moved = TenantRecord(user, record.prefix, hash_secret(new_secret()), {}, record.owner)
    with root_client(etcd) as client:
        client.put(tenant_key(user), moved.to_json())
    kube.patch(API, PLURAL, "rot", {"spec": {"ttlSecondsAfterJobEnd": 5}}, k8s_ns)
    wait_for(
        lambda: secret_env(kube, k8s_ns, "rot-etha-kv")[PASSWORD] != first[PASSWORD],
        what="a new secret",
    )
    second = secret_env(kube, k8s_ns, "rot-etha-kv")
    assert _record(etcd, user)[0].secret_sha256 == hash_secret(second[PASSWORD])  # type: ignore[union-attr]
    with store_from_secret(kube, k8s_ns, "rot-etha-kv") as store:
        store.set("k", "v")
    assert _refused(first) == "PermissionDeniedError"


def test_spec_quotas_reach_the_gateway(
    kube: EmulatorServer, etcd: EtcdCluster, operator: OperatorProcess, k8s_ns: str
) -> None:
    create_ready(kube, k8s_ns, "small", quotas={"keys": 3})
    with store_from_secret(kube, k8s_ns, "small-etha-kv") as store:
        for i in range(3):
            store.set(f"k{i}", "v")
        with pytest.raises(QuotaExceededError) as excinfo:
            store.set("k3", "v")
        assert excinfo.value.quota == "keys"
    # Raising the quota updates the record; the tenant's client logs in again by itself.
    kube.patch(API, PLURAL, "small", {"spec": {"quotas": {"keys": 10}}}, k8s_ns)
    user = secret_env(kube, k8s_ns, "small-etha-kv")["ETHA_KV_USERNAME"]
    wait_for(
        lambda: (
            (_record(etcd, user)[0] or TenantRecord(user, "x", "0" * 64)).quotas == {"keys": 10}
        ),
        what="the new quota in the record",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with store_from_secret(kube, k8s_ns, "small-etha-kv") as store:
                store.set("k3", "v")
            break
        except QuotaExceededError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the gateway's registry watch applies the change


def test_revoke_deletes_the_record_and_the_secret(
    kube: EmulatorServer, etcd: EtcdCluster, operator: OperatorProcess, k8s_ns: str
) -> None:
    create_ready(kube, k8s_ns, "rv", onJobEnd="Revoke")
    env = secret_env(kube, k8s_ns, "rv-etha-kv")
    with store_from_secret(kube, k8s_ns, "rv-etha-kv") as store:
        store.set("k", "v")
    finish_job(kube, k8s_ns, "rv")
    status = wait_phase(kube, k8s_ns, "rv", "Revoked")["status"]
    assert "revoked tenant" in status["message"]
    assert _record(etcd, env["ETHA_KV_USERNAME"])[0] is None
    assert kube.find("v1", "secrets", "rv-etha-kv", k8s_ns) is None
    assert _refused(env) == "PermissionDeniedError"


def test_a_prefix_held_by_a_record_is_not_handed_out_again(
    kube: EmulatorServer, operator: OperatorProcess, k8s_ns: str
) -> None:
    create_ready(kube, k8s_ns, "owner", keyPrefix=f"shared-{k8s_ns}")
    kube.create(API, PLURAL, kvnamespace("thief", "owner", keyPrefix=f"shared-{k8s_ns}"), k8s_ns)
    failed = wait_phase(kube, k8s_ns, "thief", "Failed")["status"]
    assert "already owned by another KVNamespace (tenant etha-" in failed["message"]
    assert kube.find("v1", "secrets", "thief-etha-kv", k8s_ns) is None


def test_the_audit_removes_orphaned_records_and_their_keys(
    kube: EmulatorServer, etcd: EtcdCluster, operator: OperatorProcess
) -> None:
    """A record whose KVNamespace is gone (a finalizer removed by hand, a crash)."""
    import uuid

    user = f"etha-{uuid.uuid4()}"
    prefix = f"orphan-{uuid.uuid4().hex[:8]}"
    record = TenantRecord(user, prefix, hash_secret(new_secret()), {}, "gone/gone")
    with root_client(etcd) as client:
        client.put(record.key, record.to_json())
        client.put(f"{prefix}/default/k".encode(), b"v")
        # Not the operator's: never touched.
        foreign = TenantRecord("someone-else", "foreign", hash_secret("x"), {}, "hand/made")
        client.put(foreign.key, foreign.to_json())
    wait_for(lambda: _record(etcd, user)[0] is None, timeout=30, what="the audit")
    assert count_keys(etcd, prefix) == 0
    assert _record(etcd, "someone-else")[0] is not None
    assert "audit: removed orphaned tenant record" in operator.log()
