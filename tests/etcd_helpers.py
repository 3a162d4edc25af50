"""Helpers shared by the etcd backend tests (users, roles, thread checks)."""

from __future__ import annotations

import threading
import time

from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2

from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from tests.support.etcd_server import ROOT_USER, EtcdCluster


def root_client(cluster: EtcdCluster, timeout: float = 10.0) -> EtcdClient:
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


def wait_threads_gone(before: set[threading.Thread], grace: float = 5.0) -> list[str]:
    """Names of threads started since ``before`` that are still alive after ``grace`` s."""
    deadline = time.monotonic() + grace
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            return [t.name for t in extra]
        time.sleep(0.05)
