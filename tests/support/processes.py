"""Ending the server processes that test support starts."""

from __future__ import annotations

import signal
import subprocess


def end_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: signal.Signals, grace: float = 10.0
) -> None:
    """Send ``sig`` to a running ``proc`` and reap it; SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
