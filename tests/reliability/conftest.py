"""Fixtures of the reliability suite: real etcd clusters with auth, limited users.

Scale: ``ETHA_CHAOS_SCALE=quick`` (default, ``make test``) or ``full`` (``make chaos``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from etha.kvstore.etcd_client import EtcdClient
from tests.etcd_helpers import grant_prefix_user, root_client
from tests.support.etcd_server import EtcdCluster


@dataclass(frozen=True)
class PrefixUser:
    """An etcd user whose only role grants read-write on ``<namespace>/``."""

    name: str
    password: str
    namespace: str


def wait_healthy_with_auth(cluster: EtcdCluster, timeout: float = 60.0) -> float:
    """Block until the cluster serves a linearizable read as root; return the seconds taken."""
    started = time.monotonic()
    while True:
        result = cluster.etcdctl("endpoint", "health", check=False)
        if result.returncode == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"etcd not healthy: {result.stderr.strip()}")
        time.sleep(0.1)


def make_prefix_user(root: EtcdClient, namespace: str | None = None) -> PrefixUser:
    user = PrefixUser(
        name=f"u-{uuid.uuid4().hex[:8]}",
        password=f"pw-{uuid.uuid4().hex}",
        namespace=namespace or f"ns-{uuid.uuid4().hex[:8]}",
    )
    grant_prefix_user(root, user.name, user.password, f"{user.namespace}/".encode())
    return user


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster with auth on (faults would disturb a shared one)."""
    cluster = EtcdCluster(tmp_path / "trio", members=3, auth=True)
    cluster.start(timeout=90)
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def root(etcd_auth: EtcdCluster) -> Iterator[EtcdClient]:
    with root_client(etcd_auth) as client:
        yield client
