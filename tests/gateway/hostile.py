"""A hostile-tenant world: private etcd, the real gateway, the real operator in gateway mode.

The attack, oracle and etcdctl tests share it. Tenants are provisioned the way a cluster
provisions them: a KVNamespace in the (emulated) Kubernetes API, the real operator in
gateway mode writes the tenant record and the worker Secret, and the tests log in with
what the Secret holds. The prefixes are chosen to sit right against each other:

* A (the attacker) owns ``[<r>/, <r>0)``;
* B owns ``<r>.b``: its keys ``<r>.b/...`` sort just BELOW A's range;
* C owns ``<r>0``: its keys ``<r>0/...`` sort just ABOVE A's range, and ``<r>0`` is
  exactly A's range end.

The etcd server is private to the module, so "nothing else changed" can compare the
whole keyspace and a successful attack (an alarm, a compaction, a new user) cannot harm
other tests. :meth:`World.state` reads everything an attack could change with root,
straight from etcd.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from pyetcd import etcdrpc

from etha.gateway.tenancy import tenant_key
from etha.kvstore.etcd_client import EtcdClient
from tests.gateway.conftest import TenantCreds
from tests.operator.helpers import API, PLURAL, kvnamespace, secret_env, wait_phase
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.etcd_users import root_client
from tests.support.gateway import GatewayProcess
from tests.support.kube_emulator import EmulatorServer
from tests.support.operated import operated_kube
from tests.support.operator_runner import OperatorProcess, wait_for
from tests.support.tenants import root_gateway

K8S_NS = "hostile"
CALL_TIMEOUT = 10.0


@dataclass
class Tenant:
    """A tenant as a worker pod sees it (from the operator's Secret)."""

    name: str  # the KVNamespace's name
    creds: TenantCreds

    @property
    def prefix(self) -> str:
        return self.creds.prefix

    @property
    def start(self) -> bytes:
        return f"{self.prefix}/".encode()

    @property
    def end(self) -> bytes:
        return f"{self.prefix}0".encode()

    def key(self, suffix: str) -> bytes:
        return f"{self.prefix}/{suffix}".encode()


@dataclass(frozen=True)
class ClusterState:
    """What root sees directly on etcd: everything a tenant must never change."""

    keyspace: dict[bytes, tuple[bytes, int, int, int, int]]
    alarms: tuple[tuple[int, int], ...]
    auth_enabled: bool
    users: tuple[str, ...]
    roles: tuple[str, ...]
    leases: str
    members: tuple[tuple[int, str], ...]
    revision_1_readable: bool  # False once anything compacted the keyspace
    version: str


@dataclass
class World:
    cluster: EtcdCluster
    gateway: GatewayProcess
    kube: EmulatorServer
    operator: OperatorProcess
    root: EtcdClient
    a: Tenant = field(init=False)
    b: Tenant = field(init=False)
    c: Tenant = field(init=False)
    sentinels: dict[bytes, bytes] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    # -- tenants -----------------------------------------------------------------------

    def provision(self, name: str, prefix: str) -> Tenant:
        """A KVNamespace with ``spec.keyPrefix``; waits for Ready; reads its Secret."""
        self.kube.create(API, PLURAL, kvnamespace(name, f"{name}-job", keyPrefix=prefix), K8S_NS)
        obj = wait_phase(self.kube, K8S_NS, name, "Ready")
        env = secret_env(self.kube, K8S_NS, obj["status"]["secretName"])
        assert env["ETHA_KV_ENDPOINTS"].endswith(self.gateway.endpoint), env["ETHA_KV_ENDPOINTS"]
        assert env["ETHA_KV_NAMESPACE"] == prefix
        creds = TenantCreds(env["ETHA_KV_USERNAME"], env["ETHA_KV_PASSWORD"], prefix)
        return Tenant(name, creds)

    def deprovision(self, tenant: Tenant) -> None:
        """Delete the KVNamespace; waits until the operator removed the tenant record."""
        self.kube.delete(API, PLURAL, tenant.name, K8S_NS)
        wait_for(
            lambda: not self.root.range(tenant_key(tenant.creds.username)).kvs,
            timeout=60,
            what=f"the record of {tenant.name} to be deleted",
        )

    def record_revision(self, tenant: Tenant) -> int:
        [kv] = self.root.range(tenant_key(tenant.creds.username)).kvs
        return int(kv.mod_revision)

    def record_created(self, tenant: Tenant) -> int:
        """The record's create_revision: the gateway serves no history older than it."""
        [kv] = self.root.range(tenant_key(tenant.creds.username)).kvs
        return int(kv.create_revision)

    def login(self, tenant: Tenant, *, fresh: bool = False) -> str:
        """The tenant's token from the gateway's Auth.Authenticate."""
        if fresh or tenant.name not in self._tokens:
            with self.channel() as channel:
                response = etcdrpc.AuthStub(channel).Authenticate(
                    etcdrpc.AuthenticateRequest(
                        name=tenant.creds.username, password=tenant.creds.secret
                    ),
                    timeout=CALL_TIMEOUT,
                )
            self._tokens[tenant.name] = response.token
        return self._tokens[tenant.name]

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.gateway.endpoint)

    # -- root's view ---------------------------------------------------------------------

    def keyspace(self) -> dict[bytes, tuple[bytes, int, int, int, int]]:
        return {
            kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
            for kv in self.root.range(b"\0", b"\0").kvs
        }

    def state(self) -> ClusterState:
        alarms = self.root.call(
            "Maintenance", "Alarm", etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET)
        ).alarms
        users = self.root.call("Auth", "UserList", etcdrpc.AuthUserListRequest()).users
        roles = self.root.call("Auth", "RoleList", etcdrpc.AuthRoleListRequest()).roles
        members = self.root.call("Cluster", "MemberList", etcdrpc.MemberListRequest()).members
        status = self.root.call("Maintenance", "Status", etcdrpc.StatusRequest())
        auth = self.cluster.etcdctl("auth", "status").stdout
        leases = self.cluster.etcdctl("lease", "list").stdout.strip()
        try:
            self.root.range(b"\0", b"\0", revision=1, count_only=True)
            revision_1 = True
        except Exception as exc:  # the compacted error, whatever class the client maps it to
            assert "compacted" in str(exc), exc
            revision_1 = False
        return ClusterState(
            keyspace=self.keyspace(),
            alarms=tuple(sorted((a.memberID, a.alarm) for a in alarms)),
            auth_enabled="Authentication Status: true" in auth,
            users=tuple(sorted(users)),
            roles=tuple(sorted(roles)),
            leases=leases,
            members=tuple(sorted((m.ID, ",".join(m.peerURLs)) for m in members)),
            revision_1_readable=revision_1,
            version=status.version,
        )

    def anonymous_etcd_refused(self) -> bool:
        """Auth is on if etcd refuses an anonymous read ("user name is empty")."""
        with grpc.insecure_channel(self.cluster.endpoints[0]) as channel:
            try:
                etcdrpc.KVStub(channel).Range(etcdrpc.RangeRequest(key=b"x"), timeout=5)
            except grpc.RpcError as exc:
                return exc.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined,no-any-return]
        return False

    def assert_untouched(self, before: ClusterState) -> None:
        """Root's view after an attack equals ``before``."""
        after = self.state()
        changed = {
            k
            for k in before.keyspace.keys() | after.keyspace.keys()
            if before.keyspace.get(k) != after.keyspace.get(k)
        }
        assert not changed, f"keys changed by an attack: {sorted(changed)}"
        for key, value in self.sentinels.items():
            assert after.keyspace[key][0] == value, key
        assert after.alarms == before.alarms == (), after.alarms
        assert after.auth_enabled and self.anonymous_etcd_refused()
        assert after.users == before.users
        assert after.roles == before.roles
        assert after.leases == before.leases
        assert after.members == before.members
        assert after.revision_1_readable and before.revision_1_readable, "compacted"
        assert after.version == before.version


