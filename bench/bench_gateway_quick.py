"""Quick gateway figures: log-ins per second against one gateway process, and put/get
p50 through the gateway against direct etcd (same run, interleaved rounds).

    .venv/bin/python -m bench.bench_gateway_quick [--rounds 3] [--seconds 3] [--ops 300]
        [--streams 6000]

Log-ins: ``--clients`` grpc.aio callers in a separate process keep ``--concurrency``
Authenticate calls in flight each for ``--seconds``; the figure is successful log-ins
per second (median and spread over rounds). Latency: one etha EtcdClient per path does
``--ops`` sequential puts then gets of 100-byte values; p50 per round, median over
rounds, and the ratio gateway/direct. ``--streams N``: N watch streams opened at once from
4 processes (each with one watch): how many were created, how many failed. The full
gateway benchmarks are bench_gateway.py.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etha.kvstore.etcd_client import EtcdClient
from tests.support.etcd_server import ROOT_USER, EtcdCluster
from tests.support.gateway import GatewayProcess, register_tenant


def _login_worker(
    endpoint: str, username: str, secret: str, seconds: float, concurrency: int, out: Any
) -> None:
    import grpc.aio
    from pyetcd import etcdrpc

    async def run() -> int:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = etcdrpc.AuthStub(channel)
            request = etcdrpc.AuthenticateRequest(name=username, password=secret)
            await stub.Authenticate(request, timeout=10)  # warm the channel
            done = 0
            deadline = time.monotonic() + seconds

            async def caller() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    await stub.Authenticate(request, timeout=10)
                    done += 1

            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return done

    out.put(asyncio.run(run()))


def logins_per_second(
    endpoint: str, username: str, secret: str, seconds: float, clients: int, concurrency: int
) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_login_worker, args=(endpoint, username, secret, seconds, concurrency, out)
        )
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    return total / seconds


def _stream_worker(
    endpoint: str, username: str, secret: str, prefix: str, count: int, out: Any
) -> None:
    import grpc.aio
    from pyetcd import etcdrpc

    async def run() -> tuple[int, int]:
        # Several connections per process, like many workers; each stream one watch.
        channels = [grpc.aio.insecure_channel(endpoint) for _ in range(count // 250 + 1)]
        auth = etcdrpc.AuthStub(channels[0])
        token = (
            await auth.Authenticate(etcdrpc.AuthenticateRequest(name=username, password=secret))
        ).token
        calls, failed = [], 0
        create = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(key=f"{prefix}/streams".encode())
        )
        for i in range(count):
            call = etcdrpc.WatchStub(channels[i % len(channels)]).Watch(
                metadata=(("token", token),)
            )
            try:
                await call.write(create)
                calls.append(call)
            except grpc.aio.AioRpcError:
                failed += 1
        created = 0
        for call in calls:
            try:
                created += int((await call.read()).created)
            except grpc.aio.AioRpcError:
                failed += 1
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
        return created, failed

    out.put(asyncio.run(run()))


def concurrent_streams(
    endpoint: str, username: str, secret: str, prefix: str, processes: int, per: int
) -> tuple[int, int, float]:
    """Open ``processes`` x ``per`` watch streams at once; (created, failed, seconds)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_stream_worker, args=(endpoint, username, secret, prefix, per, out))
        for _ in range(processes)
    ]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    results = [out.get(timeout=600) for _ in procs]
    seconds = time.monotonic() - start
    for proc in procs:
        proc.join(timeout=30)
    return sum(r[0] for r in results), sum(r[1] for r in results), seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p50_ms(client: EtcdClient, prefix: bytes, ops: int) -> tuple[float, float]:
    value = b"v" * 100
    puts, gets = [], []
    for i in range(ops):
        key = prefix + str(i % 50).encode()
        t = time.perf_counter()
        client.put(key, value)
        puts.append(time.perf_counter() - t)
    for i in range(ops):
        key = prefix + str(i % 50).encode()
        t = time.perf_counter()
        client.range(key)
        gets.append(time.perf_counter() - t)
    return statistics.median(puts) * 1e3, statistics.median(gets) * 1e3


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3g} (min {min(values):.3g}, max {max(values):.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument(
        "--streams", type=int, default=0, help="also open this many watch streams at once"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with EtcdCluster(work / "etcd", auth=True) as cluster:
            root = EtcdClient(cluster.endpoints, username=ROOT_USER, password=cluster.root_password)
            with GatewayProcess(
                cluster.endpoints,
                work / "gw",
                username=ROOT_USER,
                password=cluster.root_password,
                env={"ETHA_GATEWAY_LOG_LEVEL": "WARNING"},
            ) as gateway:
                username, secret, prefix = register_tenant(root)
                via = EtcdClient([gateway.endpoint], username=username, password=secret)
                logins: list[float] = []
                put_gw, get_gw, put_direct, get_direct = [], [], [], []
                per_core: list[float] = []
                assert gateway.process is not None
                for _ in range(args.rounds):
                    cpu_before = cpu_seconds(gateway.process.pid)
                    rate = logins_per_second(
                        gateway.endpoint,
                        username,
                        secret,
                        args.seconds,
                        args.clients,
                        args.concurrency,
                    )
                    cpu = cpu_seconds(gateway.process.pid) - cpu_before
                    logins.append(rate)
                    # Log-ins one core of the gateway can serve: robust to a busy machine.
                    per_core.append(rate * args.seconds / cpu if cpu > 0 else float("nan"))
                    p, g = p50_ms(root, f"{prefix}/direct/".encode(), args.ops)
                    put_direct.append(p)
                    get_direct.append(g)
                    p, g = p50_ms(via, f"{prefix}/gw/".encode(), args.ops)
                    put_gw.append(p)
                    get_gw.append(g)
                via.close()
                streams = None
                if args.streams:
                    per = max(1, args.streams // 4)
                    streams = concurrent_streams(gateway.endpoint, username, secret, prefix, 4, per)
            root.close()
    print(f"log-ins/s through one gateway: {_spread(logins)}")
    print(f"log-ins per gateway CPU-second: {_spread(per_core)}")
    print(f"put p50 ms: gateway {_spread(put_gw)}; direct {_spread(put_direct)}")
    print(f"get p50 ms: gateway {_spread(get_gw)}; direct {_spread(get_direct)}")
    if streams is not None:
        created, failed, seconds = streams
        print(f"watch streams at once: {created} created, {failed} failed, in {seconds:.1f}s")
    print(
        "ratio gateway/direct (median of p50s): put"
        f" {statistics.median(put_gw) / statistics.median(put_direct):.2f},"
        f" get {statistics.median(get_gw) / statistics.median(get_direct):.2f}"
    )


if __name__ == "__main__":
    main()
