"""The floor of any Python gRPC gateway: a grpc.aio proxy that forwards etcd's unary calls
as raw bytes and does nothing else.

No token check, no confinement, no quota, no metrics, no protobuf parsing: every unary
call (``/etcdserverpb.KV/Range``, ``/etcdserverpb.Auth/Authenticate``, ...) is passed to
etcd with the caller's ``token`` metadata, and etcd's answer or error is passed back.
What a request through it costs over a direct call is what the Python gRPC stack costs
(one server call plus one client call on an asyncio loop): the least a gateway written
this way can add. ``bench/bench_gateway.py`` measures it beside the real gateway as the
configuration ``floor``. A benchmark prototype, never a product: it enforces nothing.

``--sync`` serves the same with grpc's thread-pool server and blocking client calls
instead of grpc.aio (measured as ``floor-sync``): cheaper per unary call here, but a
thread per open call, so no fit for a gateway that holds thousands of watches and waits.

``python -m bench.proto_passthrough [--sync] LISTEN UPSTREAM`` (``host:port`` each).
"""

from __future__ import annotations

import asyncio
import sys
from concurrent import futures
from typing import Any

import grpc
import grpc.aio


def _identity(data: bytes) -> bytes:
    return data


class _Forward(grpc.GenericRpcHandler):
    """Every unary method, forwarded as raw bytes with the caller's ``token``; ``forward``
    builds the server-side behaviour around the upstream multicallable."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.channel = channel
        self.methods: dict[str, Any] = {}

    def forward(self, upstream: Any) -> Any:
        async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            metadata = [(k, v) for k, v in context.invocation_metadata() or () if k == "token"]
            try:
                response: bytes = await upstream(
                    request, metadata=metadata, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
                raise
            return response

        return forward

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        upstream = self.methods.get(method)
        if upstream is None:
            upstream = self.methods[method] = self.channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity
            )
        return grpc.unary_unary_rpc_method_handler(
            self.forward(upstream), request_deserializer=_identity, response_serializer=_identity
        )


class _ForwardSync(_Forward):
    """The same with blocking calls, for grpc's thread-pool server."""

    def forward(self, upstream: Any) -> Any:
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = [(k, v) for k, v in context.invocation_metadata() if k == "token"]
            try:
                response: bytes = upstream(
                    request, metadata=metadata, timeout=context.time_remaining()
                )
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")  # type: ignore[attr-defined]
                raise
            return response

        return forward


#: The gateway's keepalive policy: etha's clients ping every 10 s even when idle, which
#: grpc's default policy answers with GOAWAY "too_many_pings".
SERVER_OPTIONS = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


def serve_sync(listen: str, upstream: str) -> None:
    channel = grpc.insecure_channel(upstream)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_ForwardSync(channel),))
    server.add_insecure_port(listen)
    server.start()
    print(f"passthrough proxy (sync) on {listen} -> {upstream}", flush=True)
    server.wait_for_termination()


async def serve(listen: str, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_Forward(channel),))
    server.add_insecure_port(listen)
    await server.start()
    print(f"passthrough proxy on {listen} -> {upstream}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sync = bool(args) and args[0] == "--sync"
    args = args[1:] if sync else args
    if len(args) != 2:
        print("usage: python -m bench.proto_passthrough [--sync] LISTEN UPSTREAM", file=sys.stderr)
        return 2
    if sync:
        serve_sync(args[0], args[1])
    else:
        asyncio.run(serve(args[0], args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
