"""What the gateway costs: etha through ``etha-gateway`` against etha straight to etcd.

Both configurations run in the same run, against the same one-member etcd (auth on, at
the bcrypt cost the tests' etcd uses: etcd's default, 10), with the same client library
(:class:`etha.kvstore.etcd.EtcdKVStore`), each with its own credentials:

* ``direct``: an etcd user whose only role grants read-write on ``<namespace>/``, as
  the operator's direct mode provisions;
* ``gateway``: a tenant of the gateway's registry (its secret checked with SHA-256 by
  the gateway, which forwards to etcd with its own etcd login).

The two take turns in interleaved rounds (order rotated every round) so that machine
noise hits them alike; every ratio is gateway / direct of the same run, pooled and per
round (median and interquartile range of the per-round ratios).

Figures (names under ``gateway.``):

* ``op.<op>.<size>.<side>``: single-op latency in this process (``get``/``set`` of
  100 B and 64 KiB); target gateway p50 <= 1.5x direct.
* ``wake.<side>``: a ``set`` in this process seen by a ``wait_for_key`` in another
  process (the waiter is told to wait, this process sleeps ``ARM_S``, takes ``t0`` and
  sets the key; the waiter takes ``t1`` when its wait returns); target p50 <= 2x.
* ``barrier.N<n>.<side>``: n worker processes, one store per process and side (each
  side its own connection), each rank sets its key at a common ``go`` and waits for all
  n; the figure is ``max(done) - go``; target median <= 1.5x.
* ``login.sustained.<side>``: C concurrent clients in 4 processes, each on its own
  (connected) channel, log in (``Auth.Authenticate``) a fixed number of times back to
  back; the figure is ms per log-in (from the common start until the last client is
  done, / log-ins), target <= 0.5 ms (>= 2,000 log-ins/s) for the gateway. The CPU of
  the server(s) and of the client processes per log-in is recorded beside it.
* ``login.storm.<side>``: K new ``EtcdClient`` objects at once (own channel each) log in
  and read one key; the figure is the time until the last is done.
* ``cpu.<what>.<side>``: CPU (user + system, ``/proc/<pid>/stat``) of the gateway
  process and of etcd per request over a measured batch of sequential requests.
* ``floor``: a third configuration in the op and CPU rounds: direct's credentials
  through ``bench/proto_passthrough.py`` (a grpc.aio proxy that forwards raw bytes and
  checks nothing), the least any gateway on Python's gRPC stack can cost.
* ``noise``: load averages, the machine's busy CPU share and the share used by
  processes outside this benchmark's process tree.

``python -m bench.bench_gateway [--json FILE] [--doc docs/benchmarks.md]`` prints the
markdown of the gateway section's tables from a run's JSON, or puts it between the
``gateway-results`` markers of the doc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    LATEST,
    EtcdCounters,
    Figure,
    WorkerError,
    Workers,
    etcd_with_user,
    figure,
    fmt,
    log,
    percentile,
    run_threads,
    sleep_until,
)

SIDES = ("direct", "gateway")
SIZES = {"100B": 100, "64KiB": 64 * 1024}
ARM_S = 0.02
WAIT_S = 120.0
#: A barrier that takes longer is counted as failed (with its error) and the run goes on.
BARRIER_WAIT_S = 30.0
PRELOAD = ("bench.common", "grpc", "pyetcd.etcdrpc", "etha.kvstore.etcd")


@dataclass(frozen=True)
class Side:
    """One configuration: where its clients connect and as whom."""

    name: str
    endpoints: tuple[str, ...]
    username: str
    password: str
    namespace: str
    #: The process a request reaches first (etcd for direct, the gateway otherwise).
    pid: int
    #: etcd's pid (the same as ``pid`` for direct).
    etcd_pid: int

    def info(self) -> dict[str, Any]:
        """What a worker process needs to open a store (picklable)."""
        return {
            "endpoints": list(self.endpoints),
            "username": self.username,
            "password": self.password,
            "namespace": self.namespace,
        }


# -- statistics --------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    """p25, p50, p75, p90, p99 and the interquartile range (same unit as given)."""
    if not values:
        return {k: math.nan for k in ("p25", "p50", "p75", "p90", "p99", "iqr")}
    out = {f"p{q}": percentile(values, q) for q in (25, 50, 75, 90, 99)}
    out["iqr"] = out["p75"] - out["p25"]
    return out


def _fig(samples: Sequence[float], *, scale: float = 1000.0, **extra: Any) -> Figure:
    fig = figure(samples, scale=scale, **extra)
    fig.update({k: v for k, v in spread([s * scale for s in samples]).items() if k != "p50"})
    return fig


def _ratio_spread(per_round: Sequence[dict[str, float]], num: str, den: str) -> dict[str, Any]:
    ratios = [r[num] / r[den] for r in per_round if r.get(den) and r.get(num)]
    if not ratios:
        return {}
    return {
        "median": percentile(ratios, 50),
        "p25": percentile(ratios, 25),
        "p75": percentile(ratios, 75),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def _rotated(r: int, names: Sequence[str] = SIDES) -> tuple[str, ...]:
    """``names`` rotated by ``r``: who goes first changes every round."""
    k = r % len(names)
    return tuple(names[k:]) + tuple(names[:k])


# -- processes and noise ---------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every living descendant (threads included)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def _machine_busy() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of the whole machine since boot, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    steal = parts[7] if len(parts) > 7 else 0
    total = sum(parts[:8])
    return total - idle, steal, total


class Noise:
    """How busy the machine was around a measurement: load averages, CPU busy and steal."""

    def __init__(self) -> None:
        self.load_start = os.getloadavg()
        self._start = _machine_busy()
        self._own0 = tree_cpu(os.getpid())
        self._t0 = time.monotonic()

    def report(self) -> dict[str, Any]:
        """Call it while the benchmark's processes still run (their CPU is counted)."""
        own_cpu_s = tree_cpu(os.getpid()) - self._own0
        busy0, steal0, total0 = self._start
        busy1, steal1, total1 = _machine_busy()
        total = max(total1 - total0, 1)
        out: dict[str, Any] = {
            "loadavg_start": [round(x, 2) for x in self.load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "machine_busy_pct": round(100 * (busy1 - busy0) / total, 1),
            "steal_pct": round(100 * (steal1 - steal0) / total, 1),
            "seconds": round(time.monotonic() - self._t0, 1),
            "cores": os.cpu_count(),
        }
        tick = os.sysconf("SC_CLK_TCK")
        other = (busy1 - busy0) / tick - own_cpu_s
        out["other_processes_cpu_pct"] = round(
            100 * max(other, 0.0) / (out["seconds"] * (os.cpu_count() or 1)), 1
        )
        return out


# -- the deployment ----------------------------------------------------------------------------


@contextlib.contextmanager
def deployment(workdir: Path) -> Iterator[tuple[Any, dict[str, Side]]]:
    """etcd with auth, a prefix user for ``direct``, and a gateway with one tenant.

    Yields ``(cluster, sides)``; ``sides`` lacks ``gateway`` when the gateway is not
    available in this tree (then only the direct baseline is measured).
    """
    direct_ns = f"bench-gw-direct-{uuid.uuid4().hex[:8]}"
    user, password = f"u-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    with etcd_with_user(user, password, f"{direct_ns}/") as cluster:
        etcd_proc = cluster.nodes[0].process
        assert etcd_proc is not None
        sides = {
            "direct": Side(
                "direct",
                tuple(cluster.endpoints),
                user,
                password,
                direct_ns,
                etcd_proc.pid,
                etcd_proc.pid,
            )
        }
        with (
            _gateway(cluster, workdir) as gateway_side,
            _floor(cluster, sides["direct"], "floor") as floor_side,
            _floor(cluster, sides["direct"], "floor-sync") as floor_sync_side,
        ):
            if gateway_side is not None:
                sides["gateway"] = gateway_side
            sides["floor"] = floor_side
            sides["floor-sync"] = floor_sync_side
            yield cluster, sides


@contextlib.contextmanager
def _floor(cluster: Any, direct: Side, name: str) -> Iterator[Side]:
    """The pass-through proxy of ``bench/proto_passthrough.py`` with direct's credentials
    (``floor``: grpc.aio; ``floor-sync``: grpc's thread-pool server)."""
    import signal
    import subprocess
    import sys

    from tests.support.ports import free_port, wait_port
    from tests.support.processes import end_process

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.proto_passthrough",
            *(["--sync"] if name == "floor-sync" else []),
            f"127.0.0.1:{port}",
            cluster.endpoints[0],
        ],
        cwd=str(Path(__file__).resolve().parents[1]),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port("127.0.0.1", port, timeout=30)
        yield Side(
            name,
            (f"127.0.0.1:{port}",),
            direct.username,
            direct.password,
            direct.namespace,
            proc.pid,
            direct.etcd_pid,
        )
    finally:
        end_process(proc, signal.SIGTERM)


