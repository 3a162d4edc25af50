"""Prepare etcd for etha (idempotent): auth on, and in gateway mode the gateway's user.

Runs as an init container of the operator pod, with the operator image's Python (the
etcd image is distroless: no shell for an etcdctl script). Environment:

- ETCD_ENDPOINT: host:port of etcd (gRPC).
- ETCD_CA_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE: TLS to etcd (an external cluster); unset:
  plain gRPC (the bundled etcd).
- ETCD_ROOT_USER: root user name [root]; ETCD_ROOT_PASSWORD: its password (required).
- ETCD_ENABLE_AUTH: "true" [default] creates the root user and enables auth when auth is
  off (the bundled etcd); "false" requires auth to be on already (an external cluster).
- GATEWAY_ETCD_USER, GATEWAY_ETCD_PASSWORD: when set, the gateway's etcd user: created
  (or its password reset from the Secret) and granted only the role of the same name,
  which is read-write on the tenant keyspace and read-only on the tenant registry, the
  two ranges of etha.gateway.tenancy. Nothing else: not the root role, no other range.
- BOOTSTRAP_TIMEOUT: seconds to wait for etcd to answer [300].

Exit 0 when done; non-zero with a message on stderr otherwise. Passwords are never
printed.
"""

from __future__ import annotations

import os
import sys
import time

import grpc
from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2

from etha.gateway.tenancy import REGISTRY_PREFIX, TENANT_KEYSPACE

_NOT_ENABLED = "authentication is not enabled"
_USER_EXISTS = "user name already exists"
_ROLE_EXISTS = "role name already exists"
READ, READWRITE = auth_pb2.Permission.READ, auth_pb2.Permission.READWRITE


def _range_end(prefix: bytes) -> bytes:
    """The end of etcd's prefix range (``etcdctl --prefix``): the last byte plus one."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


#: (permType, key, range_end) of the gateway's role, and nothing else.
GATEWAY_PERMISSIONS = {
    (READWRITE, TENANT_KEYSPACE[0], TENANT_KEYSPACE[1]),
    (READ, REGISTRY_PREFIX, _range_end(REGISTRY_PREFIX)),
}


def _log(message: str) -> None:
    print(f"etcd-auth-bootstrap: {message}", file=sys.stderr, flush=True)


def _authenticate(stub: etcdrpc.AuthStub, user: str, password: str) -> str | None:
    """The token when auth is on and the password logs in; None when auth is off."""
    try:
        response = stub.Authenticate(
            etcdrpc.AuthenticateRequest(name=user, password=password), timeout=10
        )
    except grpc.RpcError as exc:
        if _NOT_ENABLED in (exc.details() or ""):
            return None
        raise
    return str(response.token)


def _wait_for_etcd(stub: etcdrpc.AuthStub, user: str, password: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _authenticate(stub, user, password)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd did not answer in {timeout:.0f}s") from exc
            _log(f"waiting for etcd: {exc.code().name}")
            time.sleep(2)


def enable_auth(stub: etcdrpc.AuthStub, user: str, password: str) -> None:
    """Create ``user`` with the root role and enable auth (auth is off)."""
    try:
        stub.UserAdd(etcdrpc.AuthUserAddRequest(name=user, password=password), timeout=10)
        _log(f"created user {user!r}")
    except grpc.RpcError as exc:
        if _USER_EXISTS not in (exc.details() or ""):
            raise
        # Left over from an interrupted run: make its password match the Secret.
        stub.UserChangePassword(
            etcdrpc.AuthUserChangePasswordRequest(name=user, password=password), timeout=10
        )
        _log(f"user {user!r} existed; password reset from the Secret")
    stub.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=user, role="root"), timeout=10)
    stub.AuthEnable(etcdrpc.AuthEnableRequest(), timeout=10)
    if _authenticate(stub, user, password) is None:
        raise RuntimeError("etcd still reports auth disabled after AuthEnable")
    _log(f"auth enabled; user {user!r} has the root role")


def ensure_gateway_user(stub: etcdrpc.AuthStub, token: str, user: str, password: str) -> None:
    """The gateway's user and role, with exactly :data:`GATEWAY_PERMISSIONS`."""
    meta = (("token", token),)
    role = user
    try:
        stub.RoleAdd(etcdrpc.AuthRoleAddRequest(name=role), timeout=10, metadata=meta)
    except grpc.RpcError as exc:
        if _ROLE_EXISTS not in (exc.details() or ""):
            raise
    granted = stub.RoleGet(etcdrpc.AuthRoleGetRequest(role=role), timeout=10, metadata=meta)
    have = {(p.permType, p.key, p.range_end) for p in granted.perm}
    for _, key, range_end in sorted(have - GATEWAY_PERMISSIONS):
        stub.RoleRevokePermission(
            etcdrpc.AuthRoleRevokePermissionRequest(role=role, key=key, range_end=range_end),
            timeout=10,
            metadata=meta,
        )
    for perm_type, key, range_end in sorted(GATEWAY_PERMISSIONS - have):
        permission = auth_pb2.Permission(permType=perm_type, key=key, range_end=range_end)
        stub.RoleGrantPermission(
            etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=permission),
            timeout=10,
            metadata=meta,
        )
    try:
        stub.UserAdd(
            etcdrpc.AuthUserAddRequest(name=user, password=password), timeout=10, metadata=meta
        )
        _log(f"created gateway user {user!r}")
    except grpc.RpcError as exc:
        if _USER_EXISTS not in (exc.details() or ""):
            raise
        stub.UserChangePassword(
            etcdrpc.AuthUserChangePasswordRequest(name=user, password=password),
            timeout=10,
            metadata=meta,
        )
    roles = stub.UserGet(etcdrpc.AuthUserGetRequest(name=user), timeout=10, metadata=meta).roles
    for other in roles:
        if other != role:
            stub.UserRevokeRole(
                etcdrpc.AuthUserRevokeRoleRequest(name=user, role=other), timeout=10, metadata=meta
            )
    if role not in roles:
        stub.UserGrantRole(
            etcdrpc.AuthUserGrantRoleRequest(user=user, role=role), timeout=10, metadata=meta
        )
    _log(f"gateway user {user!r}: read-write on the tenant keyspace, read-only on the registry")


