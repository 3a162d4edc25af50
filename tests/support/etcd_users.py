"""etcd users and keys for tests: the root client, prefix users, key listings.

A prefix user mirrors what the operator provisions for one KVNamespace: one role that
grants read-write on exactly one key prefix.
"""

from __future__ import annotations

from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2

from etha.kvstore.config import EtcdConfig, parse_endpoints
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from tests.support.etcd_server import ROOT_USER, EtcdCluster


def root_client(cluster: EtcdCluster, timeout: float = 10.0) -> EtcdClient:
    """A client logged in as ``root`` (close it, or use it in ``with``)."""
    return EtcdClient(
        cluster.endpoints, username=ROOT_USER, password=cluster.root_password, timeout=timeout
    )


def grant_prefix_user(root: EtcdClient, user: str, password: str, prefix: bytes) -> None:
    """Create ``user`` with a role granting read-write on keys starting with ``prefix``."""
    role = f"{user}-role"
    root.call("Auth", "UserAdd", etcdrpc.AuthUserAddRequest(name=user, password=password))
    root.call("Auth", "RoleAdd", etcdrpc.AuthRoleAddRequest(name=role))
    perm = auth_pb2.Permission(
        permType=auth_pb2.Permission.READWRITE, key=prefix, range_end=prefix_range_end(prefix)
    )
    root.call(
        "Auth", "RoleGrantPermission", etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=perm)
    )
    root.call("Auth", "UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=user, role=role))


def namespace_config(
    cluster: EtcdCluster, namespace: str, *, user: str | None = None, timeout: float = 10.0
) -> EtcdConfig:
    """A user whose only role grants read-write on ``{namespace}/``, as an EtcdConfig.

    Mirrors what the operator provisions for one KVNamespace.
    """
    user = user or f"u-{namespace}"
    password = f"pw-{namespace}"
    with root_client(cluster) as root:
        grant_prefix_user(root, user, password, f"{namespace}/".encode())
    endpoints, _ = parse_endpoints(",".join(cluster.endpoints))
    return EtcdConfig(
        namespace=namespace, endpoints=endpoints, username=user, password=password, timeout=timeout
    )


def all_keys(cluster: EtcdCluster) -> list[str]:
    """Every key in the cluster (read as root)."""
    with root_client(cluster) as root:
        response = root.range(b"\0", b"\0", keys_only=True)
        return [bytes(kv.key).decode(errors="replace") for kv in response.kvs]


def read_key(cluster: EtcdCluster, key: str) -> bytes | None:
    """The value of ``key`` (read as root), or None."""
    with root_client(cluster) as root:
        response = root.range(key.encode())
        return bytes(response.kvs[0].value) if response.kvs else None
