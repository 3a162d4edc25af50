"""Worker processes behind two gateway replicas, while replicas (and etcd's leader) die.

Two ``etha-gateway`` replicas in front of a 3-member etcd cluster (auth on). K worker
processes (8 at quick scale, 16 at full), each listing both gateway endpoints (half of
them the other one first), run the chaos workload of :mod:`tests.support.chaos`
(acknowledged writes, read-backs, barriers) as one rank each, with a gateway tenant's
credentials. Meanwhile a replica is SIGKILLed and restarted on the same port, several
times, alternating replicas; a second test kills a replica and etcd's leader at once.

Checked: every acknowledged write is read back as root straight from etcd (0 lost),
every barrier completes, no stale read, and a failed operation is only ever one of the
documented errors a client sees while a replica or etcd's leader is down
(:data:`DOCUMENTED_ERRORS`). Figures (longest stall, errors, restart times) go to
``ETHA_CHAOS_OUT``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etha.kvstore.errors import KVStoreError
from etha.kvstore.etcd_client import EtcdClient
from tests.reliability.conftest import wait_healthy_with_auth
from tests.support.chaos import EtcdWorkload, FaultLog, full_scale, record, scaled, wait_until
from tests.support.etcd_server import ROOT_USER, EtcdCluster
from tests.support.etcd_users import root_client
from tests.support.gateway import write_token_keys
from tests.support.spawned import end_all, join_all
from tests.support.tenants import root_gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200 if full_scale() else 420)]

#: What a client may see while a replica or etcd's leader is down: a request that found
#: no endpoint answering, or one that ran out of time (both say so, with the endpoint).
DOCUMENTED_ERRORS = frozenset({"UnavailableError", "KVTimeoutError"})
DOWN_S = 1.5
SETTLE_S = 2.0
REQUEST_TIMEOUT_S = 5.0
BARRIER_TIMEOUT_S = 60.0


# -- the worker processes ----------------------------------------------------------------------


def _rank_main(
    index: int,
    spec: dict[str, Any],
    progress: Any,
    stop_at: Any,
    out: str,
) -> None:
    """One rank of the workload in this process; its report, verified as root, to ``out``."""
    try:
        load = EtcdWorkload(
            spec["endpoints"][index],
            username=spec["username"],
            password=spec["password"],
            workers=spec["workers"],
            namespace=spec["namespace"],
            request_timeout=spec["request_timeout"],
            barrier_timeout=spec["barrier_timeout"],
            ranks=[index],
        ).start()
        while stop_at.value == 0:
            progress[index] = load.max_round()
            time.sleep(0.05)
        load.stop(timeout=spec["barrier_timeout"] * 2, at_round=stop_at.value)
        with EtcdClient(
            spec["etcd_endpoints"], username=ROOT_USER, password=spec["root_password"]
        ) as root:
            report = load.verify(root)
        Path(out).write_text(json.dumps(report.to_dict()))
    except BaseException:
        Path(out).write_text(json.dumps({"crashed": traceback.format_exc()}))
        raise


class RankProcesses:
    """K processes, one workload rank each; :meth:`close` ends every one still running."""

    def __init__(self, workdir: Path, spec: dict[str, Any]) -> None:
        # spawn: no fork of a process with gRPC threads, and no fork server left running
        # after the test (each rank imports etha on its own: a few seconds in all)
        ctx = multiprocessing.get_context("spawn")
        self.workers = int(spec["workers"])
        self.progress = ctx.Array("i", self.workers)
        self.stop_at = ctx.Value("i", 0)
        self.outs = [workdir / f"rank-{i}.json" for i in range(self.workers)]
        self.procs = [
            ctx.Process(
                target=_rank_main,
                args=(i, spec, self.progress, self.stop_at, str(self.outs[i])),
                name=f"gateway-chaos-rank-{i}",
                daemon=True,
            )
            for i in range(self.workers)
        ]
        self._started = 0.0

    def start(self) -> RankProcesses:
        self._started = time.monotonic()
        for proc in self.procs:
            proc.start()
        return self

    def max_round(self) -> int:
        return max(self.progress[:])

    def wait_rounds(self, rounds: int, timeout: float = 180.0) -> None:
        """Block until every rank finished ``rounds`` rounds (all started and warm)."""

        def every_rank_there() -> bool:
            if min(self.progress[:]) >= rounds:
                return True
            if dead := [p.name for p in self.procs if not p.is_alive()]:
                raise RuntimeError(f"rank processes exited early: {dead}")
            return False

        wait_until(every_rank_there, timeout, f"every rank to finish {rounds} rounds")

    def stop(self) -> dict[str, Any]:
        """Every rank stops before the same round; their verified reports, merged."""
        # Ranks are at most one barrier apart and report progress every 50 ms: the
        # highest round seen + 3 is ahead of every rank and reachable by all.
        self.stop_at.value = self.max_round() + 3
        join_all(self.procs, BARRIER_TIMEOUT_S * 2 + 120)
        reports = []
        for proc, out in zip(self.procs, self.outs, strict=True):
            if proc.is_alive() or not out.exists():
                reports.append({"crashed": f"{proc.name} did not finish (exit {proc.exitcode})"})
            else:
                reports.append(json.loads(out.read_text()))
        merged = merge_reports(reports, self.workers)
        merged["stop_round"] = self.stop_at.value
        merged["wall_s"] = round(time.monotonic() - self._started, 1)
        return merged

    def close(self) -> None:
        end_all(self.procs)


def merge_reports(reports: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """One report for the whole workload from the ranks' (``WorkloadReport.to_dict()``)."""
    merged: dict[str, Any] = {
        "workers": workers,
        "rounds": 0,
        "duration_s": 0.0,
        "longest_stall_s": 0.0,
        "ops": {},
        "barrier_errors": {},
        "unclear_errors": [],
        "error_samples": [],
        "lost_keys": [],
    }
    summed = (
        "barriers_completed",
        "barriers_failed",
        "writes_acknowledged",
        "writes_unacknowledged",
        "unacknowledged_found_stored",
        "writes_lost",
        "writes_duplicated",
        "stale_reads",
    )
    for key in summed:
        merged[key] = 0
    for rep in reports:
        if "crashed" in rep:
            merged["unclear_errors"].append(f"rank crashed: {rep['crashed'][-600:]}")
            continue
        for key in summed:
            merged[key] += rep[key]
        for key in ("rounds", "duration_s", "longest_stall_s"):
            merged[key] = max(merged[key], rep[key])
        for name, n in rep["barrier_errors"].items():
            merged["barrier_errors"][name] = merged["barrier_errors"].get(name, 0) + n
        for kind, counter in rep["ops"].items():
            into = merged["ops"].setdefault(
                kind,
                {"attempted": 0, "succeeded": 0, "failed": 0, "errors": {}, "max_latency_s": 0},
            )
            for key in ("attempted", "succeeded", "failed"):
                into[key] += counter[key]
            into["max_latency_s"] = max(into["max_latency_s"], counter["max_latency_s"])
            for name, n in counter["errors"].items():
                into["errors"][name] = into["errors"].get(name, 0) + n
        merged["unclear_errors"] += rep["unclear_errors"]
        merged["error_samples"] += rep["error_samples"][: max(0, 6 - len(merged["error_samples"]))]
        merged["lost_keys"] += rep["lost_keys"]
    merged["totals"] = {
        key: sum(c[key] for c in merged["ops"].values())
        for key in ("attempted", "succeeded", "failed")
    }
    merged["errors_by_class"] = {}
    for counter in merged["ops"].values():
        for name, n in counter["errors"].items():
            merged["errors_by_class"][name] = merged["errors_by_class"].get(name, 0) + n
    for name, n in merged["barrier_errors"].items():
        merged["errors_by_class"][name] = merged["errors_by_class"].get(name, 0) + n
    return merged


