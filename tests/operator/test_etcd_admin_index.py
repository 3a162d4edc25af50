"""EtcdAdmin's prefix-owner index, against real etcd with auth.

The index makes the prefix-uniqueness check O(1) requests per new KVNamespace after one
scan; these tests check it stays correct when roles come and go.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from etha_operator import model
from etha_operator.etcd_admin import EtcdAdmin
from pyetcd import etcdrpc

from etha.kvstore.etcd_client import EtcdClient
from tests.support.etcd_server import EtcdCluster


class CountingClient(EtcdClient):
    """A real client that counts the RPCs it sends, by method name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: dict[str, int] = {}

    def call(self, service: str, method: str, request: Any, *, timeout: float | None = None) -> Any:
        self.calls[method] = self.calls.get(method, 0) + 1
        return super().call(service, method, request, timeout=timeout)


@pytest.fixture
def admin(etcd_auth: EtcdCluster) -> Iterator[EtcdAdmin]:
    client = CountingClient(etcd_auth.endpoints, username="root", password=etcd_auth.root_password)
    admin = EtcdAdmin(client)
    made: list[str] = []
    admin.made = made  # type: ignore[attr-defined]
    yield admin
    for role in made:
        admin.delete_role(role)
    admin.close()


def new_role(admin: EtcdAdmin, prefix: str) -> str:
    role = model.etcd_name(str(uuid.uuid4()))
    admin.ensure_role(role, prefix)
    admin.made.append(role)  # type: ignore[attr-defined]
    return role


def test_owner_found_then_forgotten_when_its_role_is_deleted(admin: EtcdAdmin) -> None:
    prefix = f"p-{uuid.uuid4().hex[:8]}"
    owner = new_role(admin, prefix)
    assert admin.prefix_owner(prefix, exclude="etha-other") == owner
    assert admin.prefix_owner(prefix, exclude=owner) is None
    admin.delete_role(owner)
    assert admin.prefix_owner(prefix, exclude="etha-other") is None


def test_role_deleted_behind_the_index_is_not_an_owner(admin: EtcdAdmin) -> None:
    prefix = f"p-{uuid.uuid4().hex[:8]}"
    owner = new_role(admin, prefix)
    assert admin.prefix_owner(prefix, exclude="etha-other") == owner
    # Deleted by hand, not through the admin: the index is stale, etcd is asked.
    admin.client.call("Auth", "RoleDelete", etcdrpc.AuthRoleDeleteRequest(role=owner))
    assert admin.prefix_owner(prefix, exclude="etha-other") is None


def test_role_made_behind_the_index_is_seen_after_forget(admin: EtcdAdmin) -> None:
    admin.prefix_owner("warm-up", exclude="none")  # builds the index
    prefix = f"p-{uuid.uuid4().hex[:8]}"
    other = EtcdAdmin(admin.client)  # a second admin: the first one's index misses it
    role = model.etcd_name(str(uuid.uuid4()))
    other.ensure_role(role, prefix)
    admin.made.append(role)  # type: ignore[attr-defined]
    admin.forget_owners()  # what the audit does each round
    assert admin.prefix_owner(prefix, exclude="etha-other") == role


def test_checking_a_new_prefix_does_not_scan_every_role(admin: EtcdAdmin) -> None:
    for _ in range(5):
        new_role(admin, f"p-{uuid.uuid4().hex[:8]}")
    admin.prefix_owner("warm-up", exclude="none")
    client = admin.client
    assert isinstance(client, CountingClient)
    client.calls.clear()
    for _ in range(5):
        assert admin.prefix_owner(f"new-{uuid.uuid4().hex[:8]}", exclude="x") is None
    assert client.calls.get("RoleGet", 0) == 0
    assert client.calls.get("RoleList", 0) == 0