def victim_keys(w: World) -> dict[bytes, bytes]:
    """Keys every attack aims at: B's and C's data, and raw keys around A's range."""
    p = w.a.prefix.encode()
    return {
        w.a.key("default/secret"): b"A's own (for other tenants' and forged tokens)",
        w.b.key("default/secret"): b"B's secret",
        w.b.key("default/rank:0/ready"): b"1",
        w.c.key("default/secret"): b"C's secret",
        p: b"the bare prefix (below A's range)",
        p + b".": b"a sibling just below A's range",
        w.a.end: b"A's range end itself",
        w.a.end + b"\0": b"just above A's range end",
        b"\0low": b"the lowest key",
        b"\xff\xff\xffhigh": b"the highest key",
    }


def make_world(tmp: Path) -> Iterator[World]:
    """Start everything (private etcd, gateway, emulator, operator); stop it all after."""
    with (
        etcd_cluster(tmp / "etcd", auth=True) as cluster,
        root_client(cluster) as root,
        root_gateway(cluster, tmp / "gateway") as gateway,
        operated_kube(cluster, tmp, gateway_endpoints=[gateway.endpoint]) as k8s,
    ):
        r = f"atk{uuid.uuid4().hex[:6]}"
        w = World(cluster, gateway, k8s.kube, k8s.operator, root)
        w.a = w.provision("attacker", r)
        w.b = w.provision("below", f"{r}.b")
        w.c = w.provision("above", f"{r}0")
        w.sentinels = victim_keys(w)
        for key, value in w.sentinels.items():
            root.put(key, value)
        yield w
