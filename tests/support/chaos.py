"""Workload drivers and figure recording for the reliability (chaos) suite.

:class:`EtcdWorkload` runs K worker threads, each with its OWN :class:`EtcdClient` (its own
channels, token and watch stream, like K separate pods), against a real etcd cluster while
a test injects faults. Every worker loops over rounds of::

    set data/w<i>/r<n> = <unique value>   (acknowledged -> remembered)
    get data/w<i>/r<n>                    (must return what was acknowledged)
    barrier r<n>: set rank:<i> = 1, wait_for_keys(rank:*, K)

and records operations attempted / succeeded / failed (by error class, with sample
messages), the longest stall (longest time a worker went without a successful operation)
and the outcome of every barrier. :meth:`EtcdWorkload.verify` then reads every
acknowledged key back as root: a missing or different value is a *lost* write; a data key
whose etcd ``version`` is above 1 was applied twice (a *duplicated* write, e.g. a retried
put). Each data key is written exactly once by the workload, so both checks are exact.

The scale of every chaos test comes from ``ETHA_CHAOS_SCALE`` (``quick`` for ``make test``,
``full`` for ``make chaos``); figures go to ``ETHA_CHAOS_OUT`` when it is set.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from etha.kvstore.errors import KVStoreError, KVTimeoutError, UnavailableError
from etha.kvstore.etcd import EtcdKVStore
from etha.kvstore.etcd_client import EtcdClient

SCALE_ENV = "ETHA_CHAOS_SCALE"
OUT_ENV = "ETHA_CHAOS_OUT"


def full_scale() -> bool:
    """True under ``make chaos`` (``ETHA_CHAOS_SCALE=full``)."""
    return os.environ.get(SCALE_ENV, "quick").strip().lower() == "full"


def scaled(quick: int, full: int) -> int:
    return full if full_scale() else quick


def record(section: str, figures: dict[str, Any]) -> None:
    """Merge ``figures`` under ``section`` into the JSON file named by ``ETHA_CHAOS_OUT``."""
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data.setdefault("sections", {})[section] = figures
    data["scale"] = "full" if full_scale() else "quick"
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def clear_error(exc: BaseException) -> bool:
    """A *clear* error: one of etha's documented errors, with a message that says something."""
    return isinstance(exc, KVStoreError) and len(str(exc)) >= 20


@dataclass
class OpCounter:
    """Attempts, successes and failures of one kind of operation."""

    attempted: int = 0
    succeeded: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    max_latency_s: float = 0.0