def check(report: dict[str, Any]) -> None:
    assert report["unclear_errors"] == [], report["unclear_errors"]
    assert report["writes_lost"] == 0, report["lost_keys"]
    assert report["stale_reads"] == 0
    assert report["writes_acknowledged"] > 0
    undocumented = set(report["errors_by_class"]) - DOCUMENTED_ERRORS
    assert not undocumented, (report["errors_by_class"], report["error_samples"])
    # Every barrier of every rank completed: none failed, none left unattended.
    assert report["barriers_failed"] == 0, (report["barrier_errors"], report["error_samples"])
    assert report["barriers_completed"] == report["rounds"] * report["workers"]
    assert report["rounds"] == report["stop_round"]


# -- fixtures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    username: str
    secret: str
    prefix: str


@pytest.fixture
def replicas(trio: EtcdCluster, tmp_path: Path) -> Iterator[list[Any]]:
    """Two gateway replicas (one token key file) in front of ``trio``; both stopped at the end."""
    keys = write_token_keys(tmp_path / "token.keys")
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                root_gateway(
                    trio, tmp_path / f"gateway-{i}", token_key_file=keys, name=f"replica-{i}"
                )
            )
            for i in range(2)
        ]


@pytest.fixture
def ranks_factory(tmp_path: Path) -> Iterator[Any]:
    """Makes :class:`RankProcesses`; every process they started is ended at teardown."""
    numbers = itertools.count()
    with contextlib.ExitStack() as made:

        def make(spec: dict[str, Any]) -> RankProcesses:
            workdir = tmp_path / f"ranks-{next(numbers)}"
            workdir.mkdir()
            ranks = RankProcesses(workdir, spec)
            made.callback(ranks.close)
            return ranks

        yield make


def _spec(trio: EtcdCluster, replicas: list[Any], tenant: Tenant, workers: int) -> dict[str, Any]:
    endpoints = [gw.endpoint for gw in replicas]
    return {
        "workers": workers,
        # half the ranks list the other replica first: both replicas carry load
        "endpoints": [endpoints[i % 2 :] + endpoints[: i % 2] for i in range(workers)],
        "username": tenant.username,
        "password": tenant.secret,
        "namespace": tenant.prefix,
        "etcd_endpoints": trio.endpoints,
        "root_password": trio.root_password,
        "request_timeout": REQUEST_TIMEOUT_S,
        "barrier_timeout": BARRIER_TIMEOUT_S,
    }