@contextlib.contextmanager
def _gateway(cluster: Any, workdir: Path) -> Iterator[Side | None]:
    """One gateway replica in front of ``cluster`` and one registered tenant, or None."""
    try:
        from tests.support import gateway as support
    except ImportError as exc:
        log(f"gateway: not available in this tree ({exc}); measuring the direct baseline only")
        yield None
        return
    from tests.support.etcd_server import ROOT_USER
    from tests.support.etcd_users import root_client

    etcd_proc = cluster.nodes[0].process
    assert etcd_proc is not None
    with root_client(cluster) as root:
        username, secret, prefix = support.register_tenant(root, f"bench-gw-{uuid.uuid4().hex[:8]}")
    gw = support.GatewayProcess(
        cluster.endpoints, workdir, username=ROOT_USER, password=cluster.root_password
    )
    try:
        gw.start()
        assert gw.process is not None
        side = Side(
            "gateway", (gw.endpoint,), username, secret, prefix, gw.process.pid, etcd_proc.pid
        )
        wait_logged_in(side)
        yield side
    finally:
        gw.stop()


def wait_logged_in(side: Side, timeout: float = 30.0) -> None:
    """Block until ``side``'s credentials log in (a gateway learns new tenants by watch)."""
    from etha.kvstore.errors import KVStoreError
    from etha.kvstore.etcd_client import EtcdClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            with EtcdClient(
                list(side.endpoints), username=side.username, password=side.password, timeout=5
            ) as client:
                client.range(f"{side.namespace}/probe".encode())
        except KVStoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        else:
            return


