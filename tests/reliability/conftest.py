"""Fixtures of the reliability suite: real etcd clusters with auth, limited users.

Scale: ``ETHA_CHAOS_SCALE=quick`` (default, ``make test``) or ``full`` (``make chaos``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etha.kvstore.etcd_client import EtcdClient
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.etcd_users import grant_prefix_user, root_client
from tests.support.kube_emulator import EmulatorServer, _parse_path


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
    with etcd_cluster(tmp_path / "trio", members=3, auth=True, start_timeout=90) as cluster:
        yield cluster


@pytest.fixture
def root(etcd_auth: EtcdCluster) -> Iterator[EtcdClient]:
    with root_client(etcd_auth) as client:
        yield client


@dataclass(frozen=True)
class ApiCall:
    method: str
    path: str
    watch: bool


class ApiRecorder:
    """Records every Kubernetes API request the emulator serves (method, path, watch?).

    Installed by wrapping the running emulator's request handler; the emulator itself
    only logs method and path, which cannot tell a list from a watch.
    """

    def __init__(self, kube: EmulatorServer) -> None:
        assert kube.emulator is not None
        self.calls: list[ApiCall] = []
        emulator = kube.emulator
        original = emulator._handle

        async def recording(request: Any) -> Any:
            params = request.params
            self.calls.append(
                ApiCall(
                    request.method.value,
                    request.url.path,
                    params.get("watch") in ("true", "1"),
                )
            )
            return await original(request)

        emulator._handle = recording  # type: ignore[method-assign]

    def verbs(self) -> dict[tuple[str | None, str, str], set[str]]:
        """(namespace or None, apiGroup, resource[/subresource]) -> RBAC verbs used.

        The namespace is None for cluster-scope requests (what only a ClusterRole grants).
        """
        used: dict[tuple[str | None, str, str], set[str]] = {}
        for call in self.calls:
            path = _parse_path(call.path)
            if path is None:
                continue  # discovery (non-resource URLs)
            resource = path.plural + (f"/{path.subresource}" if path.subresource else "")
            if call.method == "GET":
                verb = "watch" if call.watch else ("get" if path.name else "list")
            else:
                verb = {
                    "POST": "create",
                    "PATCH": "patch",
                    "PUT": "update",
                    "DELETE": "delete" if path.name else "deletecollection",
                }[call.method]
            used.setdefault((path.namespace, path.group, resource), set()).add(verb)
        return used
