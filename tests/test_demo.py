"""`make demo` end to end: real etcd (auth), a real gateway, emulator, operator, workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_flow_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py"), "--workers", "3"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "DEMO PASSED" in out
    assert "all 3 ranks agreed" in out
    assert "0 left" in out
    assert "old credentials refused by the gateway" in out
    # Workers get the gateway's endpoint, and only that.
    assert "operator (gateway mode)" in out
    assert "ETHA_KV_ENDPOINTS=http://127.0.0.1:" in out
    gateway = out.split("start the etha gateway", 1)[1].split("endpoint ", 1)[1].split(",")[0]
    assert f"ETHA_KV_ENDPOINTS={gateway}" in out
    # The password is injected but never printed.
    assert "ETHA_KV_PASSWORD=<hidden>" in out