# -- worker processes -------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _open(info: dict[str, Any]) -> Any:
    from etha.kvstore.etcd import EtcdKVStore

    return EtcdKVStore(
        info["namespace"],
        endpoints=info["endpoints"],
        username=info["username"],
        password=info["password"],
        timeout=WAIT_S,
    )


def w_open(sides: dict[str, dict[str, Any]], rank: int) -> dict[str, float]:
    """Open one store per side (each its own client: its own channel and log-in)."""
    _W["rank"] = rank
    took: dict[str, float] = {}
    for name, info in sides.items():
        t0 = time.perf_counter()
        store = _open(info)
        store.exists("probe")  # connected and logged in
        took[name] = time.perf_counter() - t0
        _W[name] = store
    return took


def w_close() -> None:
    for name in SIDES:
        store = _W.pop(name, None)
        if store is not None:
            store.close(cleanup=False)


def w_wait(side: str, key: str) -> tuple[float, float]:
    store = _W[side]
    t_call = time.perf_counter()
    store.wait_for_key(key, timeout=WAIT_S)
    return t_call, time.perf_counter()


def w_barrier(side: str, round_id: str, n: int, go: float) -> tuple[float, float]:
    store = _W[side]
    sleep_until(go)
    store.set(f"b/{round_id}/rank:{_W['rank']}", "1")
    t_set = time.perf_counter()
    store.wait_for_keys(f"b/{round_id}/rank:*", n, timeout=BARRIER_WAIT_S)
    return t_set, time.perf_counter()


def w_cpu() -> float:
    return time.process_time()


def w_login_loop(info: dict[str, Any], clients: int, count: int, go: float) -> list[float]:
    """``clients`` threads, each on its own channel, log in ``count`` times back to back
    from ``go``; seconds from ``go`` until each thread's last log-in returned."""
    import grpc
    from pyetcd import etcdrpc

    target = info["endpoints"][0]
    request = etcdrpc.AuthenticateRequest(name=info["username"], password=info["password"])

    def one() -> float:
        with grpc.insecure_channel(target) as channel:
            # connected before ``go``, not logged in
            grpc.channel_ready_future(channel).result(timeout=WAIT_S)
            auth = etcdrpc.AuthStub(channel)
            sleep_until(go)
            for _ in range(count):
                auth.Authenticate(request, timeout=WAIT_S)
            return time.perf_counter() - go

    return run_threads([one] * clients)


def w_login_storm(info: dict[str, Any], clients: int, go: float) -> list[float]:
    """``clients`` new ``EtcdClient`` objects log in and read one key at ``go``."""
    from etha.kvstore.etcd_client import EtcdClient

    key = f"{info['namespace']}/default/probe".encode()
    made: list[Any] = []
    lock = threading.Lock()

    def one() -> float:
        sleep_until(go)
        client = EtcdClient(
            info["endpoints"],
            username=info["username"],
            password=info["password"],
            timeout=WAIT_S,
        )
        with lock:
            made.append(client)
        client.range(key)
        return time.perf_counter() - go

    try:
        return run_threads([one] * clients)
    finally:
        for client in made:
            client.close()


# -- the measurements --------------------------------------------------------------------------


