"""Reproduce the CANCELLED calls of ``bench_scale`` above ~2,000 clients without etha.

A grpc.aio echo server (one process, grpc's default options) and N grpc.aio clients
(one channel each, in 8 processes); every client makes one call to connect, then all
call at once. On the project's machine (grpcio 1.85.3, 2 cores) N = 1,024 passes and
N = 2,048 fails: some calls end ``CANCELLED`` (debug string ``CANCELLED:CANCELLED``, no
status from the server). grpc core cancels calls that wait too long for the server
application to take them (``grpc.server.max_pending_requests``, 1,000, and its hard
limit, 3,000); the gateway raises both (etha/gateway/server.py)::

    .venv/bin/python -m bench.grpc_many_clients 1024   # 8 lines "[0]": no failure
    .venv/bin/python -m bench.grpc_many_clients 2048   # CANCELLED in several processes
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from typing import Any

import grpc
import grpc.aio

PROCS = 8
METHOD = "/x.Echo/Call"


async def _serve(port_queue: Any) -> None:
    server = grpc.aio.server()

    async def call(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(0.01)
        return request

    handler = grpc.method_handlers_generic_handler(
        "x.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_queue.put(port)
    await server.wait_for_termination()


def _server_main(port_queue: Any) -> None:
    asyncio.run(_serve(port_queue))


def _client_main(port: int, n: int, go: float, out: Any) -> None:
    async def run() -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options) for _ in range(n)]
        calls = [c.unary_unary(METHOD) for c in channels]

        async def one(call: Any) -> str:
            try:
                await call(b"x", timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code()} {exc.debug_error_string()}"

        connect = await asyncio.gather(*(one(c) for c in calls))
        await asyncio.sleep(max(0.0, go - time.perf_counter()))
        results = connect + list(await asyncio.gather(*(one(c) for c in calls)))
        failed = [r for r in results if r != "OK"]
        out.put([len(failed), *failed[:1]])

    asyncio.run(run())


def main(n: int) -> None:
    ctx = mp.get_context("spawn")
    port_queue = ctx.Queue()
    server = ctx.Process(target=_server_main, args=(port_queue,), daemon=True)
    server.start()
    try:
        port = port_queue.get(timeout=30)
        out = ctx.Queue()
        go = time.perf_counter() + 10
        clients = [
            ctx.Process(target=_client_main, args=(port, n // PROCS, go, out), daemon=True)
            for _ in range(PROCS)
        ]
        for client in clients:
            client.start()
        for _ in clients:
            print(out.get(timeout=120))
        for client in clients:
            client.join(30)
    finally:
        server.terminate()
        server.join(10)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2048)
