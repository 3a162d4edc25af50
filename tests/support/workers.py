"""Worker processes of the etha.distributed tests: their environment, start and clean-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from etha.kvstore.config import EtcdConfig

REPO = Path(__file__).resolve().parent.parent.parent


_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def child_env(config: EtcdConfig, **extra: str) -> dict[str, str]:
    """The environment of a worker process: ETHA_KV_* of ``config`` plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETHA_KV_") and k not in _SCRUB}
    env.update(config.to_env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
    # Gloo must use loopback: the sandbox's hostname may not resolve.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update(extra)
    return env


class Procs:
    """Child processes started by a test; :meth:`stop` kills whatever is left."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, args: Sequence[str], env: Mapping[str, str], log: Path
    ) -> subprocess.Popen[str]:
        out = log.open("w")
        try:
            proc = subprocess.Popen(
                list(args),
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=REPO,
                start_new_session=True,
            )
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def python(
        self, script: Path, script_args: Sequence[str], env: Mapping[str, str], log: Path
    ) -> subprocess.Popen[str]:
        return self.start([sys.executable, str(script), *script_args], env, log)

    def wait_all(self, procs: Sequence[subprocess.Popen[str]], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"process {proc.args!r} did not finish within {timeout}s"
                ) from None
        return codes

    @staticmethod
    def kill_tree(proc: subprocess.Popen[str]) -> None:
        """SIGKILL the process, its group and its descendants (a node crash).

        torchrun starts each worker in a session of its own, so killing torchrun's
        process group alone would leave the workers running.
        """
        children = descendants(proc.pid)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in children:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                # torchrun stops its workers on SIGTERM; give it a moment.
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            self.kill_tree(proc)
        self.procs.clear()


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextmanager
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
