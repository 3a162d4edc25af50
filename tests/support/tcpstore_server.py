"""A real ``torch.distributed.TCPStore`` server in its own process, on a free port.

Tests that need to kill the server (or keep it out of the test process) use this; tests
that only need a server start one in-process with ``TCPStoreKVStore(is_server=True, port=0)``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from tests.support.ports import free_port, wait_port
from tests.support.processes import end_process

# The child serves until its stdin closes, so it cannot outlive the test process.
_SERVER_CODE = """
import datetime, sys
import torch.distributed as dist
store = dist.TCPStore(sys.argv[1], int(sys.argv[2]), None, True,
                      timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class TCPStoreServer:
    """``start()`` launches the server process; ``kill()``/``stop()`` end it."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> TCPStoreServer:
        env = dict(os.environ, TORCH_CPP_LOG_LEVEL="ERROR")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER_CODE, self.host, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"TCPStore server did not start (said {line!r})")
            wait_port(self.host, self.port, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        proc = self.process
        if proc is None:
            return
        end_process(proc, sig)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        self.process = None

    def __enter__(self) -> TCPStoreServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