@dataclass
class WorkloadReport:
    """What a workload did and what the verification found (JSON-ready)."""

    workers: int
    rounds: int = 0
    duration_s: float = 0.0
    ops: dict[str, OpCounter] = field(default_factory=dict)
    barriers_completed: int = 0
    barriers_failed: int = 0
    barrier_errors: dict[str, int] = field(default_factory=dict)
    unclear_errors: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    longest_stall_s: float = 0.0
    writes_acknowledged: int = 0
    writes_unacknowledged: int = 0
    unacknowledged_found_stored: int = 0
    writes_lost: int = 0
    writes_duplicated: int = 0
    stale_reads: int = 0
    lost_keys: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        return {
            "attempted": sum(c.attempted for c in self.ops.values()),
            "succeeded": sum(c.succeeded for c in self.ops.values()),
            "failed": sum(c.failed for c in self.ops.values()),
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = self.totals()
        data["longest_stall_s"] = round(self.longest_stall_s, 3)
        data["duration_s"] = round(self.duration_s, 3)
        for counter in data["ops"].values():
            counter["max_latency_s"] = round(counter["max_latency_s"], 3)
        return data


class _Worker(threading.Thread):
    def __init__(self, load: EtcdWorkload, index: int) -> None:
        super().__init__(name=f"chaos-worker-{index}", daemon=True)
        self.load = load
        self.index = index
        self.ops: dict[str, OpCounter] = collections.defaultdict(OpCounter)
        self.acked: dict[str, str] = {}
        self.unacked: set[str] = set()
        self.stale_reads = 0
        self.barriers_completed = 0
        self.barriers_failed = 0
        self.barrier_errors: collections.Counter[str] = collections.Counter()
        self.samples: list[str] = []
        self.unclear: list[str] = []
        self.longest_stall = 0.0
        self.rounds = 0
        self._last_success = 0.0
        self.crashed: BaseException | None = None

    # -- bookkeeping -----------------------------------------------------------------------

    def _op(self, kind: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        counter = self.ops[kind]
        counter.attempted += 1
        started = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # every failure is counted and classified, none hidden
            counter.failed += 1
            name = type(exc).__name__
            counter.errors[name] = counter.errors.get(name, 0) + 1
            if not clear_error(exc):
                self.unclear.append(f"{kind}: {name}: {exc!s:.200}")
            elif len(self.samples) < 3:
                self.samples.append(f"{kind}: {name}: {exc!s:.300}")
            return False, exc
        now = time.monotonic()
        counter.succeeded += 1
        counter.max_latency_s = max(counter.max_latency_s, now - started)
        self.longest_stall = max(self.longest_stall, now - self._last_success)
        self._last_success = now
        return True, result

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        load = self.load
        client = EtcdClient(
            load.endpoints,
            username=load.username,
            password=load.password,
            timeout=load.request_timeout,
        )
        store = EtcdKVStore(load.namespace, "chaos", endpoints=load.endpoints, client=client)
        self._last_success = time.monotonic()
        try:
            round_no = 0
            while round_no < load.stop_round:
                self._round(store, round_no)
                round_no += 1
                self.rounds = round_no
                load.progress(round_no)
        except BaseException as exc:  # a crashed worker is a test failure, reported as such
            self.crashed = exc
        finally:
            store.close(cleanup=False)
            client.close()

    def _round(self, store: EtcdKVStore, round_no: int) -> None:
        load = self.load
        key = f"data/w{self.index}/r{round_no}"
        value = f"{self.index}:{round_no}:{uuid.uuid4().hex}"
        ok, _ = self._op("set", lambda: store.set(key, value))
        if ok:
            self.acked[key] = value
        else:
            self.unacked.add(key)
        ok, got = self._op("get", lambda: store.get(key))
        if ok and key in self.acked and got != value.encode():
            self.stale_reads += 1
        # Barrier: arrival is retried (a set is idempotent) and so is the wait, within one
        # deadline; the barrier fails only when that deadline passes.
        deadline = time.monotonic() + load.barrier_timeout
        pattern = f"barrier/r{round_no}/rank:*"
        arrived = False
        last: BaseException | None = None
        while not arrived and time.monotonic() < deadline:
            arrived, err = self._op(
                "barrier_arrive", lambda: store.set(f"barrier/r{round_no}/rank:{self.index}", "1")
            )
            if not arrived:
                last = err
                time.sleep(0.05)
        while arrived and time.monotonic() < deadline:
            remaining = max(deadline - time.monotonic(), 0.001)

            def wait(t: float = remaining) -> list[str]:
                return store.wait_for_keys(pattern, load.workers, timeout=t)

            ok, err = self._op("barrier_wait", wait)
            if ok:
                if len(err) != load.workers:
                    self.unclear.append(f"barrier r{round_no} returned {len(err)} keys")
                self.barriers_completed += 1
                return
            last = err
            if not isinstance(err, (UnavailableError, KVTimeoutError)):
                break
            time.sleep(0.05)
        self.barriers_failed += 1
        name = type(last).__name__ if last is not None else "DeadlinePassed"
        self.barrier_errors[name] += 1
        if last is not None and not clear_error(last):
            self.unclear.append(f"barrier r{round_no}: {name}: {last!s:.200}")


class EtcdWorkload:
    """K worker threads doing set/get and barriers in a loop (see the module docstring)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        username: str | None,
        password: str | None,
        workers: int,
        namespace: str | None = None,
        request_timeout: float = 5.0,
        barrier_timeout: float = 60.0,
        ranks: Sequence[int] | None = None,
    ) -> None:
        """``ranks``: the worker indices this object runs (default: all of ``workers``);
        the others run elsewhere (other processes) and barriers still wait for all."""
        self.endpoints = endpoints
        self.username = username
        self.password = password
        self.workers = workers
        self.namespace = namespace or f"chaos-{uuid.uuid4().hex[:8]}"
        self.request_timeout = request_timeout
        self.barrier_timeout = barrier_timeout
        #: Workers stop before this round; lowered by :meth:`stop` to a round every worker
        #: can reach, so no barrier is left half-attended.
        self.stop_round = 1 << 30
        self._max_round = 0
        self._lock = threading.Lock()
        self._threads = [_Worker(self, i) for i in (range(workers) if ranks is None else ranks)]
        self._started = 0.0
        self.report = WorkloadReport(workers=workers)

    def progress(self, round_no: int) -> None:
        with self._lock:
            self._max_round = max(self._max_round, round_no)

    def max_round(self) -> int:
        with self._lock:
            return self._max_round

    def start(self) -> EtcdWorkload:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def wait_rounds(self, rounds: int, timeout: float = 120.0) -> None:
        """Block until some worker finished ``rounds`` rounds (the workload is warm)."""
        deadline = time.monotonic() + timeout
        while self.max_round() < rounds:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workload did not reach round {rounds} in {timeout}s")
            if not any(t.is_alive() for t in self._threads):
                raise RuntimeError("every chaos worker exited early")
            time.sleep(0.1)

    def stop(self, timeout: float = 180.0, at_round: int | None = None) -> WorkloadReport:
        """Let every worker finish the same last round, join them, and merge their figures.

        ``at_round``: the round to stop before, when the workers of one workload run in
        several processes (each must stop at the same round); default: one that every
        worker of this object can reach.
        """
        with self._lock:
            # Workers are at most one barrier apart: max + 2 is reachable by all of them.
            self.stop_round = self._max_round + 2 if at_round is None else at_round
        for thread in self._threads:
            thread.join(timeout)
        report = self.report
        report.duration_s = time.monotonic() - self._started
        for thread in self._threads:
            if thread.is_alive():
                report.unclear_errors.append(f"{thread.name} did not finish within {timeout}s")
            if thread.crashed is not None:
                report.unclear_errors.append(f"{thread.name} crashed: {thread.crashed!r}")
            report.rounds = max(report.rounds, thread.rounds)
            for kind, counter in thread.ops.items():
                merged = report.ops.setdefault(kind, OpCounter())
                merged.attempted += counter.attempted
                merged.succeeded += counter.succeeded
                merged.failed += counter.failed
                merged.max_latency_s = max(merged.max_latency_s, counter.max_latency_s)
                for name, n in counter.errors.items():
                    merged.errors[name] = merged.errors.get(name, 0) + n
            report.barriers_completed += thread.barriers_completed
            report.barriers_failed += thread.barriers_failed
            for name, n in thread.barrier_errors.items():
                report.barrier_errors[name] = report.barrier_errors.get(name, 0) + n
            report.unclear_errors.extend(thread.unclear)
            report.error_samples.extend(thread.samples[: max(0, 6 - len(report.error_samples))])
            report.longest_stall_s = max(report.longest_stall_s, thread.longest_stall)
            report.writes_acknowledged += len(thread.acked)
            report.writes_unacknowledged += len(thread.unacked)
            report.stale_reads += thread.stale_reads
        return report

    def verify(self, root: EtcdClient) -> WorkloadReport:
        """Read every acknowledged key back (as root); count lost and duplicated writes."""
        report = self.report
        prefix = f"{self.namespace}/chaos/"
        for thread in self._threads:
            for key, value in thread.acked.items():
                kvs = root.range(f"{prefix}{key}".encode()).kvs
                if not kvs or kvs[0].value != value.encode():
                    report.writes_lost += 1
                    report.lost_keys.append(key)
                elif kvs[0].version != 1:
                    report.writes_duplicated += 1
            for key in thread.unacked:
                kvs = root.range(f"{prefix}{key}".encode()).kvs
                if kvs:
                    report.unacknowledged_found_stored += 1
                    if kvs[0].version != 1:
                        report.writes_duplicated += 1
        return report


@dataclass
class FaultLog:
    """Faults injected during a run: kind -> count, plus how long each one lasted."""

    counts: dict[str, int] = field(default_factory=dict)
    durations_s: dict[str, list[float]] = field(default_factory=dict)

    @contextmanager
    def fault(self, kind: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.durations_s.setdefault(kind, []).append(round(time.monotonic() - started, 3))


def wait_until(
    probe: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> float:
    """Poll ``probe`` until true; return the seconds it took; TimeoutError names ``what``."""
    started = time.monotonic()
    while True:
        if probe():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
