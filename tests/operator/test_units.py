"""The operator's plain building blocks: settings, naming, and etcd administration
(against a real etcd with auth)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etha_operator import etcd_version, model
from etha_operator.etcd_admin import READWRITE, EtcdAdmin, Grant, prefix_grant
from etha_operator.settings import load_settings
from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2

from etha.gateway.tenancy import QUOTA_NAMES, TenantRecord, hash_secret, tenant_key
from etha.kvstore.errors import ConfigurationError, PermissionDeniedError
from etha.kvstore.etcd_client import EtcdClient
from etha.kvstore.keys import validate_name
from tests.support.etcd_server import EtcdCluster

BASE = {
    "ETHA_OPERATOR_ETCD_ENDPOINTS": "http://etcd-0:2379,http://etcd-1:2379",
    "ETHA_OPERATOR_ETCD_PASSWORD": "root-secret",
    "ETHA_OPERATOR_MODE": "direct",
}
GATEWAY = {
    "ETHA_OPERATOR_ETCD_ENDPOINTS": "http://etcd-0:2379",
    "ETHA_OPERATOR_ETCD_PASSWORD": "root-secret",
    "ETHA_OPERATOR_GATEWAY_ENDPOINTS": "https://etha-gateway.etha-system.svc:2379",
}
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


# -- settings ---------------------------------------------------------------------------


def test_settings_defaults() -> None:
    cfg = load_settings(BASE)
    assert [str(e) for e in cfg.etcd_endpoints] == ["etcd-0:2379", "etcd-1:2379"]
    assert cfg.worker_endpoints == cfg.etcd_endpoints
    assert cfg.etcd_username == "root" and not cfg.etcd_tls
    assert cfg.clusterwide and not cfg.webhook_enabled
    assert (cfg.webhook_port, cfg.health_port) == (9443, 8080)
    assert (cfg.audit_interval, cfg.cleanup_deadline) == (300.0, 30.0)
    assert "root-secret" not in repr(cfg)
    assert cfg.mode == "direct" and not cfg.allow_unsafe_direct


def test_gateway_mode_is_the_default_and_workers_get_the_gateway(tmp_path: Path) -> None:
    ca = tmp_path / "gateway-ca.pem"
    ca.write_text(PEM)
    cfg = load_settings({**GATEWAY, "ETHA_OPERATOR_GATEWAY_CA_FILE": str(ca)})
    assert cfg.mode == "gateway" and cfg.gateway_mode
    endpoints, tls = cfg.workers_reach()
    assert [str(e) for e in endpoints] == ["etha-gateway.etha-system.svc:2379"] and tls
    assert cfg.ca_pem() == PEM
    assert PEM not in repr(cfg)
    plain = load_settings({**GATEWAY, "ETHA_OPERATOR_GATEWAY_ENDPOINTS": "gw-0:2379,gw-1:2379"})
    assert plain.workers_reach()[1] is False and plain.ca_pem() is None
    inline = load_settings({**GATEWAY, "ETHA_OPERATOR_GATEWAY_CA_PEM": PEM})
    assert inline.gateway_tls and (inline.ca_pem() or "").strip() == PEM.strip()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (
            {**GATEWAY, "ETHA_OPERATOR_GATEWAY_ENDPOINTS": ""},
            "ETHA_OPERATOR_GATEWAY_ENDPOINTS is not set",
        ),
        ({**GATEWAY, "ETHA_OPERATOR_MODE": "proxy"}, "ETHA_OPERATOR_MODE"),
        ({**GATEWAY, "ETHA_OPERATOR_WORKER_ENDPOINTS": "etcd:2379"}, "applies to direct mode only"),
        ({**GATEWAY, "ETHA_OPERATOR_GATEWAY_CA_PEM": "not a pem"}, "ETHA_OPERATOR_GATEWAY_CA_PEM"),
        (
            {
                **GATEWAY,
                "ETHA_OPERATOR_GATEWAY_ENDPOINTS": "http://gw:2379",
                "ETHA_OPERATOR_GATEWAY_CA_PEM": PEM,
            },
            "use https:// endpoints",
        ),
        (
            {**GATEWAY, "ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT": "maybe"},
            "ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT",
        ),
    ],
)
def test_gateway_settings_errors_name_the_problem(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        load_settings(env)


# -- direct mode's etcd version gate ---------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "named"),
    [
        (
            "3.5.1",
            {
                "NOSPACE",
                "GHSA-rfx7-8w68-q57q",
                "GHSA-q8m4-xhhv-38mg",
                "GHSA-x35m-3gp4-4fh5",
                "GHSA-xg4h-6gfc-h4m8",
            },
        ),
        ("3.5.28", {"NOSPACE", "GHSA-x35m-3gp4-4fh5", "GHSA-xg4h-6gfc-h4m8"}),
        ("3.5.30", {"NOSPACE", "GHSA-xg4h-6gfc-h4m8"}),
        ("3.5.33", {"NOSPACE"}),  # every 3.5 release skips auth under NOSPACE
        (
            "3.4.20",
            {
                "GHSA-rfx7-8w68-q57q",
                "GHSA-q8m4-xhhv-38mg",
                "GHSA-x35m-3gp4-4fh5",
                "GHSA-xg4h-6gfc-h4m8",
            },
        ),
        ("3.6.11", set()),
        ("v3.7.0", set()),
    ],
)
def test_direct_mode_refuses_versions_with_known_bypasses(version: str, named: set[str]) -> None:
    found = {a.id for a in etcd_version.advisories_for(etcd_version.parse_version(version))}
    assert found == named
    reason = etcd_version.refusal("etcd-0:2379", version)
    if named:
        assert reason is not None
        for advisory in named:
            assert advisory in reason
        assert "ETHA_OPERATOR_MODE=gateway" in reason
        assert "ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT=true" in reason
    else:
        assert reason is None


def test_a_malformed_version_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match=r"not major\.minor\.patch"):
        etcd_version.parse_version("latest")


# -- spec.quotas --------------------------------------------------------------------------


def test_spec_quotas_map_to_the_record_names() -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "name": "j"}
    spec = model.parse_spec(
        {"jobRef": job, "quotas": {"bytes": 1 << 20, "valueBytes": 4096, "requestsPerSecond": 0}}
    )
    assert spec.quotas == {"bytes": 1 << 20, "value_bytes": 4096, "requests_per_second": 0}
    assert set(model.QUOTA_FIELDS.values()) == set(QUOTA_NAMES)
    assert model.parse_spec({"jobRef": job}).quotas == {}
    for bad, complaint in (
        ({"bytez": 1}, "unknown fields"),
        ({"keys": -1}, "spec.quotas.keys"),
        ({"keys": True}, "spec.quotas.keys"),
        ({"keys": "10"}, "spec.quotas.keys"),
        ([1], "must be a mapping"),
    ):
        with pytest.raises(model.SpecError, match=complaint):
            model.parse_spec({"jobRef": job, "quotas": bad})


def test_settings_worker_endpoints_namespaces_and_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_settings(
        {
            **BASE,
            "ETHA_OPERATOR_ETCD_ENDPOINTS": "https://etcd.internal:2379",
            "ETHA_OPERATOR_WORKER_ENDPOINTS": "https://etcd.example.com:443",
            "ETHA_OPERATOR_ETCD_CA_FILE": str(ca),
            "ETHA_OPERATOR_NAMESPACES": "team-a, team-b",
        }
    )
    assert cfg.etcd_tls and cfg.worker_tls
    assert [str(e) for e in cfg.worker_endpoints] == ["etcd.example.com:443"]
    assert cfg.namespaces == ("team-a", "team-b") and not cfg.clusterwide
    assert cfg.ca_pem() == "-----BEGIN CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ETHA_OPERATOR_ETCD_ENDPOINTS": ""}, "ETHA_OPERATOR_ETCD_ENDPOINTS"),
        ({"ETHA_OPERATOR_ETCD_ENDPOINTS": "ftp://x:1"}, "ETHA_OPERATOR_ETCD_ENDPOINTS"),
        ({"ETHA_OPERATOR_WORKER_ENDPOINTS": "nohostport"}, "ETHA_OPERATOR_WORKER_ENDPOINTS"),
        ({"ETHA_OPERATOR_ETCD_PASSWORD": ""}, "ETHA_OPERATOR_ETCD_PASSWORD"),
        ({"ETHA_OPERATOR_WEBHOOK_PORT": "70000"}, "ETHA_OPERATOR_WEBHOOK_PORT"),
        ({"ETHA_OPERATOR_HEALTH_PORT": "http"}, "ETHA_OPERATOR_HEALTH_PORT"),
        ({"ETHA_OPERATOR_AUDIT_INTERVAL": "-1"}, "ETHA_OPERATOR_AUDIT_INTERVAL"),
        ({"ETHA_OPERATOR_CLEANUP_DEADLINE": "0"}, "ETHA_OPERATOR_CLEANUP_DEADLINE"),
        ({"ETHA_OPERATOR_CLEANUP_DEADLINE": "soon"}, "ETHA_OPERATOR_CLEANUP_DEADLINE"),
        ({"ETHA_OPERATOR_ETCD_CA_FILE": "/nonexistent/ca.pem"}, "ETHA_OPERATOR_ETCD_CA_FILE"),
        pytest.param(
            {"ETHA_OPERATOR_WEBHOOK_CERT_FILE": "/x.pem"},
            "ETHA_OPERATOR_WEBHOOK_KEY_FILE",
            id="a-certificate-without-its-key",
        ),
        ({"ETHA_OPERATOR_LOG_LEVEL": "LOUD"}, "ETHA_OPERATOR_LOG_LEVEL"),
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        load_settings({**BASE, **env})


# -- naming -----------------------------------------------------------------------------


def test_default_prefix_is_a_valid_unique_etha_namespace() -> None:
    uid_a, uid_b = str(uuid.uuid4()), str(uuid.uuid4())
    a = model.default_prefix("team-a", "train", uid_a)
    assert a == f"team-a.train.{uid_a[:8]}"
    assert a != model.default_prefix("team-a", "train", uid_b)
    long = model.default_prefix("n" * 63, "x" * 253, uid_a)
    assert len(long) == 128 and long.endswith(uid_a[:8])
    for prefix in (a, long):
        assert validate_name(prefix, "prefix") == prefix


def test_etcd_names_round_trip_and_reject_foreign_names() -> None:
    uid = str(uuid.uuid4())
    assert model.uid_of_etcd_name(model.etcd_name(uid)) == uid
    for foreign in ("root", "alice", "etha-", "etha-not-a-uid", f"xetha-{uid}"):
        assert model.uid_of_etcd_name(foreign) is None


# -- etcd administration (real etcd, auth on) -------------------------------------------


@pytest.fixture
def admin(etcd_auth: EtcdCluster) -> Iterator[EtcdAdmin]:
    client = EtcdClient(etcd_auth.urls, username="root", password=etcd_auth.root_password)
    yield EtcdAdmin(client)
    client.close()


def _name() -> str:
    return model.etcd_name(str(uuid.uuid4()))


def test_ensure_role_grants_exactly_the_prefix(admin: EtcdAdmin) -> None:
    role = _name()
    admin.client.call("Auth", "RoleAdd", etcdrpc.AuthRoleAddRequest(name=role))
    stray = auth_pb2.Permission(permType=auth_pb2.Permission.READ, key=b"", range_end=b"\0")
    admin.client.call(
        "Auth", "RoleGrantPermission", etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=stray)
    )
    admin.ensure_role(role, "p1")
    admin.ensure_role(role, "p1")  # idempotent
    assert admin.role_grants(role) == [Grant(b"p1/", b"p10", READWRITE)]
    assert admin.prefix_of_role(role) == "p1"
    assert admin.prefix_owner("p1", exclude="someone-else") == role
    assert admin.prefix_owner("p1", exclude=role) is None
    assert admin.delete_role(role) is True
    assert admin.delete_role(role) is False
    assert admin.role_grants(role) is None


def test_set_user_creates_then_resets_the_password(
    admin: EtcdAdmin, etcd_auth: EtcdCluster
) -> None:
    user = role = _name()
    prefix = f"u{uuid.uuid4().hex[:6]}"
    admin.ensure_role(role, prefix)
    assert admin.set_user(user, "first-password", role) is True
    admin.authenticate(user, "first-password")
    assert admin.set_user(user, "second-password", role) is False
    admin.authenticate(user, "second-password")
    with pytest.raises(PermissionDeniedError):
        admin.authenticate(user, "first-password")
    assert admin.user_roles(user) == [role]

    with EtcdClient(etcd_auth.urls, username=user, password="second-password") as worker:
        worker.put(f"{prefix}/default/k".encode(), b"v")
        with pytest.raises(PermissionDeniedError):
            worker.put(b"elsewhere/k", b"v")
    assert admin.delete_user(user) is True
    assert admin.delete_user(user) is False
    assert admin.user_roles(user) is None
    admin.delete_role(role)


def test_delete_keys_is_one_range_over_exactly_the_prefix(admin: EtcdAdmin) -> None:
    base = f"d{uuid.uuid4().hex[:6]}"
    for i in range(500):
        admin.client.put(f"{base}/c/k{i}".encode(), b"v")
    # Siblings that share the text prefix but not "<prefix>/" must survive.
    admin.client.put(f"{base}x/c/k".encode(), b"v")
    admin.client.put(f"{base}".encode(), b"v")
    assert admin.delete_keys(base) == 500
    assert admin.delete_keys(base) == 0
    assert admin.client.range(f"{base}x/c/k".encode()).count == 1
    assert admin.client.range(base.encode()).count == 1


def test_prefix_grant_shape() -> None:
    assert prefix_grant("abc") == Grant(b"abc/", b"abc0", READWRITE)


# -- the tenant registry (real etcd) ----------------------------------------------------


def test_records_round_trip_and_claim_their_prefix(admin: EtcdAdmin) -> None:
    user = _name()
    prefix = f"r{uuid.uuid4().hex[:6]}"
    record = TenantRecord(user, prefix, hash_secret("s"), {"keys": 5}, owner="ns/name")
    assert admin.get_record(user) is None
    admin.put_record(record)
    assert admin.get_record(user) == record
    assert admin.list_records()[user] == record
    assert user in admin.list_record_names()
    # The prefix index reads records as well as roles: another owner is refused.
    admin.forget_owners()
    assert admin.prefix_owner(prefix, exclude=_name()) == user
    assert admin.prefix_owner(prefix, exclude=user) is None
    # The stored value holds the hash, never anything else that could log in.
    raw = admin.client.range(tenant_key(user)).kvs[0].value
    assert hash_secret("s").encode() in raw
    assert admin.delete_record(user) is True
    assert admin.delete_record(user) is False
    assert admin.get_record(user) is None
    assert admin.prefix_owner(prefix, exclude=_name()) is None


def test_an_unreadable_record_is_treated_as_missing(admin: EtcdAdmin) -> None:
    user = _name()
    admin.client.put(tenant_key(user), b"{not json")
    assert admin.get_record(user) is None
    assert user not in admin.list_records()
    assert user in admin.list_record_names()  # the audit still sees it
    admin.delete_record(user)


def test_versions_asks_every_listed_member(admin: EtcdAdmin, etcd_auth: EtcdCluster) -> None:
    versions = admin.versions()
    assert versions and all(v.startswith("3.") for v in versions.values())
    assert admin.blocking_alarms() == []
