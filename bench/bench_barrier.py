"""#4 barrier of N processes, #5 scaling to 1024 ranks, #6 log-in storm.

A *rank* sets ``b/<round>/rank:<i>/ready`` = ``1`` and waits until all N such keys
exist. Ranks live in worker processes forked from one preloaded server; a worker holds
one client per rank. Connecting (constructor plus one read, so that TCP, TLS and the
etcd log-in are done) is timed separately, before the rounds.

One round: this process picks a start time ``go`` a little ahead and sends it to every
worker; each rank sleeps until ``go``, sets its key and waits. The barrier time is
``max(done) - go``: from the common start until the last rank is released. It includes
the time the scheduler needs to wake N processes on 2 cores, for every kind alike.
``skew`` (``max(set) - go``) shows that part. Round 0 of each N is a warm-up.

Kinds: ``raw-tcpstore`` (``TCPStore.set`` + ``TCPStore.wait(keys)``, the baseline),
``etha-tcpstore`` (``wait_for_keys`` with ``candidate_keys``), ``etha-etcd``
(``wait_for_keys``), ``raw-etcd`` (generated gRPC stubs: put, one Range of the prefix,
then one watch of the prefix on the process's Watch stream: the leanest etcd barrier).
etcd runs with auth on; the clients log in as a password user limited to the namespace.

#5 runs N = 64..1024 ranks as ``PROCS`` processes x N/``PROCS`` threads (one client
object per rank; etha's etcd clients share one channel and one watch stream per
process, which is the design). Requests and watch events per rank come from etcd's own
``/metrics`` counters, read before and after the measured rounds.

#6: K clients in ``PROCS`` processes log in at once (a new unshared ``EtcdClient`` each,
so every one sends a password ``Authenticate``, which etcd checks with bcrypt), then
read one key. The same K ranks with etha's per-process shared client need only one
log-in per process.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bench.common import (
    EtcdCounters,
    Figure,
    WorkerError,
    Workers,
    add_etcd_user,
    etcd_server,
    figure,
    log,
    percentile,
    queue_items,
    run_threads,
    sleep_until,
    summarize,
    tcpstore_server,
)

USER, PASSWORD = "bench-barrier", "bench-barrier-password"
WAIT_S = 120.0

# -- clients (run inside the worker processes) -------------------------------------------------


class RawEtcd:
    """The leanest etcd barrier on the generated stubs: one channel, one log-in and one
    Watch stream per client object (per rank)."""

    class _Stream:
        """One Watch stream; each watch gets its own queue of events, by watch id."""

        def __init__(self, channel: Any, metadata: Any) -> None:
            from pyetcd import etcdrpc

            self.rpc = etcdrpc
            self.requests: queue.Queue[Any] = queue.Queue()
            self.pending: queue.Queue[queue.Queue[Any]] = queue.Queue()
            self.watchers: dict[int, queue.Queue[Any]] = {}
            self.responses = etcdrpc.WatchStub(channel).Watch(
                queue_items(self.requests), metadata=metadata
            )
            self.create_lock = threading.Lock()
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

        def _read(self) -> None:
            try:
                for resp in self.responses:
                    if resp.created:
                        self.watchers[resp.watch_id] = self.pending.get()
                    q = self.watchers.get(resp.watch_id)
                    if q is not None and resp.events:
                        q.put(list(resp.events))
                    if resp.canceled:
                        self.watchers.pop(resp.watch_id, None)
            except Exception:  # noqa: S110 - the stream ends when the channel closes
                pass

        def watch(self, key: bytes, range_end: bytes, start: int) -> queue.Queue[Any]:
            q: queue.Queue[Any] = queue.Queue()
            rpc = self.rpc
            # creates are answered in order; the lock keeps queue order = request order
            with self.create_lock:
                self.pending.put(q)
                self.requests.put(
                    rpc.WatchRequest(
                        create_request=rpc.WatchCreateRequest(
                            key=key, range_end=range_end, start_revision=start
                        )
                    )
                )
            return q

        def close(self) -> None:
            self.requests.put(None)
            self.responses.cancel()

    def __init__(self, endpoint: str, namespace: str) -> None:
        import grpc
        from pyetcd import etcdrpc

        self.rpc = etcdrpc
        self.prefix = f"{namespace}/default/"
        self.channel = grpc.insecure_channel(endpoint)
        token = (
            etcdrpc.AuthStub(self.channel)
            .Authenticate(etcdrpc.AuthenticateRequest(name=USER, password=PASSWORD))
            .token
        )
        self.md = (("token", token),)
        self.kv = etcdrpc.KVStub(self.channel)
        self.stream = RawEtcd._Stream(self.channel, self.md)

    def exists(self, key: str) -> bool:
        resp = self.kv.Range(
            self.rpc.RangeRequest(key=(self.prefix + key).encode(), count_only=True),
            metadata=self.md,
        )
        return bool(resp.count)

    def barrier(self, round_prefix: str, rank: int, n: int) -> None:
        rpc = self.rpc
        prefix = (self.prefix + round_prefix).encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        self.kv.Put(
            rpc.PutRequest(key=prefix + f"rank:{rank}/ready".encode(), value=b"1"), metadata=self.md
        )
        resp = self.kv.Range(rpc.RangeRequest(key=prefix, range_end=end), metadata=self.md)
        seen = {kv.key for kv in resp.kvs if kv.value == b"1"}
        if len(seen) >= n:
            return
        q = self.stream.watch(prefix, end, resp.header.revision + 1)
        deadline = time.monotonic() + WAIT_S
        while len(seen) < n:
            for ev in q.get(timeout=max(0.01, deadline - time.monotonic())):
                if ev.type == 0 and ev.kv.value == b"1":
                    seen.add(ev.kv.key)
        # the watch stays; a bench round leaves at most one per rank

    def close(self) -> None:
        self.stream.close()
        self.channel.close()


class Rank:
    """One rank's client of a kind, with the two operations the benchmark needs."""

    def __init__(self, kind: str, info: dict[str, Any]) -> None:
        self.kind = kind
        ns = info["namespace"]
        if kind == "raw-tcpstore":
            from torch.distributed import TCPStore  # type: ignore[attr-defined]

            self.prefix = f"{ns}/default/"
            self.store: Any = TCPStore(
                info["host"],
                info["port"],
                is_master=False,
                timeout=timedelta(seconds=WAIT_S),
                wait_for_workers=False,
            )
            self.store.check([self.prefix + "probe"])
        elif kind == "etha-tcpstore":
            from etha.kvstore.tcpstore import TCPStoreKVStore

            self.store = TCPStoreKVStore(ns, host=info["host"], port=info["port"], timeout=WAIT_S)
            self.store.exists("probe")
        elif kind in ("etha-etcd", "etha-etcd-view"):
            from etha.kvstore.etcd import EtcdKVStore

            self.store = EtcdKVStore(
                ns, endpoints=[info["endpoint"]], username=USER, password=PASSWORD, timeout=WAIT_S
            )
            self.store.exists("probe")
        elif kind == "raw-etcd":
            self.store = RawEtcd(info["endpoint"], ns)
            self.store.exists("probe")
        else:
            raise ValueError(kind)

    def barrier(self, round_id: int, rank: int, n: int) -> None:
        rp = f"b/{round_id}/"
        if self.kind == "raw-tcpstore":
            base = self.prefix + rp
            self.store.set(f"{base}rank:{rank}/ready", "1")
            self.store.wait([f"{base}rank:{i}/ready" for i in range(n)], timedelta(seconds=WAIT_S))
        elif self.kind == "etha-tcpstore":
            self.store.set(f"{rp}rank:{rank}/ready", "1")
            self.store.wait_for_keys(
                f"{rp}rank:*/ready",
                n,
                timeout=WAIT_S,
                candidate_keys=[f"{rp}rank:{i}/ready" for i in range(n)],
            )
        elif self.kind == "etha-etcd":
            self.store.set(f"{rp}rank:{rank}/ready", "1")
            self.store.wait_for_keys(f"{rp}rank:*/ready", n, timeout=WAIT_S)
        elif self.kind == "etha-etcd-view":
            from bench import proto_shared_view

            self.store.set(f"{rp}rank:{rank}/ready", "1")
            proto_shared_view.wait_for_keys(self.store, f"{rp}rank:*/ready", n, timeout=WAIT_S)
        else:
            self.store.barrier(rp, rank, n)

    def close(self) -> None:
        if self.kind.startswith("etha"):
            self.store.close(cleanup=False)
        elif hasattr(self.store, "close"):
            self.store.close()


