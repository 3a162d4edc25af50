"""The gateway's Prometheus metrics, and the small HTTP server that exposes them.

Labels are bounded and safe: ``tenant`` is the tenant's username, ``method`` an etcd
RPC name, ``reason`` a confinement or quota label. Never keys, values, tokens or
secrets. The same HTTP server answers ``/healthz`` (the process runs) and ``/readyz``
(the tenant registry is loaded and etcd answered).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics:
    """Every metric of one gateway process, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Names stay string literals in the constructor calls: tests/test_dashboard.py
        # reads them from this source.
        timing: dict[str, Any] = {"buckets": _BUCKETS, "registry": r}
        per_quota = ["tenant", "quota"]
        self.requests = Counter(
            "etha_gateway_requests",
            "Requests answered, by RPC, status code and tenant",
            ["method", "code", "tenant"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "etha_gateway_request_seconds", "Time to answer a unary request", ["method"], **timing
        )
        self.denials = Counter(
            "etha_gateway_denials",
            "Requests refused by confinement or quota, by tenant and reason",
            ["tenant", "reason"],
            registry=r,
        )
        self.logins = Counter(
            "etha_gateway_logins", "Log-in attempts, by outcome", ["outcome"], registry=r
        )
        self.quota_used = Gauge(
            "etha_gateway_quota_used", "A tenant's usage of a quota", per_quota, registry=r
        )
        self.quota_limit = Gauge(
            "etha_gateway_quota_limit", "A tenant's quota (0 = unlimited)", per_quota, registry=r
        )
        self.watches_open = Gauge(
            "etha_gateway_watches_open", "Open watches, by tenant", ["tenant"], registry=r
        )
        self.add_fences = Counter(
            "etha_gateway_add_fences",
            "Adds whose etcd answer was lost, by what the fence found: kept_out (the lost"
            " Txn can no longer apply; retried) or unknown (the caller is told it may have"
            " been applied)",
            ["outcome"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._seconds_children: dict[str, Any] = {}
        self._upstream_children: dict[str, Any] = {}
        #: (tenant, quota) -> (used, limit, watches_open or None) children
        self._quota_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.tenants = Gauge("etha_gateway_tenants", "Tenants in the registry", registry=r)
        self.upstream_seconds = Histogram(
            "etha_gateway_upstream_seconds",
            "Time etcd took to answer a forwarded call",
            ["method"],
            **timing,
        )

    def count_request(self, method: str, code: str, tenant: str, seconds: float) -> None:
        """One answered request (labelled children are cached: ``labels()`` is slow)."""
        key = (method, code, tenant)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(method, code, tenant)
        counter.inc()
        histogram = self._seconds_children.get(method)
        if histogram is None:
            histogram = self._seconds_children[method] = self.request_seconds.labels(method)
        histogram.observe(seconds)

    def upstream(self, method: str) -> Any:
        """The ``upstream_seconds`` histogram of ``method`` (cached child)."""
        histogram = self._upstream_children.get(method)
        if histogram is None:
            histogram = self._upstream_children[method] = self.upstream_seconds.labels(method)
        return histogram

    def report_quota(self, tenant: str, quota: str, used: int, limit: int) -> None:
        key = (tenant, quota)
        gauges = self._quota_children.get(key)
        if gauges is None:
            gauges = self._quota_children[key] = (
                self.quota_used.labels(tenant, quota),
                self.quota_limit.labels(tenant, quota),
                self.watches_open.labels(tenant) if quota == "watches" else None,
            )
        gauges[0].set(used)
        gauges[1].set(limit)
        if gauges[2] is not None:
            gauges[2].set(used)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a thread (the event loop stays free).

    :param ready: answers whether the gateway is ready (called from the HTTP thread;
        it must only read simple attributes)
    """

    def __init__(
        self, metrics: GatewayMetrics, host: str, port: int, ready: Callable[[], bool]
    ) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    self._answer(200, owner.metrics.render(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._answer(200, b"ok\n")
                elif self.path == "/readyz":
                    ok = owner.ready()
                    self._answer(200 if ok else 503, b"ok\n" if ok else b"not ready\n")
                else:
                    self._answer(404, b"not found\n")

            def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes are not news

        self.metrics = metrics
        self.ready = ready
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


__all__ = ["GatewayMetrics", "MetricsServer"]
