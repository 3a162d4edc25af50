"""The TCPStore server process is SIGKILLed under K client processes: all fail fast.

Each client is its own process (own connection), busy in a long wait (timeout 3600 s),
a multi-key wait, or a set/get loop when the server dies. Checked: every client fails
with a documented etha error whose message says what happened, within its request
timeout (+ slack for this noisy machine), and a further call fails at once too; no
client hangs. Extends tests/test_tcpstore_backend.py (one client, one wait).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.chaos import record, scaled
from tests.support.tcpstore_server import TCPStoreServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
REQUEST_TIMEOUT = 5.0
SLACK = 10.0

_CLIENT = """
import json, sys, time
from etha.kvstore.errors import KVStoreError
from etha.kvstore.tcpstore import TCPStoreKVStore
host, port, timeout, index = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
store = TCPStoreKVStore("death", host=host, port=port, timeout=timeout)
store.set(f"ready/{index}", "1")
mode = ("wait_for_key", "wait_for_keys", "set_get_loop")[index % 3]
print(json.dumps({"ready": mode}), flush=True)
def report(exc, **extra):
    return {"error": type(exc).__name__, "documented": isinstance(exc, KVStoreError),
            "message": str(exc)[:300], "failed_at": time.monotonic(), **extra}
try:
    if mode == "wait_for_key":
        store.wait_for_key("never", timeout=3600)
    elif mode == "wait_for_keys":
        store.wait_for_keys("never/*", 2, candidate_keys=["never/0", "never/1"], timeout=3600)
    else:
        while True:
            store.set("busy", str(index))
            store.get("busy")
    out = {"error": None}
except BaseException as exc:
    out = report(exc, mode=mode)
started = time.monotonic()
try:
    store.get("after")
    out["after"] = None
except BaseException as exc:
    out["after"] = type(exc).__name__
    out["after_s"] = time.monotonic() - started
print(json.dumps(out), flush=True)
"""


def test_clients_fail_fast_when_the_server_process_dies() -> None:
    clients = scaled(4, 16)
    rounds = scaled(1, 3)
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_CPP_LOG_LEVEL="ERROR")
    outcomes: list[dict[str, object]] = []
    for _ in range(rounds):
        server = TCPStoreServer().start()
        procs: list[subprocess.Popen[str]] = []
        try:
            for i in range(clients):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            _CLIENT,
                            "127.0.0.1",
                            str(server.port),
                            str(REQUEST_TIMEOUT),
                            str(i),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                        env=env,
                        start_new_session=True,
                    )
                )
            for proc in procs:
                assert proc.stdout is not None
                assert "ready" in json.loads(proc.stdout.readline())
            time.sleep(0.5)  # every client is now inside its call
            killed_at = time.monotonic()
            server.kill()
            for proc in procs:
                try:
                    out, _ = proc.communicate(timeout=REQUEST_TIMEOUT + SLACK + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                    outcomes.append({"error": "HUNG"})
                    continue
                result = json.loads(out.strip().splitlines()[-1])
                if result.get("failed_at") is not None:
                    result["seconds_to_fail"] = round(float(result["failed_at"]) - killed_at, 3)
                outcomes.append(result)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            server.kill()
    seconds = [float(o["seconds_to_fail"]) for o in outcomes if "seconds_to_fail" in o]
    errors: dict[str, int] = {}
    for o in outcomes:
        errors[str(o["error"])] = errors.get(str(o["error"]), 0) + 1
    record(
        "tcpstore_server_death",
        {
            "server_sigkills": rounds,
            "clients_per_kill": clients,
            "client_processes": len(outcomes),
            "errors": errors,
            "hung": errors.get("HUNG", 0),
            "request_timeout_s": REQUEST_TIMEOUT,
            "seconds_to_fail_max": round(max(seconds), 3) if seconds else None,
            "seconds_to_fail_median": round(sorted(seconds)[len(seconds) // 2], 3)
            if seconds
            else None,
            "next_call_fails_in_s_max": round(
                max(float(o.get("after_s", 0.0)) for o in outcomes),
                3,  # type: ignore[arg-type]
            ),
            "sample_message": next((o["message"] for o in outcomes if o.get("message")), None),
        },
    )
    assert len(outcomes) == clients * rounds
    for o in outcomes:
        assert o["error"] not in (None, "HUNG"), o
        assert o["documented"] is True, o
        assert o["error"] in ("UnavailableError", "KVTimeoutError", "StoreClosedError"), o
        assert "server" in str(o["message"]).lower() or "connect" in str(o["message"]).lower(), o
        assert float(o["seconds_to_fail"]) < REQUEST_TIMEOUT + SLACK, o  # type: ignore[arg-type]
        assert o["after"] in ("UnavailableError", "KVTimeoutError", "StoreClosedError"), o
        assert float(o["after_s"]) < REQUEST_TIMEOUT + SLACK, o  # type: ignore[arg-type]
