"""Run the real operator (``python -m etha_operator``) as a subprocess for tests.

It talks to the Kubernetes emulator through a kubeconfig and to a real etcd with auth.
Its output goes to a log file that tests can read (e.g. to check that no password is
ever logged). :meth:`OperatorProcess.stop` ends it; :meth:`kill` simulates a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.support.ports import free_port, wait_port
from tests.support.processes import end_process

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (last := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
    return last


def run_operator(env: Mapping[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m etha_operator`` with exactly ``env`` until it exits (e.g. on bad
    settings); its output is captured as text."""
    command = [sys.executable, "-m", "etha_operator"]
    return subprocess.run(
        command, cwd=REPO, env=dict(env), capture_output=True, text=True, timeout=timeout
    )


@dataclass
class OperatorProcess:
    """One operator process; ``env`` adds to/overrides the ETHA_OPERATOR_* defaults.

    With ``gateway_endpoints`` it runs in gateway mode and hands workers those endpoints;
    without, in direct mode with ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT=true (the test etcd is
    a 3.5 release, which direct mode otherwise refuses).
    """

    kubeconfig: Path
    etcd_endpoints: list[str]
    root_password: str
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    gateway_endpoints: list[str] | None = None
    health_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETHA_")}
        env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "ETHA_OPERATOR_ETCD_ENDPOINTS": ",".join(self.etcd_endpoints),
                "ETHA_OPERATOR_ETCD_USERNAME": "root",
                "ETHA_OPERATOR_ETCD_PASSWORD": self.root_password,
                "ETHA_OPERATOR_HEALTH_PORT": str(self.health_port),
                "ETHA_OPERATOR_AUDIT_INTERVAL": "0",
                "ETHA_OPERATOR_CLEANUP_DEADLINE": "5",
                "ETHA_OPERATOR_JOB_CHECK_INTERVAL": "2",
                "ETHA_OPERATOR_WATCH_SERVER_TIMEOUT": "60",
                "ETHA_OPERATOR_ETCD_TIMEOUT": "2",
                "ETHA_OPERATOR_LOG_LEVEL": "DEBUG",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.gateway_endpoints:
            env["ETHA_OPERATOR_MODE"] = "gateway"
            env["ETHA_OPERATOR_GATEWAY_ENDPOINTS"] = ",".join(self.gateway_endpoints)
        else:
            env["ETHA_OPERATOR_MODE"] = "direct"
            env["ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT"] = "true"
        env.update(self.env)
        return env

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "etha_operator"],
                cwd=REPO,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            wait_for(self._healthy, timeout=timeout, interval=0.2, what="the operator to start")
            if webhook_port := self.env.get("ETHA_OPERATOR_WEBHOOK_PORT"):
                # The webhook server may come up after the health endpoint.
                wait_port("127.0.0.1", int(webhook_port), timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"the operator exited early:\n{self.log_tail()}")
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200) and "etha operator started" in self.log()
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, no clean-up of any kind."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (or ``sig``), then SIGKILL if kopf does not exit in time."""
        if self.process is not None:
            end_process(self.process, sig, grace=20)
            self.process = None

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Builds (does not start) an OperatorProcess: ``(gateway=[endpoints] | None, **env)``.
OperatorFactory = Callable[..., OperatorProcess]
