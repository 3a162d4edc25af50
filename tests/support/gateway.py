"""The real ``etha-gateway`` process on a free loopback port, and tenant registration.

:class:`GatewayProcess` runs ``.venv/bin/python -m etha.gateway`` against a given etcd,
waits until ``/readyz`` answers, and is stopped by whoever started it (the fixtures in
tests/gateway/conftest.py, the benchmarks). :func:`register_tenant` writes a tenant
record with a root :class:`~etha.kvstore.etcd_client.EtcdClient`, as the operator does.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from etha.gateway.tenancy import TenantRecord, hash_secret, new_secret, tenant_key
from etha.kvstore.etcd_client import EtcdClient
from tests.support.ports import free_ports
from tests.support.processes import end_process

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"


def write_token_keys(path: Path, count: int = 1) -> Path:
    """A token key file with ``count`` fresh keys (the first signs)."""
    path.write_text("".join(secrets.token_urlsafe(32) + "\n" for _ in range(count)))
    return path


class GatewayProcess:
    """One gateway replica (a real process) on free loopback ports.

    :param etcd_endpoints: ``host:port`` of the etcd members
    :param workdir: where the key file (unless given) and the log go
    :param username/password: the gateway's own etcd credentials (root in tests)
    :param token_key_file: shared by replicas; made fresh when None
    :param env: more ``ETHA_GATEWAY_*`` settings (quotas, TTL, ...)
    """

    def __init__(
        self,
        etcd_endpoints: list[str],
        workdir: Path,
        *,
        username: str | None = None,
        password: str | None = None,
        token_key_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or f"gw-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.token_key_file = token_key_file or write_token_keys(workdir / f"{self.name}.keys")
        self.log_path = workdir / f"{self.name}.log"
        self.port, self.metrics_port = free_ports(2)
        #: ``host:port`` that clients dial; where Prometheus scrapes.
        self.endpoint = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.env = {
            "ETHA_GATEWAY_LISTEN": f"127.0.0.1:{self.port}",
            "ETHA_GATEWAY_ETCD_ENDPOINTS": ",".join(etcd_endpoints),
            "ETHA_GATEWAY_TOKEN_KEY_FILE": str(self.token_key_file),
            "ETHA_GATEWAY_METRICS_PORT": str(self.metrics_port),
            "ETHA_GATEWAY_LOG_LEVEL": "INFO",
        }
        if username is not None and password is not None:
            self.env["ETHA_GATEWAY_ETCD_USERNAME"] = username
            self.env["ETHA_GATEWAY_ETCD_PASSWORD"] = password
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        """Start the process and wait until it is ready (``/readyz`` and the port)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETHA_")}
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(PYTHON if PYTHON.exists() else sys.executable), "-m", "etha.gateway"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO),
                start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"etha-gateway exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        import socket

                        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                            return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etha-gateway not ready after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:  # noqa: S310
            return str(response.read().decode())

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.process is not None:
            end_process(self.process, signal.SIGKILL)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return None
        end_process(self.process, signal.SIGTERM)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> GatewayProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Starts a GatewayProcess with more ``ETHA_GATEWAY_*`` settings: ``(**env)``.
GatewayFactory = Callable[..., GatewayProcess]


def register_tenant(
    root: EtcdClient,
    prefix: str | None = None,
    *,
    username: str | None = None,
    quotas: Mapping[str, int] | None = None,
    secret: str | None = None,
) -> tuple[str, str, str]:
    """Write a tenant record as the operator does; returns ``(username, secret, prefix)``."""
    prefix = prefix or f"t-{uuid.uuid4().hex[:12]}"
    username = username or f"etha-{uuid.uuid4().hex[:12]}"
    secret = secret or new_secret()
    record = TenantRecord(
        username=username,
        prefix=prefix,
        secret_sha256=hash_secret(secret),
        quotas=dict(quotas or {}),
        owner=f"tests/{prefix}",
    )
    root.put(record.key, record.to_json())
    return username, secret, prefix


def revoke_tenant(root: EtcdClient, username: str) -> None:
    """Delete a tenant's record (what the operator does on revocation)."""
    root.delete_range(tenant_key(username))


__all__ = [
    "GatewayFactory",
    "GatewayProcess",
    "register_tenant",
    "revoke_tenant",
    "write_token_keys",
]