def _channel(endpoint: str) -> grpc.Channel:
    ca, cert, key = (
        os.environ.get(n) or None for n in ("ETCD_CA_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE")
    )
    if not (ca or cert):
        return grpc.insecure_channel(endpoint)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    return grpc.secure_channel(endpoint, credentials)


def bootstrap(endpoint: str, user: str, password: str, timeout: float) -> None:
    enable = (os.environ.get("ETCD_ENABLE_AUTH") or "true").lower() != "false"
    gateway_user = os.environ.get("GATEWAY_ETCD_USER") or ""
    gateway_password = os.environ.get("GATEWAY_ETCD_PASSWORD") or ""
    if bool(gateway_user) != bool(gateway_password):
        raise RuntimeError("GATEWAY_ETCD_USER and GATEWAY_ETCD_PASSWORD go together")
    with _channel(endpoint) as channel:
        stub = etcdrpc.AuthStub(channel)
        token = _wait_for_etcd(stub, user, password, timeout)
        if token is None:
            if not enable:
                raise RuntimeError(
                    f"auth is not enabled on etcd at {endpoint}: enable it (etcdctl auth"
                    " enable) before installing etha against this cluster"
                )
            enable_auth(stub, user, password)
            token = _authenticate(stub, user, password)
        else:
            _log(f"auth already enabled and user {user!r} logs in")
        if gateway_user and token:
            ensure_gateway_user(stub, token, gateway_user, gateway_password)
        _log("done")


def main() -> int:
    endpoint = os.environ.get("ETCD_ENDPOINT", "")
    user = os.environ.get("ETCD_ROOT_USER") or "root"
    password = os.environ.get("ETCD_ROOT_PASSWORD", "")
    if not endpoint or not password:
        _log("ETCD_ENDPOINT and ETCD_ROOT_PASSWORD must be set (check the root Secret)")
        return 2
    try:
        bootstrap(endpoint, user, password, float(os.environ.get("BOOTSTRAP_TIMEOUT", "300")))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            _log(
                f"auth is enabled but user {user!r} cannot log in with the Secret's password: "
                "the Secret was changed after install; restore it or reset the user in etcd"
            )
        else:
            _log(f"etcd call failed: {exc.code().name}: {exc.details()}")
        return 1
    except (TimeoutError, RuntimeError) as exc:
        _log(f"{exc} (etcd at {endpoint})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