_B: dict[str, Any] = {}


def _parallel(fns: list[Callable[[], Any]]) -> list[Any]:
    return [fns[0]()] if len(fns) == 1 else run_threads(fns)


def w_connect(kind: str, info: dict[str, Any], ranks: list[int]) -> list[float]:
    """Open one client per rank, all at once; seconds each took."""

    def one() -> tuple[Rank, float]:
        t0 = time.perf_counter()
        r = Rank(kind, info)
        return r, time.perf_counter() - t0

    out = _parallel([one for _ in ranks])
    _B["ranks"] = dict(zip(ranks, (r for r, _ in out), strict=True))
    return [t for _, t in out]


def w_barrier(round_id: int, n: int, go: float) -> list[tuple[float, float]]:
    """Every rank of this worker with index < n joins barrier ``round_id`` at ``go``."""
    clients = {r: c for r, c in _B["ranks"].items() if r < n}

    def one(rank: int, client: Rank) -> Callable[[], tuple[float, float]]:
        def go_() -> tuple[float, float]:
            sleep_until(go)
            t_set = time.perf_counter()
            client.barrier(round_id, rank, n)
            return t_set, time.perf_counter()

        return go_

    if not clients:
        return []
    return _parallel([one(r, c) for r, c in clients.items()])


def w_cpu() -> float:
    """CPU seconds this worker process has used (all threads)."""
    return time.process_time()


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc (10 ms ticks)."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu(servers: Servers, kind: str) -> float:
    if "etcd" in kind:
        proc = servers.cluster.nodes[0].process
        return _proc_cpu(proc.pid) if proc is not None else 0.0
    # the TCPStore server is a thread of this process, which otherwise only waits here
    return time.process_time()


