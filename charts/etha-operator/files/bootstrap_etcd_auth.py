"""Enable authentication on the chart's bundled etcd (idempotent).

Runs as an init container of the operator pod, with the operator image's Python (the
etcd image is distroless: no shell for an etcdctl script). Environment:

- ETCD_ENDPOINT: host:port of the bundled etcd (plain gRPC).
- ETCD_ROOT_USER: root user name [root]; ETCD_ROOT_PASSWORD: its password (required).
- BOOTSTRAP_TIMEOUT: seconds to wait for etcd to answer [300].

Exit 0 when auth is enabled and the root password logs in; non-zero with a message on
stderr otherwise. The password is never printed.
"""

from __future__ import annotations

import os
import sys
import time

import grpc
from pyetcd import etcdrpc

_NOT_ENABLED = "authentication is not enabled"
_USER_EXISTS = "user name already exists"


def _log(message: str) -> None:
    print(f"etcd-auth-bootstrap: {message}", file=sys.stderr, flush=True)


def _authenticate(stub: etcdrpc.AuthStub, user: str, password: str) -> bool:
    """True when auth is on and the password logs in; False when auth is off."""
    try:
        stub.Authenticate(etcdrpc.AuthenticateRequest(name=user, password=password), timeout=10)
    except grpc.RpcError as exc:
        if _NOT_ENABLED in (exc.details() or ""):
            return False
        raise
    return True


def bootstrap(endpoint: str, user: str, password: str, timeout: float) -> None:
    """Create ``user`` with the root role and enable auth, unless already done."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as channel:
        stub = etcdrpc.AuthStub(channel)
        while True:
            try:
                enabled = _authenticate(stub, user, password)
                break
            except grpc.RpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"etcd at {endpoint} did not answer in {timeout:.0f}s"
                    ) from exc
                _log(f"waiting for etcd at {endpoint}: {exc.code().name}")
                time.sleep(2)
        if enabled:
            _log(f"auth already enabled and user {user!r} logs in; nothing to do")
            return
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
        if not _authenticate(stub, user, password):
            raise RuntimeError("etcd still reports auth disabled after AuthEnable")
        _log(f"auth enabled; user {user!r} has the root role")


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
        _log(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
