"""Client CPU per call (``time.process_time`` around a loop, this process only).

Wall-clock figures on a shared 2-core machine are noisy; CPU time per call is not, and
it is what the barrier figures are made of (#4, #5). Each figure is the CPU of one call
in microseconds, one sample per repetition (the loop's mean), median of the samples.

* ``cpu.etcd.*``: etha ``set``/``get`` against raw ``Put``/``Range`` on the gRPC stubs.
* ``cpu.tcpstore.raw.get``: one TCPStore round trip (client and its in-process server).
* ``cpu.etcd.*.wait_for_keys.N<n>``: a ``wait_for_keys`` whose n keys all exist already
  (one Range and the per-key matching), against a raw Range of the same prefix that
  counts the values (the least any client must do).
* ``cpu.tcpstore.*.wait_for_keys.N64``: the same on TCPStore, against raw
  ``TCPStore.wait`` of the 64 keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bench.common import Figure, etcd_server, figure, log, tcpstore_server


def _cpu(fn: Callable[[], object], calls: int, reps: int) -> list[float]:
    for _ in range(max(10, calls // 10)):
        fn()
    out = []
    for _ in range(reps):
        c0 = time.process_time()
        for _ in range(calls):
            fn()
        out.append((time.process_time() - c0) / calls)
    return out


def _fig(samples: list[float], baseline: str | None = None, note: str | None = None) -> Figure:
    return figure(samples, unit="us", scale=1e6, baseline=baseline, note=note)


def run(quick: bool) -> dict[str, Figure]:
    import grpc
    from pyetcd import etcdrpc
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    from etha.kvstore.etcd import EtcdKVStore
    from etha.kvstore.tcpstore import TCPStoreKVStore

    calls, reps = (100, 3) if quick else (1000, 7)
    figures: dict[str, Figure] = {}
    with etcd_server() as cluster:
        channel = grpc.insecure_channel(cluster.endpoints[0])
        kv = etcdrpc.KVStub(channel)
        store = EtcdKVStore("bench-cpu", endpoints=cluster.endpoints)
        try:
            value = "v" * 100
            put = etcdrpc.PutRequest(key=b"bench-cpu/default/k", value=value.encode())
            rng = etcdrpc.RangeRequest(key=b"bench-cpu/default/k")
            log(f"cpu: etcd ops, {reps} x {calls} calls")
            pairs: list[tuple[str, Callable[[], object]]] = [
                ("raw-grpc.put", lambda: kv.Put(put)),
                ("etha.set", lambda: store.set("k", value)),
                ("raw-grpc.range", lambda: kv.Range(rng)),
                ("etha.get", lambda: store.get("k")),
            ]
            for name, fn in pairs:
                figures[f"cpu.etcd.{name}"] = _fig(_cpu(fn, calls, reps))
            figures["cpu.etcd.etha.set"]["baseline"] = "cpu.etcd.raw-grpc.put"
            figures["cpu.etcd.etha.get"]["baseline"] = "cpu.etcd.raw-grpc.range"
            for n in (64,) if quick else (64, 1024):
                for i in range(n):
                    store.set(f"w{n}/rank:{i}/ready", "1")
                prefix = f"bench-cpu/default/w{n}/rank:".encode()
                req = etcdrpc.RangeRequest(key=prefix, range_end=prefix[:-1] + b";")

                def raw_count(req: Any = req) -> int:
                    return sum(1 for x in kv.Range(req).kvs if x.value == b"1")

                def etha_wait(n: int = n) -> object:
                    return store.wait_for_keys(f"w{n}/rank:*/ready", n, timeout=10)

                assert raw_count() == n and len(etha_wait()) == n  # type: ignore[arg-type]
                c = max(20, calls // (n // 16))
                base = f"cpu.etcd.raw-grpc.range+count.N{n}"
                figures[base] = _fig(_cpu(raw_count, c, reps))
                figures[f"cpu.etcd.etha.wait_for_keys.N{n}"] = _fig(
                    _cpu(etha_wait, c, reps), baseline=base, note="all n keys present"
                )
        finally:
            store.close()
            channel.close()
    with tcpstore_server() as (host, port, _server):
        raw = TCPStore(
            host, port, is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False
        )
        tstore = TCPStoreKVStore("bench-cpu", host=host, port=port, timeout=30.0)
        try:
            raw.set("k", "1")
            log("cpu: tcpstore ops")
            figures["cpu.tcpstore.raw.get"] = _fig(
                _cpu(lambda: raw.get("k"), calls, reps),
                note="client and the in-process server together",
            )
            n = 64
            cands = [f"b/rank:{i}/ready" for i in range(n)]
            for c_key in cands:
                tstore.set(c_key, "1")
            fulls = [f"bench-cpu/default/{c_key}" for c_key in cands]
            figures["cpu.tcpstore.raw.wait.N64"] = _fig(
                _cpu(lambda: raw.wait(fulls, timedelta(seconds=10)), calls, reps),
                note="all 64 keys present",
            )
            figures["cpu.tcpstore.etha.wait_for_keys.N64"] = _fig(
                _cpu(
                    lambda: tstore.wait_for_keys("b/rank:*/ready", n, candidate_keys=cands),
                    calls,
                    reps,
                ),
                baseline="cpu.tcpstore.raw.wait.N64",
                note="all 64 keys present",
            )
        finally:
            tstore.close()
    return figures