def w_close() -> None:
    for client in _B.pop("ranks", {}).values():
        client.close()


def _attempt(fn: Callable[[], None], go: float) -> tuple[float, str]:
    """Run one log-in at ``go``: (seconds until done, "" or the error's first line)."""
    sleep_until(go)
    try:
        fn()
    except Exception as exc:
        return time.perf_counter() - go, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return time.perf_counter() - go, ""


def w_login(info: dict[str, Any], count: int, shared: bool, go: float) -> list[tuple[float, str]]:
    """``count`` threads log in at ``go`` (new clients, or etha's shared one)."""
    from etha.kvstore.etcd import EtcdKVStore
    from etha.kvstore.etcd_client import EtcdClient

    done: list[Any] = []
    lock = threading.Lock()

    def login() -> None:
        if shared:
            store = EtcdKVStore(
                info["namespace"],
                endpoints=[info["endpoint"]],
                username=USER,
                password=PASSWORD,
                timeout=WAIT_S,
            )
            with lock:
                done.append(store)
            store.exists("probe")
        else:
            client = EtcdClient(
                [info["endpoint"]], username=USER, password=PASSWORD, timeout=WAIT_S
            )
            with lock:
                done.append(client)
            client.range(f"{info['namespace']}/default/probe".encode())

    try:
        return run_threads([lambda: _attempt(login, go)] * count)
    finally:
        for obj in done:
            if shared:
                obj.close(cleanup=False)
            else:
                obj.close()


def w_raw_login(info: dict[str, Any], count: int, go: float) -> list[tuple[float, str]]:
    """``count`` threads: one raw ``Authenticate`` each on its own channel, at ``go``."""
    import grpc
    from pyetcd import etcdrpc

    def login() -> None:
        with grpc.insecure_channel(info["endpoint"]) as channel:
            etcdrpc.AuthStub(channel).Authenticate(
                etcdrpc.AuthenticateRequest(name=USER, password=PASSWORD), timeout=WAIT_S
            )

    return run_threads([lambda: _attempt(login, go)] * count)