def _tenant(trio: EtcdCluster, replicas: list[Any]) -> Tenant:
    """A tenant registered as the operator does, once every replica lets it log in."""
    support = pytest.importorskip("tests.support.gateway")
    with root_client(trio) as root:
        tenant = Tenant(*support.register_tenant(root, f"gwchaos-{uuid.uuid4().hex[:8]}"))
    for gw in replicas:
        wait_until(lambda gw=gw: _logs_in(gw.endpoint, tenant), 30, f"{gw.name} to know the tenant")
    return tenant


def _logs_in(endpoint: str, tenant: Tenant) -> bool:
    try:
        with EtcdClient(
            [endpoint], username=tenant.username, password=tenant.secret, timeout=5
        ) as client:
            client.range(f"{tenant.prefix}/probe".encode())
    except KVStoreError:
        return False
    return True


def _restart(gw: Any, ranks: RankProcesses, faults: FaultLog, kind: str) -> dict[str, Any]:
    """SIGKILL ``gw``, keep it down DOWN_S, start it on the same port.

    Returns how long the restart took to be ready, and ``resumed_s``: seconds from the
    kill until every rank had completed two more rounds (a whole barrier begun after
    the kill), measured while the replica is still down when the ranks got there
    through the other replica (``resumed_while_down``).
    """
    with faults.fault(kind):
        before = ranks.max_round()
        killed = time.monotonic()
        gw.kill()
        resumed = _wait_resumed(ranks, before, killed + DOWN_S)
        while_down = resumed is not None
        time.sleep(max(0.0, killed + DOWN_S - time.monotonic()))
        started = time.monotonic()
        gw.start()
        ready = time.monotonic() - started
        if resumed is None:
            resumed = _wait_resumed(ranks, before, time.monotonic() + BARRIER_TIMEOUT_S)
    return {
        "ready_s": round(ready, 3),
        "resumed_s": None if resumed is None else round(resumed - killed, 3),
        "resumed_while_down": while_down,
    }


def _wait_resumed(ranks: RankProcesses, before: int, until: float) -> float | None:
    """When every rank reached round ``before + 2``, or None if not before ``until``."""
    while time.monotonic() < until:
        if min(ranks.progress[:]) >= before + 2:
            return time.monotonic()
        time.sleep(0.02)
    return None


# -- the tests -----------------------------------------------------------------------------------


def test_ranks_survive_gateway_replica_kills(
    trio: EtcdCluster, replicas: list[Any], ranks_factory: Any
) -> None:
    workers = scaled(8, 16)
    kills = scaled(3, 8)
    tenant = _tenant(trio, replicas)
    ranks = ranks_factory(_spec(trio, replicas, tenant, workers)).start()
    faults = FaultLog()
    restarts: list[dict[str, Any]] = []
    try:
        ranks.wait_rounds(3)
        for i in range(kills):
            restarts.append(_restart(replicas[i % 2], ranks, faults, "gateway_replica_sigkill"))
            time.sleep(SETTLE_S)
    finally:
        report = ranks.stop()
    report.update(
        faults=faults.counts,
        fault_durations_s=faults.durations_s,
        replica_ready_after_restart_s=[r["ready_s"] for r in restarts],
        ranks_resumed_after_kill_s=[r["resumed_s"] for r in restarts],
        ranks_resumed_while_replica_down=sum(r["resumed_while_down"] for r in restarts),
        replicas=2,
        etcd_members=3,
        down_s=DOWN_S,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    record("gateway_replica_kills", report)
    print(report)
    check(report)


def test_ranks_survive_a_gateway_replica_and_etcds_leader_killed_together(
    trio: EtcdCluster, replicas: list[Any], ranks_factory: Any
) -> None:
    workers = scaled(8, 16)
    tenant = _tenant(trio, replicas)
    ranks = ranks_factory(_spec(trio, replicas, tenant, workers)).start()
    faults = FaultLog()
    etcd_recovery = float("nan")
    try:
        ranks.wait_rounds(3)
        leader = trio.leader()
        with faults.fault("gateway_replica_and_etcd_leader_sigkill"):
            replicas[0].kill()
            leader.kill()
            time.sleep(DOWN_S)
            leader.start()
            replicas[0].start()
            etcd_recovery = wait_healthy_with_auth(trio)
        time.sleep(SETTLE_S * 2)
    finally:
        report = ranks.stop()
    report.update(
        faults=faults.counts,
        fault_durations_s=faults.durations_s,
        etcd_healthy_after_restart_s=round(etcd_recovery, 3),
        replicas=2,
        etcd_members=3,
        down_s=DOWN_S,
    )
    record("gateway_replica_and_etcd_leader_kill", report)
    print(report)
    check(report)
    # The tenant's data is where the gateway put it, under its prefix, as root sees it.
    with root_client(trio) as root:
        assert root.range(f"{tenant.prefix}/chaos/data/w0/r0".encode()).kvs
