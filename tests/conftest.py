"""Shared fixtures: real etcd servers (with and without auth) on free loopback ports.

Backend-specific fixtures live next to the tests that use them. Every server started
here is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.etcd_server import EtcdCluster, etcd_cluster

# Reverse DNS stalls TCPStore connects for seconds on hosts without working reverse DNS.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")


@pytest.fixture(scope="session")
def etcd_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member with auth enabled; root's password is ``cluster.root_password``."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd-auth"), auth=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def etcd_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member without auth."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd-plain")) as cluster:
        yield cluster


@pytest.fixture
def namespace() -> str:
    """A namespace unique to the test, so tests sharing a server never collide."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