# -- the driver (this process) -------------------------------------------------------------


class Servers:
    """etcd with auth and a TCPStore server, both up for the whole benchmark."""

    def __init__(self, bcrypt_cost: int | None = None) -> None:
        self.namespace = f"bench-barrier-{uuid.uuid4().hex[:8]}"
        extra = [f"--bcrypt-cost={bcrypt_cost}"] if bcrypt_cost else []
        self._etcd = etcd_server(auth=True, extra_args=extra)
        self._tcp = tcpstore_server(timeout=WAIT_S)

    def __enter__(self) -> Servers:
        self.cluster = self._etcd.__enter__()
        try:
            self.host, self.port, _ = self._tcp.__enter__()
            add_etcd_user(self.cluster, USER, PASSWORD, f"{self.namespace}/")
        except BaseException:
            self._etcd.__exit__(None, None, None)
            raise
        self.info = {
            "host": self.host,
            "port": self.port,
            "endpoint": self.cluster.endpoints[0],
            "namespace": self.namespace,
        }
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._tcp.__exit__(*exc)
        finally:
            self._etcd.__exit__(*exc)


_round_counter = iter(range(1, 10**9))


def barrier_rounds(
    workers: Workers,
    servers: Servers,
    kind: str,
    n: int,
    ranks_of: Callable[[int], list[int]],
    rounds: int,
    label: str,
) -> dict[str, Any]:
    """Connect the ranks < n, run 1 warm-up + ``rounds`` barriers; samples in seconds."""
    active = [w for w in range(len(workers)) if ranks_of(w) and min(ranks_of(w)) < n]
    t0 = time.perf_counter()
    connect = workers.call(
        w_connect,
        {w: (kind, servers.info, [r for r in ranks_of(w) if r < n]) for w in active},
        indices=active,
        timeout=WAIT_S * 2,
    )
    connect_all = time.perf_counter() - t0
    is_etcd = "etcd" in kind
    url = servers.cluster.urls[0]
    totals: list[float] = []
    skews: list[float] = []
    releases: list[float] = []
    counters: EtcdCounters | None = None
    cpu_clients = cpu_server = 0.0
    try:
        for r in range(rounds + 1):
            if r == 1:
                if is_etcd:
                    counters = EtcdCounters(url)
                cpu_clients = -sum(workers.call(w_cpu, (), indices=active))
                cpu_server = -_server_cpu(servers, kind)
            round_id = next(_round_counter)
            go = time.perf_counter() + 0.05 + 0.002 * len(active) + 0.0002 * n
            res = workers.call(w_barrier, (round_id, n, go), indices=active, timeout=WAIT_S * 2)
            pairs = [p for per_worker in res for p in per_worker]
            assert len(pairs) == n, (len(pairs), n)
            if r == 0:
                continue
            t_set_max = max(p[0] for p in pairs)
            t_done_max = max(p[1] for p in pairs)
            totals.append(t_done_max - go)
            skews.append(t_set_max - go)
            releases.append(t_done_max - t_set_max)
        if rounds:
            cpu_server += _server_cpu(servers, kind)
            cpu_clients += sum(workers.call(w_cpu, (), indices=active))
        per_rank: dict[str, float] = {}
        if counters is not None:
            delta = counters.delta()
            per_rank = {k: round(v / (rounds * n), 2) for k, v in sorted(delta.items())}
    finally:
        workers.call(w_close, (), indices=active)
    flat_connect = [c for per_worker in connect for c in per_worker]
    log(
        f"{label} {kind} N={n}: barrier median "
        f"{percentile(totals, 50) * 1000:.1f} ms, connect max {max(flat_connect) * 1000:.0f} ms"
        + f", CPU per barrier: clients {cpu_clients / max(rounds, 1) * 1000:.0f} ms,"
        f" server {cpu_server / max(rounds, 1) * 1000:.0f} ms"
        + (f", per rank {per_rank}" if per_rank else "")
    )
    return {
        "totals": totals,
        "skews": skews,
        "releases": releases,
        "connect": flat_connect,
        "connect_all": connect_all,
        "per_rank": per_rank,
        "cpu_ms_per_barrier": {
            "clients": round(cpu_clients / max(rounds, 1) * 1000, 1),
            "server": round(cpu_server / max(rounds, 1) * 1000, 1),
        },
    }


