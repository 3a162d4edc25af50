"""Scale: a barrier of N = 256..8192 independent clients, three ways, and N concurrent adds.

Every simulated rank is an independent client with its own gRPC channel (its own TCP
connection), its own log-in and, on the direct path, its own Watch stream, as N worker
processes would have. They live in :data:`PROCS` OS processes (asyncio + grpc.aio, N/PROCS
clients each; TCPStore: one thread per client), so 8,192 fit on this machine.

The barrier (round ``r``): every rank puts ``b/<r>/rank:<i>/ready`` = ``1`` at a common
start time ``go`` and waits until all N keys exist. Wall time = ``max(done) - go``.

* ``direct``: today's library path straight to etcd, per rank: Put, one Range of the
  barrier prefix at revision R, a watch from R + 1 on the rank's own stream, fold events
  until N keys are seen. etcd sends N events to each of N watchers: O(N^2).
* ``gateway``: Put through the gateway, then one ``Coordination.Wait`` (keys mode,
  count N, value ``1``, ``count_only``): the gateway holds one watch for the tenant and
  answers everyone. (``count_only`` because a barrier needs no key list; the library's
  ``wait_for_keys`` asks for the N keys, which is N x N keys on the wire, see docs.)
* ``gateway-add``: the same O(N) shape as torch's store barrier, through the gateway:
  ``Coordination.Add`` on ``b/<r>/arrived`` (batched into few etcd Txns), then one
  ``Coordination.Wait`` for that key to hold ``N``.
* ``tcpstore``: torch's store barrier: ``add("arrived", 1)``; the rank that reads N sets
  ``done``; every rank ``wait(["done"])``. O(N) messages.

``add``: N ranks call ``Coordination.Add`` on one key at ``go``; wall until the last
answer; the final value must be N.

The ranks spread over ``--replicas`` gateway replicas (default 2, as the chart deploys;
rank i dials replica i mod R), as a Service spreads connections.

Per (kind, N): wall time, etcd CPU, gateway CPU (all replicas) and the ranks' CPU (the
worker processes; ``/proc/<pid>/stat`` around the round), messages sent by etcd (``grpc_server_msg_sent_total``, all methods) and by the
gateway (``etha_gateway_requests_total``: one answer per request), watch events sent by
etcd (``etcd_debugging_mvcc_events_total``). Medians over ``--repeats`` rounds after a
warm-up round. etcd runs with ``--bcrypt-cost=4`` so that N direct log-ins (one bcrypt
check each) finish before the barrier; log-ins are not part of any figure.

The direct path is bounded: a round that does not finish within :data:`DIRECT_LIMIT`
seconds (or fails) stops the direct path for larger N, and so does a projection over
the limit (its cost grows as N^2: a median of t seconds at N means about 4t at 2N);
the table says which. A direct round left running would keep etcd busy under the
rounds that follow it.

    python -m bench.bench_scale                 # full run (make bench-scale)
    python -m bench.bench_scale --sizes 256 1024 --repeats 2
    python -m bench.bench_scale --report        # table + plot from bench/out/scale.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import (
    OUT_DIR,
    WorkerError,
    Workers,
    etcd_server,
    git_state,
    log,
    machine_info,
    percentile,
    run_threads,
    sleep_until,
    tcpstore_server,
    utc_now,
    versions,
    write_json,
)

SIZES = [256, 512, 1024, 2048, 4096, 8192]
PROCS = 8
DIRECT_LIMIT = 60.0
ROUND_LIMIT = 120.0
OUT = OUT_DIR / "scale.json"
DOCS = Path(__file__).resolve().parents[1] / "docs"
KINDS = ("direct", "gateway", "gateway-add", "tcpstore")

# -- worker side ---------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _loop() -> asyncio.AbstractEventLoop:
    loop = _W.get("loop")
    if loop is None:
        loop = _W["loop"] = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    return loop


_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per client
    ("grpc.max_receive_message_length", -1),
]


class _AioRank:
    """One independent client: its own channel, log-in (token) and Watch stream."""

    def __init__(self, endpoint: str, user: str, password: str, channel: Any = None) -> None:
        import grpc.aio

        self.shared = channel is not None
        self.channel = channel or grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        self.user, self.password = user, password
        self.md: tuple[tuple[str, str], ...] = ()
        self.stream: Any = None
        #: the operation in progress (for error messages)
        self.step = "connect"

    async def connect(self) -> None:
        from pyetcd import etcdrpc

        auth = etcdrpc.AuthStub(self.channel)
        response = await auth.Authenticate(
            etcdrpc.AuthenticateRequest(name=self.user, password=self.password), timeout=120
        )
        self.md = (("token", response.token),)
        self.kv = etcdrpc.KVStub(self.channel)
        self.watch_stub = etcdrpc.WatchStub(self.channel)
        from etha.kvstore import gateway_api as api

        self.wait_stub = api.wait_stub(self.channel)
        self.add_stub = api.add_stub(self.channel)

    async def put(self, key: bytes) -> None:
        from pyetcd import etcdrpc

        self.step = "Put"
        await self.kv.Put(etcdrpc.PutRequest(key=key, value=b"1"), metadata=self.md, timeout=120)

    async def direct_wait(self, prefix: bytes, n: int) -> None:
        """Today's library wait: Range at R, watch from R + 1, fold events."""
        from pyetcd import etcdrpc

        self.step = "Range+Watch"
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        response = await self.kv.Range(
            etcdrpc.RangeRequest(key=prefix, range_end=end), metadata=self.md, timeout=120
        )
        seen = {kv.key for kv in response.kvs if kv.value == b"1"}
        if len(seen) >= n:
            return
        if self.stream is None:
            self.stream = self.watch_stub.Watch(metadata=self.md)
        stream = self.stream
        create = etcdrpc.WatchCreateRequest(
            key=prefix, range_end=end, start_revision=response.header.revision + 1
        )
        await stream.write(etcdrpc.WatchRequest(create_request=create))
        watch_id = None
        while len(seen) < n:
            message = await stream.read()
            if message.created:
                watch_id = message.watch_id
                continue
            if message.watch_id != watch_id:
                continue
            for event in message.events:
                if event.type == 0 and event.kv.value == b"1":
                    seen.add(event.kv.key)
        await stream.write(
            etcdrpc.WatchRequest(cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id))
        )

    async def gateway_wait(self, prefix: bytes, pattern: bytes, n: int) -> None:
        from etha.kvstore import gateway_api as api

        self.step = "Wait(keys)"
        stub = self.wait_stub
        request = api.WaitRequest(
            mode=api.MODE_KEYS, key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1]),
            pattern=pattern, count=n, value=b"1", has_value=True, count_only=True,
        )  # fmt: skip
        response = await stub(request, metadata=self.md, timeout=ROUND_LIMIT)
        if response.count < n:
            raise RuntimeError(f"gateway answered {response.count} of {n}")

    async def gateway_value_wait(self, key: bytes, value: bytes) -> None:
        from etha.kvstore import gateway_api as api

        self.step = "Wait(value)"
        stub = self.wait_stub
        request = api.WaitRequest(mode=api.MODE_VALUE, key=key, value=value, has_value=True)
        await stub(request, metadata=self.md, timeout=ROUND_LIMIT)

    async def add(self, key: bytes) -> int:
        from etha.kvstore import gateway_api as api

        self.step = "Add"
        stub = self.add_stub
        response = await stub(api.AddRequest(key=key, delta=1), metadata=self.md, timeout=120)
        return int(response.value)

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        if not self.shared:
            await self.channel.close()


