"""Ending ``multiprocessing`` children that a test spawned (ranks of a workload).

Every wait is bounded: :func:`join_all` shares one deadline among the processes, and
:func:`end_all` (for a fixture's teardown) kills whatever still runs and reaps it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess


def join_all(procs: Sequence[BaseProcess], timeout: float) -> None:
    """Wait for every process to exit, ``timeout`` seconds for all of them together.

    A process still running afterwards is left running: check ``is_alive()``.
    """
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))


def end_all(procs: Sequence[BaseProcess]) -> None:
    """SIGKILL every process still running and reap each one that was started."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        if proc.pid is not None:
            proc.join(10)