def _barrier_figures(
    prefix: str, kind: str, n: int, data: dict[str, Any], baseline_kind: str = "raw-tcpstore"
) -> dict[str, Figure]:
    name = f"{prefix}.{kind}.N{n}"
    figs: dict[str, Figure] = {
        name: figure(
            data["totals"],
            n=n,
            kind=kind,
            skew_ms=summarize([s * 1000 for s in data["skews"]]),
            release_after_last_set_ms=summarize([s * 1000 for s in data["releases"]]),
            per_rank=data["per_rank"],
            cpu_ms_per_barrier=data["cpu_ms_per_barrier"],
        ),
        f"{name}.connect": figure(
            data["connect"],
            n=n,
            kind=kind,
            all_connected_ms=data["connect_all"] * 1000,
            note="per-rank connect: constructor + one read (etcd: log-in)",
        ),
    }
    if kind != baseline_kind:
        figs[name]["baseline"] = f"{prefix}.{baseline_kind}.N{n}"
    return figs


def _failed(kind: str, n: int, exc: Exception) -> Figure:
    """A figure for a (kind, N) that failed: no samples, the first line of the error."""
    first = str(exc).splitlines()[0]
    detail = next((ln.strip() for ln in str(exc).splitlines() if "details" in ln), "")
    log(f"{kind} N={n} FAILED: {first} {detail}")
    return figure([], n=n, kind=kind, error=f"{first} {detail}".strip())


def run_barrier(quick: bool) -> dict[str, Figure]:
    sizes = [8] if quick else [8, 32, 64]
    rounds = 2 if quick else 10
    kinds = ["raw-tcpstore", "etha-tcpstore", "etha-etcd"]
    if not quick:
        kinds.append("raw-etcd")
    figures: dict[str, Figure] = {}
    with Servers() as servers, Workers(max(sizes)) as workers:
        for n in sizes:
            for kind in kinds:
                try:
                    data = barrier_rounds(workers, servers, kind, n, lambda w: [w], rounds, "#4")
                except WorkerError as exc:
                    figures[f"4.barrier.{kind}.N{n}"] = _failed(kind, n, exc)
                    continue
                figures.update(_barrier_figures("4.barrier", kind, n, data))
            if n == 64 or quick:
                figures[f"4.barrier.etha-etcd.N{n}"]["target"] = {
                    "stat": "median",
                    "max_ratio": 2.0,
                }
            figures[f"4.barrier.etha-tcpstore.N{n}"]["target"] = {
                "stat": "median",
                "max_ratio": 1.3,
            }
    return figures


PROCS = 16


def run_scaling(quick: bool) -> dict[str, Figure]:
    sizes = [64] if quick else [64, 128, 256, 512, 1024]
    rounds = 1 if quick else 3
    procs = 8 if quick else PROCS
    plan = {
        "raw-tcpstore": sizes,
        "etha-etcd": sizes,
        # raw-etcd logs every rank in separately (bcrypt each): 256 ranks take a minute
        # to connect, 512 make etcd time out; #4 has it up to 64 processes
        "raw-etcd": [n for n in sizes if n <= 64],
        "etha-tcpstore": [n for n in sizes if n <= 256],
        # the prototype of bench/proto_shared_view.py: one read + one view per process
        "etha-etcd-view": sizes,
    }
    if quick:
        plan = {"raw-tcpstore": sizes, "etha-etcd": sizes}
    figures: dict[str, Figure] = {}

    def ranks_of(w: int) -> list[int]:
        return list(range(w, max(sizes), procs))

    with Servers() as servers, Workers(procs) as workers:
        for n in sizes:
            for kind, ns in plan.items():
                if n not in ns:
                    continue
                try:
                    data = barrier_rounds(workers, servers, kind, n, ranks_of, rounds, "#5")
                except WorkerError as exc:
                    figures[f"5.scaling.{kind}.N{n}"] = _failed(kind, n, exc)
                    continue
                figs = _barrier_figures("5.scaling", kind, n, data)
                for fig in figs.values():
                    fig["layout"] = f"{procs} processes x {n // procs} threads"
                figures.update(figs)
            if n == 1024:
                figures[f"5.scaling.etha-etcd.N{n}"]["target"] = {"stat": "median", "max": 5000}
    return figures


