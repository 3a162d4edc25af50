"""The operator is SIGKILLed at random points (fixed seed) and restarted, M times.

Each round picks an action (provision a new KVNamespace, end a job, delete a KVNamespace)
and a kill point: a random delay (0-0.6 s), right after the operator's n-th API request
(n in 1..6), or while one of its requests is held in flight (then dropped). It starts the
action with the operator running, SIGKILLs the operator at that point, records
how far the work had got at the kill, restarts the operator and waits for convergence:

* every KVNamespace is Ready (or Cleaned after its job ended) or gone;
* the etcd users and roles named ``etha-*`` are exactly those of live KVNamespaces
  (no orphan, none missing) and each live one's Secret logs in;
* no key is left under the prefix of a deleted or cleaned KVNamespace.

Extends tests/operator/test_crash_recovery.py (two fixed kill points) with random ones.
M = 4 in quick mode, 24 with ETHA_CHAOS_SCALE=full (make chaos).
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.operator.helpers import (
    API,
    PLURAL,
    count_keys,
    etcd_roles,
    etcd_users,
    finish_job,
    job,
    kvnamespace,
    store_from_secret,
)
from tests.support.chaos import full_scale, record, scaled
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400 if full_scale() else 600)]

NS = "crash"
SEED = 20261127
CONVERGE_TIMEOUT = 90.0
#: Requests to hold (and drop) while the operator is killed, per action: each is a point
#: between two of the operator's steps (etcd work before it, API writes after it).
HOLD_POINTS: dict[str, list[tuple[str, str, str | None]]] = {
    "provision": [("POST", "secrets", None), ("PATCH", "kvnamespaces", "status")],
    "job_end": [("PATCH", "kvnamespaces", "status"), ("POST", "events", None)],
    "delete": [("DELETE", "secrets", None), ("PATCH", "kvnamespaces", None)],
}


@dataclass
class Tracked:
    name: str
    uid: str
    expect: str  # "Ready", "Cleaned" or "gone"
    prefix: str | None = None


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A private etcd: the orphan check must see every etha-* user, and only ours."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd-crash"), auth=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def kube() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


def _status(kube: EmulatorServer, name: str) -> dict[str, Any] | None:
    obj = kube.find(API, PLURAL, name, NS)
    return None if obj is None else (obj.get("status") or {})


def _etha(names: list[str]) -> set[str]:
    return {n for n in names if n.startswith("etha-")}


def _landing(kube: EmulatorServer, etcd: EtcdCluster, t: Tracked, action: str) -> str:
    """Where the work stood when the operator died (for the figures)."""
    status = _status(kube, t.name)
    if action == "delete":
        if status is None:
            return "delete: finished"
        users = etcd_users(etcd)
        return "delete: user still there" if f"etha-{t.uid}" in users else "delete: user gone"
    if action == "job_end":
        phase = (status or {}).get("phase")
        return f"job_end: phase {phase}"
    if (status or {}).get("phase") == "Ready":
        return "provision: already Ready"
    has_secret = kube.find("v1", "secrets", f"{t.name}-etha-kv", NS) is not None
    has_user = f"etha-{t.uid}" in etcd_users(etcd)
    if has_secret:
        return "provision: Secret written, not Ready"
    return "provision: etcd user only" if has_user else "provision: nothing yet"


def _requests(kube: EmulatorServer) -> int:
    assert kube.emulator is not None
    return len(kube.emulator.request_log)


def _after_requests(kube: EmulatorServer, base: int, nth: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _requests(kube) < base + nth and time.monotonic() < deadline:
        time.sleep(0.002)


def _converged(kube: EmulatorServer, etcd: EtcdCluster, tracked: list[Tracked]) -> str | None:
    """None when converged, else what is still wrong."""
    live_uids = set()
    for t in tracked:
        status = _status(kube, t.name)
        if t.expect == "gone":
            if status is not None:
                return f"{t.name} still exists"
            continue
        if status is None:
            return f"{t.name} disappeared"
        if status.get("phase") != t.expect:
            return f"{t.name} is {status.get('phase')}, want {t.expect}"
        live_uids.add(t.uid)
    want = {f"etha-{uid}" for uid in live_uids}
    users, roles = _etha(etcd_users(etcd)), _etha(etcd_roles(etcd))
    if users != want:
        return f"etcd users differ: extra {users - want}, missing {want - users}"
    if roles != want:
        return f"etcd roles differ: extra {roles - want}, missing {want - roles}"
    for t in tracked:
        if t.expect in ("gone", "Cleaned") and t.prefix and count_keys(etcd, t.prefix):
            return f"keys left under {t.prefix}/"
    return None


def _wait_converged(kube: EmulatorServer, etcd: EtcdCluster, tracked: list[Tracked]) -> float:
    started = time.monotonic()
    while True:
        problem = _converged(kube, etcd, tracked)
        if problem is None:
            return time.monotonic() - started
        if time.monotonic() - started > CONVERGE_TIMEOUT:
            raise AssertionError(f"not converged after {CONVERGE_TIMEOUT}s: {problem}")
        time.sleep(0.3)


def test_operator_killed_at_random_points_converges(
    kube: EmulatorServer, etcd: EtcdCluster, tmp_path: Path
) -> None:
    rounds = scaled(4, 24)
    rng = random.Random(SEED)
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    tracked: list[Tracked] = []
    landings: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    converge_s: list[float] = []
    restart_s: list[float] = []
    made: list[OperatorProcess] = []

    def start_operator() -> OperatorProcess:
        proc = OperatorProcess(
            kubeconfig=kubeconfig,
            etcd_endpoints=etcd.urls,
            root_password=etcd.root_password,
            log_path=tmp_path / f"operator-{len(made)}.log",
        )
        made.append(proc)
        started = time.monotonic()
        proc.start()
        restart_s.append(time.monotonic() - started)
        return proc

    def create(expect: str = "Ready") -> Tracked:
        name = f"kv-{uuid.uuid4().hex[:6]}"
        kube.create("batch/v1", "jobs", job(name), NS)
        uid = kube.create(API, PLURAL, kvnamespace(name, name), NS)["metadata"]["uid"]
        t = Tracked(name, uid, expect)
        tracked.append(t)
        return t

    def ready_one() -> Tracked:
        candidates = [t for t in tracked if t.expect == "Ready"]
        if candidates:
            t = rng.choice(candidates)
        else:
            t = create()
            _wait_converged(kube, etcd, tracked)
        status = _status(kube, t.name) or {}
        t.prefix = status["keyPrefix"]
        with store_from_secret(kube, NS, f"{t.name}-etha-kv") as store:
            for i in range(5):
                store.set(f"rank:{i}/ready", "1")
        return t

    operator = start_operator()
    try:
        for _ in range(rounds):
            action = rng.choice(["provision", "job_end", "delete"])
            mode = rng.choice(["timed", "nth_request", "held"])
            if action in ("job_end", "delete"):
                target = ready_one()
            base = _requests(kube)
            hold_point = rng.choice(HOLD_POINTS[action])
            with kube.hold(*hold_point) if mode == "held" else nullcontext() as hold:
                if action == "provision":
                    target = create()
                elif action == "job_end":
                    target.expect = "Cleaned"
                    finish_job(kube, NS, target.name)
                else:
                    target.expect = "gone"
                    kube.delete(API, PLURAL, target.name, NS)
                if hold is not None:
                    # Killed while its request is in flight: the API never applies it.
                    hold.reached.wait(15)
                elif mode == "nth_request":
                    _after_requests(kube, base, rng.randint(1, 6))
                else:
                    time.sleep(rng.uniform(0.0, 0.6))
                operator.kill()
                if hold is not None:
                    hold.release(fail=True)
            modes[mode if hold is None else f"held at {' '.join(filter(None, hold_point))}"] += 1
            actions[action] += 1
            landings[_landing(kube, etcd, target, action)] += 1
            operator = start_operator()
            converge_s.append(_wait_converged(kube, etcd, tracked))
            # Every live KVNamespace's Secret still logs in and reaches its own prefix.
            for t in tracked:
                if t.expect == "Ready":
                    with store_from_secret(kube, NS, f"{t.name}-etha-kv") as store:
                        store.set("alive", "1")
                        assert store.get("alive") == b"1"
                    t.prefix = (_status(kube, t.name) or {})["keyPrefix"]
        # Clean-up through the operator: nothing may be left in etcd afterwards.
        for t in tracked:
            if t.expect != "gone":
                t.prefix = (_status(kube, t.name) or {}).get("keyPrefix")
                kube.delete(API, PLURAL, t.name, NS)
                t.expect = "gone"
        _wait_converged(kube, etcd, tracked)
        assert _etha(etcd_users(etcd)) == set() and _etha(etcd_roles(etcd)) == set()
        leftover = etcd.etcdctl("get", "", "--from-key", "--keys-only").stdout.split()
        assert leftover == [], leftover
    finally:
        for proc in made:
            proc.stop()
    figures = {
        "seed": SEED,
        "kill_modes": dict(sorted(modes.items())),
        "operator_sigkills": sum(actions.values()),
        "actions": dict(actions),
        "kill_landed": dict(sorted(landings.items())),
        "kvnamespaces": len(tracked),
        "converge_after_restart_s": {
            "max": round(max(converge_s), 3),
            "median": round(sorted(converge_s)[len(converge_s) // 2], 3),
        },
        "operator_start_s_max": round(max(restart_s), 3),
        "orphan_users_or_roles": 0,
        "leftover_keys": 0,
    }
    record("operator_crash_safety", figures)
    print(figures)