def w_connect(kind: str, info: dict[str, Any], ranks: list[int]) -> float:
    """Open one client per rank (log-ins at most 64 at a time); seconds it took."""
    t0 = time.perf_counter()
    if kind == "tcpstore":
        from torch.distributed import TCPStore  # type: ignore[attr-defined]

        def one(_: int) -> Any:
            store = TCPStore(
                info["host"], info["port"], is_master=False,
                timeout=timedelta(seconds=ROUND_LIMIT), wait_for_workers=False,
            )  # fmt: skip
            store.check(["probe"])
            return store

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(32) as pool:
            _W["ranks"] = dict(zip(ranks, pool.map(one, ranks), strict=True))
        return time.perf_counter() - t0
    gateways: list[str] = info["gateways"]
    etcd: str = info["etcd"]

    def endpoint_of(rank: int) -> str:
        # Ranks spread over the gateway replicas, as a Service spreads connections.
        return etcd if kind == "direct" else gateways[rank % len(gateways)]

    endpoint = endpoint_of(ranks[0]) if ranks else etcd

    async def connect_all() -> dict[int, _AioRank]:
        share = int(info.get("share", 1))
        if share > 1:
            # Ranks share a channel (a TCP connection) in groups; each still logs in alone.
            import grpc.aio

            channels = [
                grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
                for _ in range((len(ranks) + share - 1) // share)
            ]
            _W["channels"] = channels
            clients = {
                r: _AioRank(endpoint, info["user"], info["password"], channels[i // share])
                for i, r in enumerate(ranks)
            }
        else:
            clients = {r: _AioRank(endpoint_of(r), info["user"], info["password"]) for r in ranks}
        limit = asyncio.Semaphore(64)

        async def one(c: _AioRank) -> None:
            async with limit:
                try:
                    await c.connect()
                except Exception as exc:
                    code = getattr(exc, "code", lambda: None)()
                    raise RuntimeError(f"Authenticate failed: {code} {exc}") from None

        await asyncio.gather(*(one(c) for c in clients.values()))
        return clients

    _W["ranks"] = _loop().run_until_complete(connect_all())
    return time.perf_counter() - t0


def w_barrier(kind: str, info: dict[str, Any], round_id: int, n: int, go: float) -> list[float]:
    """Every rank < n of this worker joins barrier ``round_id`` at ``go``; done times."""
    ranks = {r: c for r, c in _W["ranks"].items() if r < n}
    ns = info["namespace"]
    prefix = f"{ns}/b/{round_id}/".encode()
    if kind == "tcpstore":
        return _tcpstore_barrier(ranks, f"{ns}/b/{round_id}", n, go)

    async def one(rank: int, client: _AioRank) -> float:
        try:
            return await steps(rank, client)
        except Exception as exc:
            code = getattr(exc, "code", lambda: None)()
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise RuntimeError(f"rank {rank}: {client.step} failed: {code} {details}") from None

    async def steps(rank: int, client: _AioRank) -> float:
        await asyncio.sleep(max(0.0, go - time.perf_counter()))
        if kind == "gateway-add":
            # torch's store barrier through the gateway: a batched add, one value wait.
            await client.add(prefix + b"arrived")
            await client.gateway_value_wait(prefix + b"arrived", str(n).encode())
            return time.perf_counter()
        await client.put(prefix + f"rank:{rank}/ready".encode())
        if kind == "direct":
            await client.direct_wait(prefix, n)
        else:
            await client.gateway_wait(prefix, prefix + b"rank:*/ready", n)
        return time.perf_counter()

    async def all_() -> list[float]:
        return list(await asyncio.gather(*(one(r, c) for r, c in ranks.items())))

    return _loop().run_until_complete(asyncio.wait_for(all_(), ROUND_LIMIT + 10))


def _tcpstore_barrier(ranks: dict[int, Any], base: str, n: int, go: float) -> list[float]:
    def one(store: Any) -> float:
        sleep_until(go)
        if store.add(f"{base}/arrived", 1) == n:
            store.set(f"{base}/done", "1")
        store.wait([f"{base}/done"], timedelta(seconds=ROUND_LIMIT))
        return time.perf_counter()

    return run_threads([functools.partial(one, store) for store in ranks.values()])


def w_add(info: dict[str, Any], key: str, n: int, go: float) -> list[tuple[int, float]]:
    ranks = {r: c for r, c in _W["ranks"].items() if r < n}
    full = f"{info['namespace']}/{key}".encode()

    async def one(client: _AioRank) -> tuple[int, float]:
        await asyncio.sleep(max(0.0, go - time.perf_counter()))
        value = await client.add(full)
        return value, time.perf_counter()

    async def all_() -> list[tuple[int, float]]:
        return list(await asyncio.gather(*(one(c) for c in ranks.values())))

    return _loop().run_until_complete(all_())


def w_close() -> None:
    ranks = _W.pop("ranks", {})
    for key in [k for k in _W if isinstance(k, tuple)]:
        del _W[key]
    aio = [c for c in ranks.values() if isinstance(c, _AioRank)]
    if aio:

        async def close_all() -> None:
            await asyncio.gather(*(c.close() for c in aio), return_exceptions=True)

        _loop().run_until_complete(close_all())
    channels = _W.pop("channels", [])
    if channels:

        async def close_channels() -> None:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

        _loop().run_until_complete(close_channels())
    ranks.clear()


# -- driver side ------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc (10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics_page(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=10).read().decode())  # noqa: S310


def _metric_sum(text: str, name: str) -> float:
    """The sum of metric ``name`` over all its label sets in a ``/metrics`` page."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(m.group(1)) for m in pattern.finditer(text))


class Setup:
    """etcd (auth, bcrypt cost 4), ``replicas`` gateway replicas, a TCPStore server, a tenant."""

    def __init__(self, replicas: int = 1) -> None:
        self.replicas = replicas
        self.gateways: list[Any] = []
        #: pids whose CPU counts as the ranks' (the worker processes)
        self.rank_pids: list[int] = []

    def __enter__(self) -> Setup:
        from etha.kvstore.etcd_client import EtcdClient
        from tests.support.etcd_server import ROOT_USER
        from tests.support.gateway import GatewayProcess, register_tenant

        self._stack = contextlib.ExitStack()
        try:
            self.cluster = self._stack.enter_context(
                etcd_server(auth=True, extra_args=["--bcrypt-cost=4"])
            )
            root = EtcdClient(
                self.cluster.endpoints, username=ROOT_USER, password=self.cluster.root_password
            )
            self._stack.callback(root.close)
            user, secret, prefix = register_tenant(root)
            # The same tenant straight to etcd: a user with the tenant's prefix (direct path).
            role = f"role-{user}"
            self.cluster.etcdctl("role", "add", role)
            self.cluster.etcdctl("role", "grant-permission", role, "readwrite", f"{prefix}/",
                                 "--prefix=true")  # fmt: skip
            self.cluster.etcdctl("user", "add", user, f"--new-user-password={secret}",
                                 "--interactive=false")  # fmt: skip
            self.cluster.etcdctl("user", "grant-role", user, role)
            # The gateway's log stays in bench/out/ (the key file is removed with the run).
            workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory()))
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            for index in range(self.replicas):
                # One signing key for all replicas, as the chart mounts one Secret.
                keys = self.gateways[0].token_key_file if self.gateways else None
                gateway = GatewayProcess(
                    self.cluster.endpoints, workdir / f"gw{index}", username=ROOT_USER,
                    password=self.cluster.root_password, token_key_file=keys,
                    env={"ETHA_GATEWAY_QUOTA_WATCHES": "0",
                         "ETHA_GATEWAY_QUOTA_REQUESTS_PER_SECOND": "0",
                         "ETHA_GATEWAY_LOG_LEVEL": "INFO"},
                )  # fmt: skip
                gateway.log_path = OUT_DIR / f"scale-gateway-{index}.log"
                gateway.log_path.write_text("")
                gateway.start()
                self._stack.callback(gateway.stop)
                self.gateways.append(gateway)
            host, port, _ = self._stack.enter_context(tcpstore_server(timeout=ROUND_LIMIT))
        except BaseException:
            self._stack.close()
            raise
        self.info = {
            "etcd": self.cluster.endpoints[0],
            "gateways": [gw.endpoint for gw in self.gateways],
            "host": host,
            "port": port,
            "user": user,
            "password": secret,
            "namespace": prefix,
        }
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def settle(self, limit: float = 120.0) -> None:
        """Return once etcd is idle again (under 5% of a core over a second), or after
        ``limit`` seconds: a failed round may leave etcd sending for a while."""
        etcd_proc = self.cluster.nodes[0].process
        assert etcd_proc is not None
        give_up = time.monotonic() + limit
        while time.monotonic() < give_up:
            before = proc_cpu(etcd_proc.pid)
            time.sleep(1.0)
            if proc_cpu(etcd_proc.pid) - before < 0.05:
                return
        log(f"etcd still busy {limit:.0f}s after a failed round; measuring anyway")

    def counters(self) -> dict[str, float]:
        from tests.support.etcd_metrics import handled

        etcd_page = _metrics_page(f"{self.cluster.urls[0]}/metrics")
        gateway_pids = [gw.process.pid for gw in self.gateways if gw.process is not None]
        etcd_proc = self.cluster.nodes[0].process
        assert etcd_proc is not None
        return {
            "etcd_cpu": proc_cpu(etcd_proc.pid),
            "gateway_cpu": sum(proc_cpu(pid) for pid in gateway_pids),
            "ranks_cpu": sum(proc_cpu(pid) for pid in self.rank_pids),
            "etcd_msgs": _metric_sum(etcd_page, "grpc_server_msg_sent_total"),
            "etcd_events": _metric_sum(etcd_page, "etcd_debugging_mvcc_events_total"),
            "etcd_txns": handled(etcd_page, "Txn"),
            "gateway_msgs": sum(
                _metric_sum(_metrics_page(gw.metrics_url), "etha_gateway_requests_total")
                for gw in self.gateways
            ),
        }


_rounds = iter(range(1, 10**9))


def _assign(n: int, procs: int) -> dict[int, list[int]]:
    return {w: list(range(w, n, procs)) for w in range(procs)}


def measure(setup: Setup, workers: Workers, kind: str, n: int, repeats: int) -> dict[str, Any]:
    """Connect n clients of ``kind``, 1 warm-up + ``repeats`` barriers; per-round figures."""
    procs = len(workers)
    plan = _assign(n, procs)
    info = setup.info
    limit = DIRECT_LIMIT if kind == "direct" else ROUND_LIMIT
    connect = workers.call(w_connect, {w: (kind, info, plan[w]) for w in plan}, timeout=900)
    rounds: list[dict[str, float]] = []
    try:
        for index in range(repeats + 1):
            round_id = next(_rounds)
            before = setup.counters()
            go = time.perf_counter() + 0.5
            done = workers.call(
                w_barrier, {w: (kind, info, round_id, n, go) for w in plan}, timeout=limit + 15
            )
            wall = max(t for per in done for t in per) - go
            after = setup.counters()
            figures = {k: after[k] - before[k] for k in after}
            figures["wall"] = wall
            log(f"scale {kind} N={n} round {index}: wall {wall:.2f}s, etcd cpu"
                f" {figures['etcd_cpu']:.2f}s, gateway cpu {figures['gateway_cpu']:.2f}s,"
                f" ranks cpu {figures['ranks_cpu']:.2f}s")  # fmt: skip
            if index > 0:
                rounds.append(figures)
            if wall > limit:
                raise WorkerError(f"round took {wall:.1f}s, over the {limit:.0f}s limit")
            time.sleep(0.5)
    finally:
        workers.call(w_close, ())
    return {"connect_s": max(connect), "rounds": rounds}


def measure_add(setup: Setup, workers: Workers, n: int, repeats: int) -> dict[str, Any]:
    procs = len(workers)
    plan = _assign(n, procs)
    info = setup.info
    workers.call(w_connect, {w: ("add", info, plan[w]) for w in plan}, timeout=900)
    rounds: list[dict[str, float]] = []
    try:
        for index in range(repeats + 1):
            key = f"adds/{uuid.uuid4().hex[:8]}"
            before = setup.counters()
            go = time.perf_counter() + 0.5
            out = workers.call(w_add, {w: (info, key, n, go) for w in plan}, timeout=ROUND_LIMIT)
            flat = [x for per in out for x in per]
            values = sorted(v for v, _ in flat)
            if values != list(range(1, n + 1)):
                raise WorkerError(f"adds not exact: {len(set(values))} distinct, max {values[-1]}")
            after = setup.counters()
            figures = {k: after[k] - before[k] for k in after}
            figures["wall"] = max(t for _, t in flat) - go
            log(f"scale add N={n} round {index}: wall {figures['wall']:.2f}s,"
                f" {figures['etcd_txns']:.0f} txns, etcd cpu {figures['etcd_cpu']:.2f}s")  # fmt: skip
            if index > 0:
                rounds.append(figures)
    finally:
        workers.call(w_close, ())
    return {"rounds": rounds}


def _direct_projection(result: dict[str, Any], n: int) -> str | None:
    """Why the direct path is not run at ``n``: its N^2 projection from the largest
    smaller N measured is over :data:`DIRECT_LIMIT` (None: run it)."""
    measured = [
        (int(key.split(".N")[1]), data["rounds"])
        for key, data in result["results"].items()
        if key.startswith("direct.") and data.get("rounds")
    ]
    smaller = [(m, rounds) for m, rounds in measured if m < n]
    if not smaller:
        return None
    m, rounds = max(smaller)
    projected = percentile([r["wall"] for r in rounds], 50) * (n / m) ** 2
    if projected <= DIRECT_LIMIT:
        return None
    return (
        f"not run: projected {projected:.0f} s from N={m:,} (N^2), over the"
        f" {DIRECT_LIMIT:.0f} s limit"
    )


def _median(rounds: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rounds if key in r]
    return percentile(values, 50) if values else None


def run_all(
    sizes: list[int],
    repeats: int,
    procs: int,
    add_n: int,
    kinds: tuple[str, ...] = KINDS,
    share: int = 1,
    replicas: int = 2,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "date": utc_now(),
        "machine": machine_info(),
        "versions": versions(),
        "git": git_state(),
        "procs": procs,
        "repeats": repeats,
        "ranks_per_channel": share,
        "gateway_replicas": replicas,
        "results": {},
    }
    direct_stopped: str | None = None
    t0 = time.perf_counter()
    with Setup(replicas) as setup, contextlib.ExitStack() as stack:
        setup.info["share"] = share

        def fresh_workers() -> Workers:
            # A worker that missed its deadline may still answer late: a pipe out of
            # step is never reused, the processes are replaced.
            pool = stack.enter_context(Workers(procs))
            setup.rank_pids = [proc.pid for proc in pool.procs]
            return pool

        workers = fresh_workers()
        for n in sizes:
            for kind in kinds:
                name = f"{kind}.N{n}"
                if kind == "direct" and direct_stopped:
                    result["results"][name] = {"skipped": direct_stopped}
                    continue
                if kind == "direct" and (prior := _direct_projection(result, n)):
                    direct_stopped = prior
                    result["results"][name] = {"skipped": prior}
                    log(f"scale {name}: {prior}")
                    continue
                try:
                    data = measure(setup, workers, kind, n, repeats)
                except (WorkerError, AssertionError) as exc:
                    lines = str(exc).splitlines()
                    detail = next((ln.strip() for ln in lines if "details" in ln), "")
                    first = f"{lines[0][:200]} {detail[:200]}".strip()
                    log(f"scale {name} FAILED: {first}")
                    result["results"][name] = {"error": first}
                    workers.close()
                    workers = fresh_workers()
                    setup.settle()
                    if kind == "direct":
                        direct_stopped = f"not run: the direct path failed at N={n} ({first[:80]})"
                    continue
                result["results"][name] = data
                write_json(result, OUT)
        try:
            if add_n:
                result["results"][f"add.N{add_n}"] = measure_add(setup, workers, add_n, repeats)
        except (WorkerError, AssertionError) as exc:
            result["results"][f"add.N{add_n}"] = {"error": str(exc).splitlines()[0][:300]}
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - t0
    write_json(result, OUT)
    return result


# -- report ---------------------------------------------------------------------------------


def table_rows(result: dict[str, Any]) -> list[str]:
    rows = [
        "| N | path | wall s, median (min-max) | etcd CPU s | gateway CPU s | ranks' CPU s"
        " | etcd msgs sent | etcd watch events | gateway msgs sent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(rounds: list[dict[str, float]], key: str, digits: int = 2) -> str:
        med = _median(rounds, key)
        return "-" if med is None else f"{med:.{digits}f}"

    def count(rounds: list[dict[str, float]], key: str) -> str:
        med = _median(rounds, key)
        return "-" if med is None else f"{med:,.0f}"

    sizes = sorted({int(k.split(".N")[1]) for k in result["results"] if not k.startswith("add")})
    for n in sizes:
        for kind in KINDS:
            data = result["results"].get(f"{kind}.N{n}")
            if data is None:
                continue
            if "rounds" not in data:
                reason = data.get("skipped") or f"failed: {data.get('error')}"
                rows.append(f"| {n:,} | {kind} | {reason} | | | | | | |")
                continue
            rounds = data["rounds"]
            walls = [r["wall"] for r in rounds]
            wall = f"{percentile(walls, 50):.2f} ({min(walls):.2f}-{max(walls):.2f})"
            via = kind.startswith("gateway")
            gw_cpu = cell(rounds, "gateway_cpu") if via else "-"
            gw_msgs = count(rounds, "gateway_msgs") if via else "-"
            etcd_msgs = count(rounds, "etcd_msgs") if kind != "tcpstore" else "-"
            events = count(rounds, "etcd_events") if kind != "tcpstore" else "-"
            etcd_cpu = cell(rounds, "etcd_cpu") if kind != "tcpstore" else "-"
            rows.append(
                f"| {n:,} | {kind} | {wall} | {etcd_cpu} | {gw_cpu} | {cell(rounds, 'ranks_cpu')}"
                f" | {etcd_msgs} | {events} | {gw_msgs} |"
            )
    for key, data in result["results"].items():
        if not key.startswith("add") or "rounds" not in data:
            continue
        rounds = data["rounds"]
        walls = [r["wall"] for r in rounds]
        n = int(key.split(".N")[1])
        txns = _median(rounds, "etcd_txns") or 0.0
        rows.append(
            f"| {n:,} | `Add` (gateway) | {percentile(walls, 50):.2f}"
            f" ({min(walls):.2f}-{max(walls):.2f}) | {cell(rounds, 'etcd_cpu')}"
            f" | {cell(rounds, 'gateway_cpu')} | {cell(rounds, 'ranks_cpu')}"
            f" | {count(rounds, 'etcd_msgs')}"
            f" ({txns:,.0f} Txns) | - | {count(rounds, 'gateway_msgs')} |"
        )
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, style in zip(KINDS, ("o-", "s-", "d-", "^-"), strict=True):
        xs, walls, cpus = [], [], []
        for key, data in result["results"].items():
            if key.startswith(f"{kind}.N") and "rounds" in data:
                xs.append(int(key.split(".N")[1]))
                walls.append(percentile([r["wall"] for r in data["rounds"]], 50))
                cpus.append(_median(data["rounds"], "etcd_cpu"))
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs = [xs[i] for i in order]
        ax1.plot(xs, [walls[i] for i in order], style, label=kind)
        if kind != "tcpstore":
            ax2.plot(xs, [cpus[i] for i in order], style, label=kind)
    for ax, title in ((ax1, "barrier wall time (s)"), (ax2, "etcd CPU per barrier (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks N (independent clients)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", type=int, default=PROCS)
    parser.add_argument("--add", type=int, default=8192, help="concurrent adds")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument(
        "--share", type=int, default=1, help="ranks per gRPC channel (default: one each)"
    )
    parser.add_argument(
        "--replicas", type=int, default=2, help="gateway replicas (the chart's default: 2)"
    )
    parser.add_argument("--report", action="store_true", help="only print/plot scale.json")
    args = parser.parse_args(argv)
    # SIGTERM (a background run cannot get SIGINT) unwinds too: servers and workers stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report:
        result = json.loads(OUT.read_text())
    else:
        result = run_all(
            args.sizes,
            args.repeats,
            args.procs,
            args.add,
            tuple(args.kinds),
            args.share,
            args.replicas,
        )
    print("\n".join(table_rows(result)))
    plot(result, DOCS / "img" / "scale.png")
    print(f"wrote {OUT} and {DOCS / 'img' / 'scale.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