def run_login(quick: bool) -> dict[str, Figure]:
    """Log-in storms at etcd's default bcrypt cost (10) and at ``--bcrypt-cost=4``."""
    figures: dict[str, Figure] = {}
    for cost in (None,) if quick else (None, 4):
        figures.update(_login_storms(quick, cost))
    return figures


def _login_storms(quick: bool, bcrypt_cost: int | None) -> dict[str, Figure]:
    sizes = [16] if quick else [64, 256]
    procs = 8 if quick else PROCS
    rounds = 1 if quick else 2
    variants = ["etha-new-client", "etha-shared-client"]
    if not quick:
        variants.insert(0, "raw-authenticate")
    tag = f"@bcrypt{bcrypt_cost}" if bcrypt_cost else ""
    figures: dict[str, Figure] = {}
    with Servers(bcrypt_cost) as servers, Workers(procs) as workers:
        info = servers.info
        # one log-in at a time: the bcrypt cost etcd pays per Authenticate
        serial: list[float] = []
        for _ in range(3 if quick else 20):
            go = time.perf_counter() + 0.01
            serial.extend(
                t for t, err in workers.call(w_raw_login, (info, 1, go), indices=[0])[0] if not err
            )
            time.sleep(0.01)
        figures[f"6.login.serial.raw-authenticate{tag}"] = figure(
            serial, note="one raw Authenticate (new channel) at a time: bcrypt + connect"
        )
        for k in sizes:
            for variant in variants:
                storms: list[float] = []
                per_client: list[float] = []
                errors: list[str] = []
                for _ in range(rounds if k <= 64 else 1):
                    go = time.perf_counter() + 0.1 + 0.002 * k
                    counts = [len(range(w, k, procs)) for w in range(procs)]
                    args: dict[int, tuple[Any, ...]]
                    if variant == "raw-authenticate":
                        args = {w: (info, c, go) for w, c in enumerate(counts)}
                        res = workers.call(w_raw_login, args)
                    else:
                        shared = variant == "etha-shared-client"
                        args = {w: (info, c, shared, go) for w, c in enumerate(counts)}
                        res = workers.call(w_login, args)
                    flat = [t for per in res for t in per]
                    ok = [t for t, err in flat if not err]
                    errors.extend(err for _, err in flat if err)
                    storms.append(max(t for t, _ in flat))
                    per_client.extend(ok)
                    time.sleep(0.2)
                logins = k if variant != "etha-shared-client" else procs
                name = f"6.login.{variant}{tag}.K{k}"
                figures[name] = figure(
                    storms,
                    k=k,
                    logins=logins,
                    bcrypt_cost=bcrypt_cost or 10,
                    layout=f"{procs} processes x {k // procs} threads",
                    per_client_ms=summarize([t * 1000 for t in per_client]),
                    logins_per_s=logins / percentile(storms, 50),
                    failed_logins=len(errors),
                    failed_example=errors[0] if errors else None,
                    note="go -> the last of K clients has logged in and read a key",
                )
                log(
                    f"#6 {variant}{tag} K={k}: {percentile(storms, 50) * 1000:.0f} ms"
                    + (f", {len(errors)} log-ins FAILED: {errors[0]}" if errors else "")
                )
    return figures


def run(quick: bool) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    for part in (run_barrier, run_scaling, run_login):
        figures.update(part(quick))
    return figures