def _measure(op: Callable[[], object], n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        op()
        out.append(clock() - t0)


def bench_ops(sides: dict[str, Side], quick: bool) -> dict[str, Figure]:
    """Single-op latency of both sides in this process, interleaved rounds."""
    rounds, batch, warmup = (3, 30, 20) if quick else (15, 100, 100)
    stores = {name: _open(side.info()) for name, side in sides.items()}
    names = tuple(stores)
    figures: dict[str, Figure] = {}
    try:
        for size_name, size in SIZES.items():
            value = "v" * size
            ops: dict[str, dict[str, Callable[[], object]]] = {}
            for name, store in stores.items():
                store.set(f"ops/{size_name}", value)
                assert store.get(f"ops/{size_name}") == value.encode()
                ops[name] = {
                    "get": lambda s=store, k=f"ops/{size_name}": s.get(k),
                    "set": lambda s=store, k=f"ops/{size_name}", v=value: s.set(k, v),
                }
            log(f"gateway ops {size_name}: {rounds} rounds x {batch}, sides {list(stores)}")
            for op in ("get", "set"):
                for name in stores:
                    _measure(ops[name][op], warmup, [])
                pooled: dict[str, list[float]] = {name: [] for name in stores}
                per_round: list[dict[str, float]] = []
                for r in range(rounds):
                    this: dict[str, float] = {}
                    for name in _rotated(r, names):
                        chunk: list[float] = []
                        _measure(ops[name][op], batch, chunk)
                        pooled[name].extend(chunk)
                        this[name] = percentile(chunk, 50)
                    per_round.append(this)
                base = f"gateway.op.{op}.{size_name}.direct"
                figures[base] = _fig(pooled["direct"], note="single op, this process")
                if "gateway" in stores:
                    figures[f"gateway.op.{op}.{size_name}.gateway"] = _fig(
                        pooled["gateway"],
                        baseline=base,
                        target={"stat": "p50", "max_ratio": 1.5},
                        ratio_rounds=_ratio_spread(per_round, "gateway", "direct"),
                        note="single op, this process, interleaved with direct",
                    )
                for floor in ("floor", "floor-sync"):
                    if floor in stores:
                        figures[f"gateway.op.{op}.{size_name}.{floor}"] = _fig(
                            pooled[floor],
                            baseline=base,
                            ratio_rounds=_ratio_spread(per_round, floor, "direct"),
                            note=f"through bench/proto_passthrough.py ({floor})",
                        )
    finally:
        for store in stores.values():
            store.close(cleanup=False)
    return figures


def bench_cpu(sides: dict[str, Side], etcd_url: str, quick: bool) -> dict[str, Figure]:
    """Server CPU per request: a batch of sequential requests, /proc before and after;
    etcd's own request counters say what each request cost etcd."""
    calls, reps = (300, 2) if quick else (2000, 5)
    stores = {name: _open(side.info()) for name, side in sides.items()}
    names = tuple(stores)
    figures: dict[str, Figure] = {}
    value = "v" * 100
    try:
        for store in stores.values():
            store.set("cpu/k", value)
        for what in ("get", "set"):
            samples: dict[str, dict[str, list[float]]] = {
                name: {"front": [], "etcd": []} for name in stores
            }
            etcd_calls: dict[str, dict[str, float]] = {name: {} for name in stores}
            for r in range(reps):
                for name in _rotated(r, names):
                    store, side = stores[name], sides[name]
                    fn = (
                        (lambda s=store: s.get("cpu/k"))
                        if what == "get"
                        else (lambda s=store: s.set("cpu/k", value))
                    )
                    counters = EtcdCounters(etcd_url)
                    front0, etcd0 = proc_cpu(side.pid), proc_cpu(side.etcd_pid)
                    for _ in range(calls):
                        fn()
                    samples[name]["front"].append((proc_cpu(side.pid) - front0) / calls)
                    samples[name]["etcd"].append((proc_cpu(side.etcd_pid) - etcd0) / calls)
                    for key, n in counters.delta().items():
                        total = etcd_calls[name].get(key, 0.0) + n / (calls * reps)
                        etcd_calls[name][key] = total
            rounded = {
                name: {k: round(v, 2) for k, v in sorted(calls_.items()) if v >= 0.001}
                for name, calls_ in etcd_calls.items()
            }
            figures[f"gateway.cpu.{what}.direct.etcd"] = figure(
                samples["direct"]["etcd"],
                unit="us",
                scale=1e6,
                etcd_requests_per_call=rounded["direct"],
                note="etcd CPU per request",
            )
            if "gateway" in stores:
                figures[f"gateway.cpu.{what}.gateway.gateway"] = figure(
                    samples["gateway"]["front"],
                    unit="us",
                    scale=1e6,
                    note="gateway process CPU per request",
                )
                figures[f"gateway.cpu.{what}.gateway.etcd"] = figure(
                    samples["gateway"]["etcd"],
                    unit="us",
                    scale=1e6,
                    baseline=f"gateway.cpu.{what}.direct.etcd",
                    etcd_requests_per_call=rounded["gateway"],
                    note="etcd CPU per request arriving through the gateway",
                )
            for floor in ("floor", "floor-sync"):
                if floor in stores:
                    figures[f"gateway.cpu.{what}.{floor}.proxy"] = figure(
                        samples[floor]["front"],
                        unit="us",
                        scale=1e6,
                        note=f"pass-through proxy process CPU per request ({floor})",
                    )
            log(f"gateway cpu {what}: {reps} x {calls} calls per side")
    finally:
        for store in stores.values():
            store.close(cleanup=False)
    return figures


def bench_wake(sides: dict[str, Side], workers: Workers, quick: bool) -> dict[str, Figure]:
    """A set here, a wait_for_key in worker 0; both sides alternately."""
    iters, warmup = (10, 3) if quick else (150, 20)
    infos = {name: side.info() for name, side in sides.items()}
    workers.call(w_open, (infos, 0), indices=[0], timeout=WAIT_S)
    setters = {name: _open(info) for name, info in infos.items()}
    samples: dict[str, list[float]] = {name: [] for name in sides}
    set_times: dict[str, list[float]] = {name: [] for name in sides}
    late = dict.fromkeys(sides, 0)
    try:
        log(f"gateway wake-up: {iters} iterations per side")
        for i in range(warmup + iters):
            for name in (s for s in _rotated(i) if s in sides):
                key = f"wake/{i}"
                workers.send(0, w_wait, name, key)
                time.sleep(ARM_S)
                t0 = time.perf_counter()
                setters[name].set(key, "1")
                t_set = time.perf_counter()
                t_call, t1 = workers.recv(0, timeout=WAIT_S)
                if i < warmup:
                    continue
                if t_call > t0:  # the waiter started after the set: not a wake-up
                    late[name] += 1
                    continue
                samples[name].append(t1 - t0)
                set_times[name].append(t_set - t0)
    finally:
        workers.call(w_close, (), indices=[0])
        for store in setters.values():
            store.close(cleanup=False)
    note = f"set here -> wait_for_key returns in another process; arm {ARM_S * 1000:.0f} ms"
    figures = {
        "gateway.wake.direct": _fig(
            samples["direct"],
            late_dropped=late["direct"],
            set_call_ms=spread([t * 1000 for t in set_times["direct"]]),
            note=note,
        )
    }
    if "gateway" in sides:
        figures["gateway.wake.gateway"] = _fig(
            samples["gateway"],
            late_dropped=late["gateway"],
            set_call_ms=spread([t * 1000 for t in set_times["gateway"]]),
            baseline="gateway.wake.direct",
            target={"stat": "p50", "max_ratio": 2.0},
            note=note,
        )
    return figures


def bench_barrier(
    sides: dict[str, Side], workers: Workers, n: int, quick: bool, etcd_url: str
) -> dict[str, Figure]:
    """n processes, one store per process and side; interleaved rounds."""
    rounds = 3 if quick else 12
    infos = {name: side.info() for name, side in sides.items()}
    ranks = list(range(n))
    t0 = time.perf_counter()
    connect = workers.call(w_open, {w: (infos, w) for w in ranks}, indices=ranks, timeout=WAIT_S)
    log(f"gateway barrier N={n}: connected in {time.perf_counter() - t0:.1f} s")
    totals: dict[str, list[float]] = {name: [] for name in sides}
    skews: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, dict[str, float]] = {
        name: {"clients": 0.0, "front": 0.0, "etcd": 0.0} for name in sides
    }
    per_round: list[dict[str, float]] = []
    failed: dict[str, list[str]] = {name: [] for name in sides}
    etcd_calls: dict[str, dict[str, float]] = {name: {} for name in sides}
    run_id = uuid.uuid4().hex[:6]
    try:
        for r in range(rounds + 1):
            this: dict[str, float] = {}
            for name in (s for s in _rotated(r) if s in sides):
                side = sides[name]
                c0 = sum(workers.call(w_cpu, (), indices=ranks))
                f0, e0 = proc_cpu(side.pid), proc_cpu(side.etcd_pid)
                counters = EtcdCounters(etcd_url)
                go = time.perf_counter() + 0.05 + 0.003 * n
                try:
                    res = workers.call(
                        w_barrier,
                        (name, f"{run_id}-{r}", n, go),
                        indices=ranks,
                        timeout=BARRIER_WAIT_S + 30,
                    )
                except WorkerError as exc:
                    lines = [ln for ln in str(exc).splitlines() if "Error" in ln]
                    failed[name].append((lines[-1] if lines else str(exc))[:300])
                    log(f"gateway barrier N={n} {name} round {r} FAILED: {failed[name][-1]}")
                    continue
                total = max(done for _, done in res) - go
                if r == 0:
                    continue  # warm-up
                cpu[name]["clients"] += sum(workers.call(w_cpu, (), indices=ranks)) - c0
                cpu[name]["front"] += proc_cpu(side.pid) - f0
                cpu[name]["etcd"] += proc_cpu(side.etcd_pid) - e0
                for key, v in counters.delta().items():
                    etcd_calls[name][key] = etcd_calls[name].get(key, 0.0) + v
                totals[name].append(total)
                skews[name].append(max(t_set for t_set, _ in res) - go)
                this[name] = total
            if this:
                per_round.append(this)
    finally:
        workers.call(w_close, (), indices=ranks)
    figures: dict[str, Figure] = {}
    for name in sides:
        fig = _fig(
            totals[name],
            n=n,
            connect_ms=spread([c[name] * 1000 for c in connect]),
            start_skew_ms=spread([s * 1000 for s in skews[name]]),
            cpu_ms_per_barrier={
                k: round(v / max(len(totals[name]), 1) * 1000, 1) for k, v in cpu[name].items()
            },
            rounds_failed=len(failed[name]),
            etcd_requests_per_rank={
                k: round(v / (max(len(totals[name]), 1) * n), 2)
                for k, v in sorted(etcd_calls[name].items())
                if v
            },
            failures=failed[name][:3],
            note="go -> the last of n processes released; one store per process",
        )
        if name == "gateway":
            fig.update(
                baseline=f"gateway.barrier.N{n}.direct",
                target={"stat": "median", "max_ratio": 1.5},
                ratio_rounds=_ratio_spread(per_round, "gateway", "direct"),
            )
        figures[f"gateway.barrier.N{n}.{name}"] = fig
        log(
            f"gateway barrier N={n} {name}: median {percentile(totals[name], 50) * 1000:.1f} ms,"
            f" CPU per barrier {fig['cpu_ms_per_barrier']}"
        )
    return figures


