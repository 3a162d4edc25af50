"""Prometheus metrics of the operator (prometheus_client, default registry).

Served on ``ETHA_OPERATOR_METRICS_PORT`` (``/metrics``; 0 turns it off) by :func:`serve`.
Labels are drawn from small fixed sets (handler ids, outcomes, etcd method names,
exception class names, phases, clean-up reasons): never a KVNamespace's name, a key, a
user name or anything from a Secret. ``docs/operations.md`` lists every metric; the
Grafana dashboard in ``charts/etha-operator/dashboards/`` queries them.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from etha_operator.model import Phase

F = TypeVar("F", bound=Callable[..., Any])

#: Phases of a KVNamespace; an object without a status yet counts as Pending.
PHASES = tuple(phase.value for phase in Phase)
#: Why keys were deleted.
JOB_END, FINALIZER, AUDIT = "job_end", "finalizer", "audit"

# Operator work takes milliseconds to tens of seconds (the finalizer's deadline is 30 s).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# One etcd request: sub-millisecond on loopback, seconds under failover.
_ETCD_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

RECONCILES = Counter(
    "etha_operator_reconciles_total",
    "Handler runs by handler id and outcome (success, retry, error).",
    ["handler", "outcome"],
)
PROVISION_SECONDS = Histogram(
    "etha_operator_provision_seconds",
    "Duration of one provisioning run (etcd role and user, Secret, status).",
    buckets=_SECONDS,
)
JOB_CLEANUP_SECONDS = Histogram(
    "etha_operator_job_cleanup_seconds",
    "Duration of applying onJobEnd after a job ended (key deletion, revocation).",
    buckets=_SECONDS,
)
FINALIZER_SECONDS = Histogram(
    "etha_operator_finalizer_seconds",
    "Duration of the deletion finalizer (keys, user, role, Secret).",
    buckets=_SECONDS,
)
KEYS_DELETED = Counter(
    "etha_operator_keys_deleted_total",
    "Keys deleted under KVNamespace prefixes, by reason (job_end, finalizer, audit).",
    ["reason"],
)
FINALIZER_DEADLINES = Counter(
    "etha_operator_finalizer_deadline_exceeded_total",
    "Finalizer runs that gave up at ETHA_OPERATOR_CLEANUP_DEADLINE and left something behind.",
)
AUDIT_ORPHANS = Counter(
    "etha_operator_audit_orphans_removed_total",
    "etcd users/roles without a KVNamespace that the audit removed.",
)
AUDIT_RUNS = Counter(
    "etha_operator_audit_runs_total",
    "Audit rounds by outcome (success, skipped, error).",
    ["outcome"],
)
ETCD_SECONDS = Histogram(
    "etha_operator_etcd_request_seconds",
    "Duration of the operator's etcd requests by method (e.g. KV.DeleteRange, Auth.UserAdd).",
    ["method"],
    buckets=_ETCD_SECONDS,
)
ETCD_ERRORS = Counter(
    "etha_operator_etcd_errors_total",
    "Failed etcd requests by method and error class (e.g. UnavailableError).",
    ["method", "error"],
)
KVNAMESPACES = Gauge(
    "etha_operator_kvnamespaces",
    "KVNamespaces the operator sees, by status phase.",
    ["phase"],
)
for _phase in PHASES:
    KVNAMESPACES.labels(_phase).set(0)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` in a daemon thread; 0 means off."""
    if port:
        prometheus_client.start_http_server(port, addr=addr)


# -- handler outcomes --------------------------------------------------------------------------


def outcome_of(exc: BaseException) -> str:
    """``retry`` for errors kopf retries (TemporaryError and its kin), else ``error``."""
    import kopf

    return "retry" if isinstance(exc, kopf.TemporaryError) else "error"


_RUN = threading.local()


def mark_retry() -> None:
    """Count the current sync handler run as ``retry`` although it returns normally.

    For handlers that catch a temporary failure themselves and leave the retry to their
    next run (the timer, the job watcher).
    """
    _RUN.retry = True


def counted(handler: str) -> Callable[[F], F]:
    """Count each run of the decorated kopf handler in :data:`RECONCILES` by outcome.

    Keeps the function sync or async as it was (kopf runs sync handlers in threads).
    """

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    RECONCILES.labels(handler, outcome_of(exc)).inc()
                    raise
                RECONCILES.labels(handler, "success").inc()
                return result

            return cast(F, run_async)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            _RUN.retry = False
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                RECONCILES.labels(handler, outcome_of(exc)).inc()
                raise
            RECONCILES.labels(handler, "retry" if _RUN.retry else "success").inc()
            return result

        return cast(F, run)

    return decorate


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    """Observe the block's duration in ``histogram``, also when it raises."""
    began = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - began)


# -- KVNamespaces by phase ---------------------------------------------------------------------


class PhaseBook:
    """The last phase seen per KVNamespace uid; :data:`KVNAMESPACES` follows it."""

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}

    def observe(self, uid: str, status: Mapping[str, Any] | None, deleted: bool) -> None:
        if deleted:
            self._phases.pop(uid, None)
        else:
            phase = (status or {}).get("phase") or "Pending"
            self._phases[uid] = phase if phase in PHASES else "Pending"
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] += 1
        for phase, count in counts.items():
            KVNAMESPACES.labels(phase).set(count)


PHASE_BOOK = PhaseBook()


def register(registry: Any, resource: tuple[str, str, str]) -> None:
    """Add the event handler that keeps :data:`KVNAMESPACES` current to a kopf registry."""
    import kopf

    @kopf.on.event(*resource, id="metrics-phases", registry=registry)
    def phases(event: Mapping[str, Any], body: Mapping[str, Any], **_: Any) -> None:
        uid = (body.get("metadata") or {}).get("uid")
        if uid:
            PHASE_BOOK.observe(str(uid), body.get("status"), event.get("type") == "DELETED")


# -- etcd requests -----------------------------------------------------------------------------


def observe_etcd_call(call: str, seconds: float, error: BaseException | None) -> None:
    """Record one etcd request in :data:`ETCD_SECONDS` (and :data:`ETCD_ERRORS` when it failed).

    The ``on_call`` observer of the operator's :class:`~etha.kvstore.etcd_client.EtcdClient`
    (see :class:`~etha.kvstore.etcdv3.transport.Transport`). The method label is
    ``Service.Method`` (``KV.Range``, ``Auth.UserAdd``): never a key.
    """
    ETCD_SECONDS.labels(call).observe(seconds)
    if error is not None:
        ETCD_ERRORS.labels(call, type(error).__name__).inc()


__all__ = [
    "AUDIT",
    "AUDIT_ORPHANS",
    "AUDIT_RUNS",
    "ETCD_ERRORS",
    "ETCD_SECONDS",
    "FINALIZER",
    "FINALIZER_DEADLINES",
    "FINALIZER_SECONDS",
    "JOB_CLEANUP_SECONDS",
    "JOB_END",
    "KEYS_DELETED",
    "KVNAMESPACES",
    "PHASES",
    "PROVISION_SECONDS",
    "RECONCILES",
    "PhaseBook",
    "counted",
    "mark_retry",
    "observe_etcd_call",
    "register",
    "serve",
    "timed",
]
