"""etcd administration for KVNamespaces: tenant records, roles, users, grants, clean-up.

Gateway mode writes one :class:`~etha.gateway.tenancy.TenantRecord` per KVNamespace into
the registry (``!etha/registry/tenants/<username>``); direct mode makes an etcd role and
user instead. Both share the key clean-up and the prefix index. Every operation is
idempotent, so a provisioning run that crashed at any point can be repeated. Passwords
are passed through to etcd and never logged or returned; records hold only a hash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2, rpc_pb2

from etha.gateway.tenancy import TENANTS_PREFIX, TenantRecord, tenant_key
from etha.kvstore.config import Endpoint
from etha.kvstore.errors import (
    AlreadyExistsError,
    ConfigurationError,
    KVStoreError,
    NotFoundError,
)
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from etha.kvstore.keys import namespace_prefix
from etha_operator import model
from etha_operator.metrics import observe_etcd_call
from etha_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

READWRITE = auth_pb2.Permission.READWRITE
#: etcd alarms that make the store unusable (a NOSPACE etcd takes no writes; a CORRUPT
#: member's data cannot be trusted), by etcd's AlarmType number. The bundled stubs only
#: name NONE and NOSPACE; etcd's own rpc.proto has CORRUPT = 2.
BLOCKING_ALARMS = {1: "NOSPACE", 2: "CORRUPT"}


class Grant(NamedTuple):
    """One permission of a role: ``[key, range_end)`` with a READ/WRITE/READWRITE type."""

    key: bytes
    range_end: bytes
    perm_type: int

    def permission(self) -> Any:
        """The grant as etcd's ``authpb.Permission`` message."""
        return auth_pb2.Permission(permType=self.perm_type, key=self.key, range_end=self.range_end)


def prefix_grant(prefix: str) -> Grant:
    """The only grant a KVNamespace's role has: read-write on exactly ``<prefix>/``."""
    key = namespace_prefix(prefix).encode()
    return Grant(key, prefix_range_end(key), READWRITE)


def _missing(exc: KVStoreError) -> bool:
    return isinstance(exc, NotFoundError)


def _exists(exc: KVStoreError) -> bool:
    return isinstance(exc, AlreadyExistsError)