def bench_login(sides: dict[str, Side], workers: Workers, quick: bool) -> dict[str, Figure]:
    """Sustained log-ins of C concurrent clients (own channel each), and a new-client storm."""
    procs = min(len(workers), 4)
    per_proc = 4 if quick else 16
    # log-ins per client: direct pays a bcrypt check in etcd for each (~50 ms of CPU)
    count = {"direct": 1, "gateway": 40 if quick else 60}
    reps = 1 if quick else 3
    storm_k = {"direct": 8 if quick else 32, "gateway": 32 if quick else 256}
    figures: dict[str, Figure] = {}
    ms_per_login: dict[str, list[float]] = {name: [] for name in sides}
    front_cpu: dict[str, list[float]] = {name: [] for name in sides}
    etcd_cpu: dict[str, list[float]] = {name: [] for name in sides}
    client_cpu: dict[str, list[float]] = {name: [] for name in sides}
    login_procs = list(range(procs))
    for r in range(reps):
        for name in (s for s in _rotated(r) if s in sides):
            side = sides[name]
            go = time.perf_counter() + 1.0 + 0.02 * per_proc
            c0 = sum(workers.call(w_cpu, (), indices=login_procs))
            f0, e0 = proc_cpu(side.pid), proc_cpu(side.etcd_pid)
            res = workers.call(
                w_login_loop,
                (side.info(), per_proc, count[name], go),
                indices=login_procs,
                timeout=WAIT_S * 2,
            )
            f1, e1 = proc_cpu(side.pid), proc_cpu(side.etcd_pid)
            c1 = sum(workers.call(w_cpu, (), indices=login_procs))
            done = procs * per_proc * count[name]
            took = max(t for per in res for t in per)
            ms_per_login[name].append(took / done)
            front_cpu[name].append((f1 - f0) / done)
            etcd_cpu[name].append((e1 - e0) / done)
            # includes the clients' channel set-up and waiting threads: an upper bound
            client_cpu[name].append((c1 - c0) / done)
            log(f"gateway log-ins {name}: {done} in {took:.2f} s ({done / took:.0f}/s)")
            time.sleep(0.2)
    clients = procs * per_proc
    for name in sides:
        vals = ms_per_login[name]
        fig = _fig(
            vals,
            clients=clients,
            layout=f"{procs} processes x {per_proc} threads, one channel each",
            logins_per_s=1 / percentile(vals, 50) if vals else math.nan,
            logins_per_client=count[name],
            logins_per_s_each=[round(1 / v) for v in vals],
            server_cpu_us_per_login=round(percentile(front_cpu[name], 50) * 1e6, 1)
            if front_cpu[name]
            else None,
            etcd_cpu_us_per_login=round(percentile(etcd_cpu[name], 50) * 1e6, 1)
            if etcd_cpu[name]
            else None,
            client_cpu_us_per_login=round(percentile(client_cpu[name], 50) * 1e6, 1)
            if client_cpu[name]
            else None,
            # what one core of the server could do with the clients elsewhere
            server_logins_per_core_s=round(1 / percentile(front_cpu[name], 50))
            if front_cpu[name] and percentile(front_cpu[name], 50) > 0
            else None,
            bcrypt_cost=10 if name == "direct" else None,
            note="C clients (own channel each) log in back to back: go -> last done / log-ins",
        )
        if name == "gateway":
            fig["target"] = {"stat": "median", "max": 0.5}
        figures[f"gateway.login.sustained.{name}"] = fig
    for name in sides:
        k = storm_k[name]
        go = time.perf_counter() + 0.3 + 0.002 * k
        counts = {w: (sides[name].info(), len(range(w, k, procs)), go) for w in range(procs)}
        res = workers.call(w_login_storm, counts, indices=list(range(procs)), timeout=WAIT_S * 2)
        flat = [t for per in res for t in per]
        figures[f"gateway.login.storm.{name}"] = _fig(
            [max(flat)],
            k=k,
            logins_per_s=k / max(flat),
            per_client_ms=spread([t * 1000 for t in flat]),
            note="K new EtcdClients (own channel) log in and read one key at once",
        )
        log(f"gateway log-in storm {name}: K={k} in {max(flat) * 1000:.0f} ms")
    return figures


