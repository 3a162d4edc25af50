"""ETHA_GATEWAY_* settings (errors name the variable, secrets stay out of messages), the
gateway serving TLS, and the gateway running as a least-privilege etcd user."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pyetcd import etcdrpc

from etha.gateway.settings import parse_settings
from etha.gateway.tenancy import REGISTRY_PREFIX, TENANT_KEYSPACE
from etha.kvstore.errors import ConfigurationError
from etha.kvstore.etcd import EtcdKVStore
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from tests.gateway.conftest import TenantCreds, open_store
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.gateway import GatewayProcess, register_tenant, write_token_keys
from tests.support.tls import make_tls

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    return {
        "ETHA_GATEWAY_ETCD_ENDPOINTS": "127.0.0.1:2379",
        "ETHA_GATEWAY_TOKEN_KEY_FILE": str(write_token_keys(tmp_path / "keys")),
    }


def test_defaults(base: dict[str, str]) -> None:
    settings = parse_settings(base)
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 2379)
    assert settings.advertise == ("127.0.0.1:2379",)
    assert settings.quotas["keys"] == 100_000 and settings.metrics_port == 0
    assert settings.etcd_space_high_water == 0.8 and not settings.tls


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ETHA_GATEWAY_ETCD_ENDPOINTS", "", "ETHA_GATEWAY_ETCD_ENDPOINTS is not set"),
        ("ETHA_GATEWAY_ETCD_ENDPOINTS", "ftp://x:1", "use http or https"),
        ("ETHA_GATEWAY_TOKEN_KEY_FILE", "", "ETHA_GATEWAY_TOKEN_KEY_FILE is not set"),
        ("ETHA_GATEWAY_TOKEN_KEY_FILE", "/nonexistent", "ETHA_GATEWAY_TOKEN_KEY_FILE="),
        ("ETHA_GATEWAY_LISTEN", "nowhere", "ETHA_GATEWAY_LISTEN='nowhere' must look like"),
        ("ETHA_GATEWAY_LISTEN", "0.0.0.0:99999", "ETHA_GATEWAY_LISTEN"),
        ("ETHA_GATEWAY_METRICS_PORT", "abc", "ETHA_GATEWAY_METRICS_PORT"),
        ("ETHA_GATEWAY_TOKEN_TTL", "-1", "ETHA_GATEWAY_TOKEN_TTL"),
        ("ETHA_GATEWAY_QUOTA_KEYS", "many", "ETHA_GATEWAY_QUOTA_KEYS='many' is not a whole"),
        ("ETHA_GATEWAY_QUOTA_BYTES", "-5", "ETHA_GATEWAY_QUOTA_BYTES"),
        ("ETHA_GATEWAY_ETCD_SPACE_HIGH_WATER", "1.5", "a fraction between 0 and 1"),
        ("ETHA_GATEWAY_LOG_LEVEL", "LOUD", "ETHA_GATEWAY_LOG_LEVEL"),
        ("ETHA_GATEWAY_ETCD_USERNAME", "gw", "ETHA_GATEWAY_ETCD_PASSWORD (or _FILE) is not set"),
        ("ETHA_GATEWAY_TLS_CERT_FILE", "/etc/hostname", "ETHA_GATEWAY_TLS_KEY_FILE is not set"),
    ],
)
def test_errors_name_the_variable(
    base: dict[str, str], variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as err:
        parse_settings({**base, variable: value})
    assert message in str(err.value)


def test_password_never_in_messages_or_repr(base: dict[str, str]) -> None:
    env = {**base, "ETHA_GATEWAY_ETCD_PASSWORD": "hunter2-secret"}
    with pytest.raises(ConfigurationError) as err:
        parse_settings(env)
    assert "hunter2" not in str(err.value)
    settings = parse_settings({**env, "ETHA_GATEWAY_ETCD_USERNAME": "gw"})
    assert settings.etcd_password == "hunter2-secret"
    assert "hunter2" not in repr(settings)


def test_the_process_exits_2_naming_the_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "etha.gateway"],
        env={"PATH": "/usr/bin:/bin", "ETHA_GATEWAY_ETCD_ENDPOINTS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ETHA_GATEWAY_TOKEN_KEY_FILE is not set" in result.stderr


def test_gateway_serves_tls(
    etcd_auth: EtcdCluster, tmp_path: Path, tenant: Callable[..., TenantCreds]
) -> None:
    tls = make_tls(tmp_path / "tls")
    gw = GatewayProcess(
        etcd_auth.endpoints,
        tmp_path / "gw",
        username="root",
        password=etcd_auth.root_password,
        env={
            "ETHA_GATEWAY_TLS_CERT_FILE": str(tls.server_cert),
            "ETHA_GATEWAY_TLS_KEY_FILE": str(tls.server_key),
        },
    ).start()
    try:
        creds = tenant()
        store = EtcdKVStore(
            creds.prefix,
            endpoints=[f"https://{gw.endpoint}"],
            username=creds.username,
            password=creds.secret,
            ca_file=str(tls.ca_cert),
            timeout=15,
        )
        try:
            store.set("k", "over tls")
            assert store.get("k") == b"over tls"
        finally:
            store.close()
        # A plaintext client cannot talk to it.
        with (
            EtcdClient(
                [gw.endpoint], username=creds.username, password=creds.secret, timeout=3
            ) as plain,
            pytest.raises(Exception),
        ):
            plain.range(f"{creds.prefix}/k".encode())
    finally:
        gw.stop()


def test_gateway_runs_as_a_least_privilege_etcd_user(
    etcd_auth: EtcdCluster, root: EtcdClient, tmp_path: Path, tenant: Callable[..., TenantCreds]
) -> None:
    """The documented grant suffices: read-write on the tenant keyspace, read on the registry."""
    user, role, password = "etha-gateway-test", "etha-gateway-test", "gw-password-123"
    root.call("Auth", "RoleAdd", etcdrpc.AuthRoleAddRequest(name=role))
    for perm_type, key, end in [
        (etcdrpc.Permission.READWRITE, TENANT_KEYSPACE[0], TENANT_KEYSPACE[1]),
        (etcdrpc.Permission.READ, REGISTRY_PREFIX, prefix_range_end(REGISTRY_PREFIX)),
    ]:
        root.call(
            "Auth",
            "RoleGrantPermission",
            etcdrpc.AuthRoleGrantPermissionRequest(
                name=role, perm=etcdrpc.Permission(permType=perm_type, key=key, range_end=end)
            ),
        )
    root.call("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(name=user, password=password))
    root.call("Auth", "UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=user, role=role))
    gw = GatewayProcess(etcd_auth.endpoints, tmp_path, username=user, password=password).start()
    try:
        creds = tenant()
        store = open_store([gw.endpoint], creds)
        store.set("k", "least privilege")
        assert store.get("k") == b"least privilege"
        assert store.wait_for_key("k", timeout=10) == b"least privilege"
        store.close()
        assert "etha_gateway_tenants" in gw.metrics()
    finally:
        gw.stop()
        root.call("Auth", "UserDelete", etcdrpc.AuthUserDeleteRequest(name=user))
        root.call("Auth", "RoleDelete", etcdrpc.AuthRoleDeleteRequest(role=role))


def test_gateway_reaches_etcd_over_tls(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    with etcd_cluster(tmp_path / "etcd", auth=True, tls=tls) as cluster:
        root = EtcdClient(
            cluster.urls, username="root", password=cluster.root_password, ca_file=str(tls.ca_cert)
        )
        gw = GatewayProcess(
            cluster.urls,
            tmp_path / "gw",
            username="root",
            password=cluster.root_password,
            env={"ETHA_GATEWAY_ETCD_CA_FILE": str(tls.ca_cert)},
        ).start()
        try:
            username, secret, prefix = register_tenant(root)
            creds = TenantCreds(username, secret, prefix)
            store = open_store([gw.endpoint], creds)
            store.set("k", "through tls to etcd")
            assert store.get("k") == b"through tls to etcd"
            store.close()
            assert root.range(f"{prefix}/default/k".encode()).count == 0  # closed: cleaned up
        finally:
            gw.stop()
            root.close()
