"""The operator's plain building blocks: settings, naming, and etcd administration
(against a real etcd with auth)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etha_operator import model
from etha_operator.etcd_admin import READWRITE, EtcdAdmin, Grant, prefix_grant
from etha_operator.settings import load_settings
from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2

from etha.kvstore.errors import ConfigurationError, PermissionDeniedError
from etha.kvstore.etcd_client import EtcdClient
from etha.kvstore.keys import validate_name
from tests.support.etcd_server import EtcdCluster

BASE = {
    "ETHA_OPERATOR_ETCD_ENDPOINTS": "http://etcd-0:2379,http://etcd-1:2379",
    "ETHA_OPERATOR_ETCD_PASSWORD": "root-secret",
}


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
        ({"ETHA_OPERATOR_WEBHOOK_CERT_FILE": "/x.pem"}, "ETHA_OPERATOR_WEBHOOK_KEY_FILE"),
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