def run(quick: bool) -> dict[str, Figure]:
    n = 8 if quick else 64
    noise = Noise()
    figures: dict[str, Figure] = {}
    with (
        tempfile.TemporaryDirectory(prefix="etha-bench-gw-") as tmp,
        deployment(Path(tmp)) as (cluster, sides),
        Workers(n, PRELOAD) as workers,
    ):
        figures.update(bench_ops(sides, quick))
        pair = {name: side for name, side in sides.items() if name in SIDES}
        figures.update(bench_wake(pair, workers, quick))
        figures.update(bench_barrier(pair, workers, n, quick, cluster.urls[0]))
        figures.update(bench_login(pair, workers, quick))
        figures.update(bench_cpu(sides, cluster.urls[0], quick))
        figures["gateway.noise"] = {
            "runs": 1,
            "median": math.nan,
            "unit": "",
            **noise.report(),
            "note": "load and CPU use of the machine during the gateway benchmark",
        }
    if "gateway.wake.gateway" not in figures:
        figures["gateway.noise"]["gateway"] = "not available: direct baseline only"
    return figures


# -- markdown for docs/benchmarks.md ---------------------------------------------------------


def _x(fig: Figure | None, key: str = "ratio") -> str:
    if not fig or fig.get(key) is None:
        return "-"
    return f"{fig[key]:.2f}x"