class EtcdAdmin:
    """Root-privileged operations on one etcd cluster (thread-safe via the client)."""

    def __init__(
        self,
        client: EtcdClient,
        connect: Callable[[tuple[Endpoint, ...]], EtcdClient] | None = None,
    ) -> None:
        """:param connect: opens a client like ``client`` to other endpoints (for
        :meth:`versions`, which asks every member); None: ask through ``client`` only."""
        self.client = client
        self._connect = connect
        # Prefix key -> the operator-made role granting it. Built by one scan of every role
        # on first use, then kept current by ensure_role/delete_role, so that checking a
        # new prefix costs O(1) requests instead of one RoleGet per existing role (a
        # 500-object storm was O(n^2)). One operator replica writes these roles; roles
        # changed by hand are picked up when the audit calls forget_owners().
        self._owners: dict[bytes, str] | None = None
        self._owners_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> EtcdAdmin:
        def connect(endpoints: tuple[Endpoint, ...]) -> EtcdClient:
            return EtcdClient(
                endpoints,
                on_call=observe_etcd_call,
                username=settings.etcd_username if settings.etcd_password else None,
                password=settings.etcd_password,
                tls=settings.etcd_tls,
                ca_file=settings.etcd_ca_file,
                cert_file=settings.etcd_cert_file,
                key_file=settings.etcd_key_file,
                timeout=settings.etcd_timeout,
            )

        return cls(connect(settings.etcd_endpoints), connect)

    def close(self) -> None:
        self.client.close()

    def _auth(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return self.client.call("Auth", method, request, timeout=timeout)

    # -- reading ---------------------------------------------------------------------------

    def list_users(self, timeout: float | None = None) -> list[str]:
        return list(self._auth("UserList", etcdrpc.AuthUserListRequest(), timeout).users)

    def list_roles(self, timeout: float | None = None) -> list[str]:
        return list(self._auth("RoleList", etcdrpc.AuthRoleListRequest(), timeout).roles)

    def user_roles(self, user: str) -> list[str] | None:
        """The roles granted to ``user``, or None if the user does not exist."""
        try:
            return list(self._auth("UserGet", etcdrpc.AuthUserGetRequest(name=user)).roles)
        except KVStoreError as exc:
            if _missing(exc):
                return None
            raise

    def role_grants(self, role: str, timeout: float | None = None) -> list[Grant] | None:
        """The permissions of ``role``, or None if the role does not exist."""
        try:
            response = self._auth("RoleGet", etcdrpc.AuthRoleGetRequest(role=role), timeout)
        except KVStoreError as exc:
            if _missing(exc):
                return None
            raise
        return [Grant(p.key, p.range_end, p.permType) for p in response.perm]

    def prefix_owner(self, prefix: str, *, exclude: str) -> str | None:
        """The operator-made role (other than ``exclude``) that already grants ``prefix``."""
        wanted = prefix_grant(prefix).key
        with self._owners_lock:
            if self._owners is None:
                self._owners = self._scan_owners()
            owner = self._owners.get(wanted)
        if owner is None or owner == exclude:
            return None
        # The index may be stale (a role or record deleted by hand): confirm with etcd.
        if any(g.key == wanted for g in self.role_grants(owner) or []):
            return owner
        record = self.get_record(owner)
        if record is not None and prefix_grant(record.prefix).key == wanted:
            return owner
        self._forget(owner)
        return None

    def forget_owners(self) -> None:
        """Drop the prefix index; the next prefix_owner() rescans etcd's roles."""
        with self._owners_lock:
            self._owners = None

    def _scan_owners(self) -> dict[bytes, str]:
        """Prefix key -> owner, from every operator-made role and every tenant record."""
        owners: dict[bytes, str] = {}
        for role in self.list_roles():
            if model.uid_of_etcd_name(role) is None:
                continue
            for grant in self.role_grants(role) or []:
                owners.setdefault(grant.key, role)
        for username, record in self.list_records().items():
            owners.setdefault(prefix_grant(record.prefix).key, username)
        return owners

    def _remember(self, prefix_key: bytes, role: str) -> None:
        with self._owners_lock:
            if self._owners is not None:
                self._owners.setdefault(prefix_key, role)

    def _forget(self, role: str) -> None:
        with self._owners_lock:
            if self._owners is not None:
                for key in [k for k, v in self._owners.items() if v == role]:
                    del self._owners[key]

    def authenticate(self, user: str, password: str, timeout: float | None = None) -> None:
        """Check that ``password`` logs ``user`` in.

        :raises PermissionDeniedError: it does not
        """
        request = etcdrpc.AuthenticateRequest(name=user, password=password)
        self._auth("Authenticate", request, timeout)

    # -- the tenant registry (gateway mode) -------------------------------------------------

    def get_record(self, username: str, timeout: float | None = None) -> TenantRecord | None:
        """The tenant record of ``username``, or None (also for an unreadable record)."""
        response = self.client.range(tenant_key(username), timeout=timeout)
        if not response.kvs:
            return None
        try:
            return TenantRecord.from_json(response.kvs[0].value)
        except ConfigurationError as exc:
            # Rewritten by the next provisioning run; never fatal for the operator.
            logger.warning(
                "tenant record of %s is unreadable (%s); it will be replaced", username, exc
            )
            return None

    def list_records(self, timeout: float | None = None) -> dict[str, TenantRecord]:
        """Every readable tenant record, by username (one Range over the registry)."""
        response = self.client.range(
            TENANTS_PREFIX, prefix_range_end(TENANTS_PREFIX), timeout=timeout
        )
        records: dict[str, TenantRecord] = {}
        for kv in response.kvs:
            try:
                record = TenantRecord.from_json(kv.value)
            except ConfigurationError as exc:
                logger.warning("skipping unreadable tenant record %r: %s", kv.key, exc)
                continue
            records[record.username] = record
        return records

    def list_record_names(self, timeout: float | None = None) -> list[str]:
        """The usernames of every registry key, readable or not (for the audit)."""
        response = self.client.range(
            TENANTS_PREFIX, prefix_range_end(TENANTS_PREFIX), keys_only=True, timeout=timeout
        )
        return [kv.key[len(TENANTS_PREFIX) :].decode(errors="replace") for kv in response.kvs]

    def put_record(self, record: TenantRecord, timeout: float | None = None) -> None:
        """Write ``record`` (a new secret hash, prefix or quotas retire the old tokens)."""
        self.client.put(record.key, record.to_json(), timeout=timeout)
        self._remember(prefix_grant(record.prefix).key, record.username)

    def delete_record(self, username: str, timeout: float | None = None) -> bool:
        """Delete the tenant record: every gateway replica refuses the tenant at once."""
        deleted = self.client.delete_range(tenant_key(username), timeout=timeout) > 0
        self._forget(username)
        return deleted

    # -- cluster health ----------------------------------------------------------------------

    def blocking_alarms(self, timeout: float | None = None) -> list[str]:
        """The NOSPACE/CORRUPT alarms etcd holds right now (names, sorted; empty: none)."""
        request = etcdrpc.AlarmRequest(
            action=etcdrpc.AlarmRequest.GET, memberID=0, alarm=rpc_pb2.AlarmType.NONE
        )
        response = self.client.call("Maintenance", "Alarm", request, timeout=timeout)
        return sorted(
            {BLOCKING_ALARMS[a.alarm] for a in response.alarms if a.alarm in BLOCKING_ALARMS}
        )

    def versions(self, timeout: float | None = None) -> dict[str, str]:
        """etcd's version as reported by each listed endpoint that answers."""
        found: dict[str, str] = {}
        errors: list[str] = []
        request = etcdrpc.StatusRequest()
        if self._connect is None:
            status = self.client.call("Maintenance", "Status", request, timeout=timeout)
            return {",".join(str(e) for e in self.client.endpoints): str(status.version)}
        for endpoint in self.client.endpoints:
            single = self._connect((endpoint,))
            try:
                status = single.call("Maintenance", "Status", request, timeout=timeout)
                found[str(endpoint)] = str(status.version)
            except KVStoreError as exc:
                errors.append(f"{endpoint}: {exc}")
            finally:
                single.close()
        if not found:
            raise KVStoreError(f"no etcd endpoint answered Maintenance.Status: {'; '.join(errors)}")
        return found

    # -- provisioning ----------------------------------------------------------------------

    def ensure_role(self, role: str, prefix: str) -> None:
        """Create ``role`` if needed; make it grant read-write on ``<prefix>/`` and nothing else."""
        wanted = prefix_grant(prefix)
        grants = self.role_grants(role)
        if grants is None:
            try:
                self._auth("RoleAdd", etcdrpc.AuthRoleAddRequest(name=role))
            except KVStoreError as exc:
                if not _exists(exc):
                    raise
            grants = []
        for grant in grants:
            if grant != wanted:
                self._auth(
                    "RoleRevokePermission",
                    etcdrpc.AuthRoleRevokePermissionRequest(
                        role=role, key=grant.key, range_end=grant.range_end
                    ),
                )
        if wanted not in grants:
            self._auth(
                "RoleGrantPermission",
                etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=wanted.permission()),
            )
        self._remember(wanted.key, role)

    def set_user(self, user: str, password: str, role: str) -> bool:
        """Create ``user`` with ``password`` (or reset the password) and grant only ``role``.

        :returns: True if the user was created, False if it existed and got the new password
        """
        created = True
        try:
            self._auth("UserAdd", etcdrpc.AuthUserAddRequest(name=user, password=password))
        except KVStoreError as exc:
            if not _exists(exc):
                raise
            created = False
            self._auth(
                "UserChangePassword",
                etcdrpc.AuthUserChangePasswordRequest(name=user, password=password),
            )
        self.ensure_user_role(user, role)
        return created

    def ensure_user_role(self, user: str, role: str) -> None:
        roles = self.user_roles(user) or []
        for other in roles:
            if other != role:
                self._auth(
                    "UserRevokeRole", etcdrpc.AuthUserRevokeRoleRequest(name=user, role=other)
                )
        if role not in roles:
            self._auth("UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=user, role=role))

    # -- clean-up --------------------------------------------------------------------------

    def delete_keys(self, prefix: str, timeout: float | None = None) -> int:
        """Delete every key under ``<prefix>/`` with ONE DeleteRange; returns how many."""
        key = namespace_prefix(prefix).encode()
        return self.client.delete_range(key, prefix_range_end(key), timeout=timeout)

    def delete_user(self, user: str, timeout: float | None = None) -> bool:
        """Delete ``user``; False if it did not exist."""
        try:
            self._auth("UserDelete", etcdrpc.AuthUserDeleteRequest(name=user), timeout)
        except KVStoreError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def delete_role(self, role: str, timeout: float | None = None) -> bool:
        """Delete ``role``; False if it did not exist."""
        try:
            self._auth("RoleDelete", etcdrpc.AuthRoleDeleteRequest(role=role), timeout)
        except KVStoreError as exc:
            if _missing(exc):
                self._forget(role)
                return False
            raise
        self._forget(role)
        return True

    def prefix_of_role(self, role: str, timeout: float | None = None) -> str | None:
        """The KVNamespace prefix a role grants (from its permission), or None."""
        for grant in self.role_grants(role, timeout) or []:
            key = grant.key.decode(errors="replace")
            if key.endswith("/") and grant.range_end == prefix_range_end(grant.key):
                return key[:-1]
        return None
