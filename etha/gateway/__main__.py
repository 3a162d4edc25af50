"""``etha-gateway`` (``python -m etha.gateway``): run one gateway replica.

Reads the ``ETHA_GATEWAY_*`` settings, logs in to etcd, loads the tenant registry,
then serves. Exits 0 on SIGTERM/SIGINT after draining (open streams get a grace
period), 2 on a configuration error (the message names the variable), 1 when etcd
cannot be reached at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import grpc
import grpc.aio

from etha.gateway.metrics import GatewayMetrics, MetricsServer
from etha.gateway.quota import QuotaBook, SpaceGuard
from etha.gateway.registry import Registry
from etha.gateway.server import GatewayContext, build_server
from etha.gateway.settings import GatewaySettings, parse_settings
from etha.gateway.tokens import TokenSigner, load_keys
from etha.gateway.upstream import Upstream
from etha.kvstore.errors import ConfigurationError
from etha.kvstore.etcdv3.transport import channel_credentials, read_pem

log = logging.getLogger("etha.gateway")

#: Seconds open calls (watch streams included) get to finish after SIGTERM.
GRACE = 5.0


def _etcd_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    if not settings.etcd_tls:
        return None
    return channel_credentials(
        settings.etcd_ca_file, cert_file=settings.etcd_cert_file, key_file=settings.etcd_key_file
    )


def _server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key = read_pem(settings.tls_key_file, "TLS key file")
    cert = read_pem(settings.tls_cert_file, "TLS certificate file")
    return grpc.ssl_server_credentials([(key, cert)])


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM/SIGINT."""
    signer = TokenSigner(load_keys(settings.token_key_file), ttl=settings.token_ttl)
    metrics = GatewayMetrics()
    upstream = Upstream(
        settings.etcd_endpoints,
        username=settings.etcd_username,
        password=settings.etcd_password,
        credentials=_etcd_credentials(settings),
        timeout=settings.etcd_timeout,
    )
    registry = Registry(upstream, settings.quotas, on_change=metrics.tenants.set)
    quotas = QuotaBook(upstream, resync=settings.quota_resync, report=metrics.report_quota)
    space = SpaceGuard(
        upstream,
        quota_bytes=settings.etcd_quota_backend_bytes,
        high_water=settings.etcd_space_high_water,
        interval=settings.etcd_space_poll,
    )
    ctx = GatewayContext(
        upstream=upstream,
        registry=registry,
        quotas=quotas,
        signer=signer,
        metrics=metrics,
        space=space,
        advertise=settings.advertise,
        tls=settings.tls,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    metrics_server: MetricsServer | None = None
    if settings.metrics_port:
        metrics_server = MetricsServer(
            metrics, settings.listen_host, settings.metrics_port, lambda: ctx.ready
        )
        metrics_server.start()
    listen = f"[{settings.listen_host}]" if ":" in settings.listen_host else settings.listen_host
    server, _ = build_server(
        ctx, f"{listen}:{settings.listen_port}", credentials=_server_credentials(settings)
    )
    try:
        await registry.start(timeout=max(30.0, settings.etcd_timeout * 3))
        await space.start()
        await server.start()
        log.info(
            "etha gateway serving on %s:%s (%s), etcd %s, %d tenants",
            settings.listen_host,
            settings.listen_port,
            "TLS" if settings.tls else "plaintext",
            ",".join(str(e) for e in settings.etcd_endpoints),
            len(registry),
        )
        await stop.wait()
        log.info("stopping: draining open calls for up to %.0fs", GRACE)
        await server.stop(GRACE)
    finally:
        await space.close()
        await registry.close()
        await upstream.close()
        if metrics_server is not None:
            metrics_server.stop()


def main(argv: list[str] | None = None) -> int:
    del argv
    try:
        settings = parse_settings()
    except ConfigurationError as exc:
        print(f"etha-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings))
    except ConfigurationError as exc:
        print(f"etha-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, grpc.aio.AioRpcError) as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "timed out"
        print(f"etha-gateway: cannot load the tenant registry from etcd: {detail}", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
