"""Ranks that add to one counter through ``EthaStore.add``: spawned processes of threads.

Each rank is a thread with its own :class:`~etha.kvstore.etcdv3.client.EtcdClient` (its
own channels and log-in, as a real rank has) and its own endpoint list; the threads of
a few ``spawn`` processes make up the ranks, so that 32 ranks cost a handful of torch
imports, not 32. Every add is ``+1``; each rank records what every add returned:

* ``values``: the new value an add returned (it was applied, once);
* ``unknown``: an add that raised an error saying its outcome is unknown: the library's
  :class:`~etha.kvstore.errors.UnavailableError` or
  :class:`~etha.kvstore.errors.KVTimeoutError` as the cause of torch's error;
* ``failed``: any other error (a test treats it as a failure).

:class:`CounterRanks` starts the processes, lets every rank connect before the adds
begin (:meth:`CounterRanks.go`), and :meth:`CounterRanks.close` ends every process
still running (the fixture that made it calls it).
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: How long a rank waits to be told to start before giving up.
GO_TIMEOUT_S = 120.0


@dataclass
class RankResult:
    """What one rank saw (see the module docstring)."""

    rank: int
    endpoints: list[str]
    values: list[int] = field(default_factory=list)
    #: time.monotonic() (system-wide on Linux) when each add of ``values`` returned
    returned_at: list[float] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    crashed: str | None = None

    @property
    def attempted(self) -> int:
        return len(self.values) + len(self.unknown) + len(self.failed)


def _rank(
    rank: int, spec: dict[str, Any], shared: tuple[Any, Any, Any, Any], into: list[RankResult]
) -> None:
    progress, go, stop, flagged = shared
    from etha.distributed.store import EthaStore
    from etha.kvstore.config import EtcdConfig
    from etha.kvstore.errors import KVStoreError, KVTimeoutError, UnavailableError
    from etha.kvstore.etcd_client import EtcdClient, normalize_endpoints

    endpoints = spec["endpoints"][rank]
    result = RankResult(rank, list(endpoints))
    into.append(result)
    client: EtcdClient | None = None
    try:
        config = EtcdConfig(
            namespace=spec["namespace"],
            endpoints=tuple(normalize_endpoints(endpoints)[0]),
            username=spec["username"],
            password=spec["password"],
            timeout=spec["timeout"],
        )
        client = EtcdClient.from_config(config)
        store = EthaStore(config, client=client, timeout=spec["timeout"])
        store.check(["warm-up"])  # connected and logged in before the adds start
        progress[rank] = 0
        deadline = time.monotonic() + GO_TIMEOUT_S
        while go.value == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} was not told to start in {GO_TIMEOUT_S}s")
            time.sleep(0.002)
        for i in range(spec["adds"]):
            if stop.value:
                break
            try:
                value = store.add(spec["key"], 1)
            except (RuntimeError, KVStoreError) as exc:
                cause = exc if isinstance(exc, KVStoreError) else exc.__cause__
                text = f"{type(cause).__name__}: {cause}"[:400]
                if isinstance(cause, (UnavailableError, KVTimeoutError)):
                    result.unknown.append(text)
                    if spec.get("flag_text") and spec["flag_text"] in text:
                        flagged.value = 1
                else:
                    result.failed.append(f"{type(exc).__name__}: {exc}"[:400])
            else:
                result.values.append(value)
                result.returned_at.append(time.monotonic())
            progress[rank] = i + 1
            if spec["pace"]:
                time.sleep(spec["pace"])
    except BaseException:
        result.crashed = traceback.format_exc()[-2000:]
    finally:
        if client is not None:
            client.close()


def _process_main(
    ranks: list[int], spec: dict[str, Any], shared: tuple[Any, Any, Any, Any], out: str
) -> None:
    results: list[RankResult] = []
    threads = [
        threading.Thread(target=_rank, args=(r, spec, shared, results), daemon=True) for r in ranks
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(out).write_text(json.dumps([r.__dict__ for r in results]))


class CounterRanks:
    """``len(spec["endpoints"])`` ranks in ``processes`` spawned processes.

    :param spec: ``endpoints`` (one list per rank), ``username``, ``password``,
        ``namespace`` (the tenant's prefix), ``timeout`` (each request's deadline),
        ``key`` (the store key to add to), ``adds`` (per rank), ``pace`` (seconds
        between a rank's adds)
    """

    def __init__(self, workdir: Path, spec: dict[str, Any], processes: int) -> None:
        # spawn: no fork of a process with gRPC threads, no fork server left running
        ctx = multiprocessing.get_context("spawn")
        self.workers = len(spec["endpoints"])
        self.progress = ctx.Array("i", [-1] * self.workers)
        self.go_flag = ctx.Value("i", 0)
        self.stop_flag = ctx.Value("i", 0)
        #: set by a rank when an unknown-outcome error's text contains spec["flag_text"]
        self.flagged = ctx.Value("i", 0)
        workdir.mkdir(parents=True, exist_ok=True)
        self.outs = [workdir / f"ranks-{p}.json" for p in range(processes)]
        self.procs = [
            ctx.Process(
                target=_process_main,
                args=(
                    list(range(p, self.workers, processes)),
                    spec,
                    (self.progress, self.go_flag, self.stop_flag, self.flagged),
                    str(self.outs[p]),
                ),
                name=f"counter-ranks-{p}",
                daemon=True,
            )
            for p in range(processes)
        ]

    def start(self, timeout: float = 90.0) -> CounterRanks:
        """Start the processes; return once every rank is connected and logged in."""
        for proc in self.procs:
            proc.start()
        deadline = time.monotonic() + timeout
        while min(self.progress[:]) < 0:
            dead = [p.name for p in self.procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"rank processes exited before connecting: {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks not connected after {timeout}s: {self.progress[:]}")
            time.sleep(0.05)
        return self

    def go(self) -> None:
        self.go_flag.value = 1

    def stop(self) -> None:
        """Ask every rank to stop before its next add."""
        self.stop_flag.value = 1

    def done(self) -> int:
        """Adds attempted so far, all ranks together."""
        return sum(max(0, n) for n in self.progress[:])

    def wait_done(self, adds: int, timeout: float) -> None:
        """Block until the ranks attempted ``adds`` adds in all (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while self.done() < adds:
            if not any(p.is_alive() for p in self.procs):
                raise RuntimeError(f"rank processes ended after {self.done()} adds")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.done()} adds after {timeout}s, want {adds}")
            time.sleep(0.005)

    def join(self, timeout: float) -> list[RankResult]:
        """Wait for every process; every rank's result (a rank that did not report: crashed)."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        results: dict[int, RankResult] = {}
        for proc, out in zip(self.procs, self.outs, strict=True):
            if not proc.is_alive() and out.exists():
                for raw in json.loads(out.read_text()):
                    results[raw["rank"]] = RankResult(**raw)
        for rank in range(self.workers):
            if rank not in results:
                results[rank] = RankResult(rank, [], crashed="the rank did not report")
        return [results[r] for r in range(self.workers)]

    def close(self) -> None:
        """End every process still running (SIGKILL) and reap it."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join(10)


__all__ = ["CounterRanks", "RankResult"]