def _rr(fig: Figure | None) -> str:
    rr = (fig or {}).get("ratio_rounds") or {}
    if not rr:
        return "-"
    return f"{rr['median']:.2f}x ({rr['p25']:.2f}-{rr['p75']:.2f})"


def _p(fig: Figure | None, stat: str) -> str:
    return fmt((fig or {}).get(stat))


def markdown(result: dict[str, Any]) -> str:
    """The tables of the gateway section, from a run's JSON."""
    figs: dict[str, Figure] = result["figures"]
    noise = figs.get("gateway.noise", {})
    lines = [
        f"Run of {result['date']} ({result['mode']}), commit {result['git']['commit']}"
        + (f" + uncommitted {', '.join(result['git']['dirty'])}" if result["git"]["dirty"] else "")
        + f"; {noise.get('cores')} cores, load average {noise.get('loadavg_start')} at start,"
        f" {noise.get('loadavg_end')} at end; machine CPU busy {noise.get('machine_busy_pct')} %"
        f" (processes other than this benchmark's: {noise.get('other_processes_cpu_pct')} %"
        f" of the machine), steal {noise.get('steal_pct')} %.",
        "",
        "| figure | direct p50 (p90; IQR) | gateway p50 (p90; IQR) | ratio p50 | per-round ratio"
        " median (IQR) | target | met |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(label: str, d: Figure | None, g: Figure | None, unit: str = "ms") -> None:
        def cell(f: Figure | None) -> str:
            if not f:
                return "-"
            return f"{_p(f, 'p50')} {unit} ({_p(f, 'p90')}; {_p(f, 'iqr')})"

        target = (g or {}).get("target") or {}
        want = f"<= {target['max_ratio']}x" if "max_ratio" in target else ""
        met = (g or {}).get("met")
        lines.append(
            f"| {label} | {cell(d)} | {cell(g)} | {_x(g, 'ratio_p50') if g and 'ratio_p50' in g else _x(g)}"
            f" | {_rr(g)} | {want} | {'' if met is None else ('yes' if met else '**no**')} |"
        )

    for op in ("get", "set"):
        for size in SIZES:
            row(
                f"`{op}` {size}",
                figs.get(f"gateway.op.{op}.{size}.direct"),
                figs.get(f"gateway.op.{op}.{size}.gateway"),
            )
    row(
        "wake-up (set -> waiter in another process)",
        figs.get("gateway.wake.direct"),
        figs.get("gateway.wake.gateway"),
    )
    wd, wg = figs.get("gateway.wake.direct") or {}, figs.get("gateway.wake.gateway") or {}
    if wd.get("set_call_ms") or wg.get("set_call_ms"):
        sd, sg = wd.get("set_call_ms") or {}, wg.get("set_call_ms") or {}
        lines.append(
            f"| of which the setter's `set` | {fmt(sd.get('p50'))} ms | {fmt(sg.get('p50'))} ms"
            " | | | | |"
        )
    for name in sorted(
        k for k in figs if k.startswith("gateway.barrier.") and k.endswith(".direct")
    ):
        n = name.split(".")[2]
        row(
            f"barrier of {n[1:]} processes",
            figs.get(name),
            figs.get(name[: -len("direct")] + "gateway"),
        )
    lines.append("")
    if any(k.endswith(".floor") for k in figs):
        lines += [
            "The floor of a Python gateway: the same ops through `bench/proto_passthrough.py`"
            " (forwards raw bytes, checks nothing) on grpc.aio (as the gateway) and on grpc's"
            " thread-pool server (`--sync`), in the same rounds (ratios to direct, per-round"
            " IQR in brackets):",
            "",
            "| op | direct p50 | pass-through, grpc.aio | pass-through, sync | real gateway |",
            "|---|---|---|---|---|",
        ]

        def cell(f_: Figure | None) -> str:
            rr = (f_ or {}).get("ratio_rounds") or {}
            spread_ = f", {rr['p25']:.2f}-{rr['p75']:.2f}" if rr else ""
            return f"{_p(f_, 'p50')} ms ({_x(f_)}{spread_})"

        for op in ("get", "set"):
            for size in SIZES:
                lines.append(
                    f"| `{op}` {size} | {_p(figs.get(f'gateway.op.{op}.{size}.direct'), 'p50')} ms"
                    f" | {cell(figs.get(f'gateway.op.{op}.{size}.floor'))}"
                    f" | {cell(figs.get(f'gateway.op.{op}.{size}.floor-sync'))}"
                    f" | {cell(figs.get(f'gateway.op.{op}.{size}.gateway'))} |"
                )
        lines.append("")
    d, g = figs.get("gateway.login.sustained.direct"), figs.get("gateway.login.sustained.gateway")
    lines += [
        "| log-ins | direct (etcd, bcrypt cost 10) | gateway | target | met |",
        "|---|---|---|---|---|",
        f"| sustained, {(g or d or {}).get('clients')} clients back to back (log-ins/s, median of"
        f" repeats {(d or {}).get('logins_per_s_each')} / {(g or {}).get('logins_per_s_each')})"
        f" | {fmt((d or {}).get('logins_per_s'))}/s | {fmt((g or {}).get('logins_per_s'))}/s"
        f" | >= 2,000/s | {'' if not g or g.get('met') is None else ('yes' if g['met'] else '**no**')} |",
    ]
    sd, sg = figs.get("gateway.login.storm.direct"), figs.get("gateway.login.storm.gateway")
    lines.append(
        f"| storm: K new `EtcdClient`s log in + read (K = {(sd or {}).get('k')} / "
        f"{(sg or {}).get('k')}; all done in ms) | {_p(sd, 'median')} ms ({fmt((sd or {}).get('logins_per_s'))}/s)"
        f" | {_p(sg, 'median')} ms ({fmt((sg or {}).get('logins_per_s'))}/s) | | |"
    )
    lines += [
        f"| CPU per log-in (us) | etcd {fmt((d or {}).get('etcd_cpu_us_per_login'))},"
        f" clients {fmt((d or {}).get('client_cpu_us_per_login'))}"
        f" | gateway {fmt((g or {}).get('server_cpu_us_per_login'))}, etcd"
        f" {fmt((g or {}).get('etcd_cpu_us_per_login'))}, clients"
        f" {fmt((g or {}).get('client_cpu_us_per_login'))} | | |",
        f"| server log-ins per core-second (1 / server CPU per log-in) |"
        f" {fmt((d or {}).get('server_logins_per_core_s'))}"
        f" | {fmt((g or {}).get('server_logins_per_core_s'))} | | |",
        "",
        "| CPU per request (us, median of batches) | direct: etcd | gateway: gateway process"
        " | gateway: etcd | pass-through proxy process: grpc.aio / sync |",
        "|---|---|---|---|---|",
    ]
    for what in ("get", "set"):
        lines.append(
            f"| `{what}` 100B | {_p(figs.get(f'gateway.cpu.{what}.direct.etcd'), 'median')}"
            f" | {_p(figs.get(f'gateway.cpu.{what}.gateway.gateway'), 'median')}"
            f" | {_p(figs.get(f'gateway.cpu.{what}.gateway.etcd'), 'median')}"
            f" | {_p(figs.get(f'gateway.cpu.{what}.floor.proxy'), 'median')}"
            f" / {_p(figs.get(f'gateway.cpu.{what}.floor-sync.proxy'), 'median')} |"
        )
    for name in sorted(k for k in figs if k.startswith("gateway.barrier.")):
        cpu = figs[name].get("cpu_ms_per_barrier")
        if cpu:
            lines.append(
                f"| per barrier ({name.split('.', 2)[2]}), ms: clients {cpu['clients']},"
                f" front {cpu['front']}, etcd {cpu['etcd']}; etcd requests and events per rank"
                f" {figs[name].get('etcd_requests_per_rank')} | | | | |"
            )
    return "\n".join(lines)


GW_BEGIN, GW_END = "<!-- gateway-results:begin -->", "<!-- gateway-results:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gateway")
    parser.add_argument("--json", type=Path, default=LATEST)
    parser.add_argument(
        "--doc", type=Path, help="replace the text between the gateway-results markers here"
    )
    args = parser.parse_args(argv)
    text = markdown(json.loads(args.json.read_text()))
    if args.doc is None:
        print(text)
        return 0
    doc = args.doc.read_text()
    if GW_BEGIN not in doc or GW_END not in doc:
        raise SystemExit(f"{args.doc} has no {GW_BEGIN} ... {GW_END} markers")
    head, rest = doc.split(GW_BEGIN, 1)
    tail = rest.split(GW_END, 1)[1]
    args.doc.write_text(f"{head}{GW_BEGIN}\n{text}\n{GW_END}{tail}")
    print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
