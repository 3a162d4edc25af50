"""#1 etha etcd op latency vs the raw clients, #2 etha TCPStore vs raw TCPStore.

Same server, same keys, same values, one client of each kind in this process. Samples
are single-op latencies (``perf_counter`` around one call). The clients take turns in
rounds (order rotated every round) so that machine noise hits them alike; the spread
of the per-round p50 ratio is reported next to the pooled ratio.

* etcd: ``raw-grpc`` = the generated ``KVStub`` of etcd-sdk-python on one insecure
  channel (the leanest possible client: no deadline, no retries); ``pyetcd`` = that
  library's high-level client; ``etha`` = :class:`etha.kvstore.etcd.EtcdKVStore`.
  ``set``/``set_bytes`` are compared with a raw ``Put``, ``get``/``get_bytes`` with a
  raw ``Range`` of the same full key.
* TCPStore: ``raw`` = ``torch.distributed.TCPStore`` client; ``etha`` =
  :class:`etha.kvstore.tcpstore.TCPStoreKVStore` on the same server. One sample is a
  ``set`` followed by a ``get`` of the same key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.common import Figure, etcd_server, figure, log, percentile, tcpstore_server

SIZES = {"100B": 100, "64KiB": 64 * 1024}
ETCD_OPS = ("set", "get", "set_bytes", "get_bytes")

Op = Callable[[], object]


def _measure(op: Op, n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        op()
        out.append(clock() - t0)


def _interleaved(
    ops: dict[str, Op], rounds: int, batch: int, warmup: int
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Run every op ``rounds`` x ``batch`` times, rotating the order; pooled samples and
    per-round p50s."""
    for op in ops.values():
        _measure(op, warmup, [])
    samples: dict[str, list[float]] = {name: [] for name in ops}
    per_round: list[dict[str, float]] = []
    names = list(ops)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        this: dict[str, float] = {}
        for name in order:
            chunk: list[float] = []
            _measure(ops[name], batch, chunk)
            samples[name].extend(chunk)
            this[name] = percentile(chunk, 50)
        per_round.append(this)
    return samples, per_round


def _round_ratios(per_round: list[dict[str, float]], name: str, base: str) -> dict[str, float]:
    ratios = [r[name] / r[base] for r in per_round if r.get(base)]
    if not ratios:
        return {}
    return {"min": min(ratios), "median": percentile(ratios, 50), "max": max(ratios)}


def _optional_store(backend: str, make: Callable[[Any], Any]) -> Any:
    """An etha store of ``backend``, or None (logged) while that backend does not exist yet."""
    import importlib

    try:
        module = importlib.import_module(f"etha.kvstore.{backend}")
    except ImportError as exc:
        log(f"etha {backend} backend not available ({exc}); measuring the baselines only")
        return None
    return make(module)


def _etcd_ops(
    kv: Any, pyetcd: Any, etha: Any, full: bytes, rel: str, text: str, data: bytes
) -> dict[str, Op]:
    from pyetcd import etcdrpc

    text_b = text.encode()
    put = etcdrpc.PutRequest(key=full, value=text_b)
    ops: dict[str, Op] = {
        "raw-grpc.put": lambda: kv.Put(put),
        "raw-grpc.range": lambda: bytes(kv.Range(etcdrpc.RangeRequest(key=full)).kvs[0].value),
        "pyetcd.put": lambda: pyetcd.put(full, text_b),
        "pyetcd.get": lambda: pyetcd.get(full)[0],
    }
    if etha is not None:
        ops["etha.set"] = lambda: etha.set(rel, text)
        ops["etha.get"] = lambda: etha.get(rel)
        ops["etha.set_bytes"] = lambda: etha.set_bytes(f"{rel}-bin", data)
        ops["etha.get_bytes"] = lambda: etha.get_bytes(f"{rel}-bin")
    return ops


def _tcpstore_ops(
    raw: Any, etha: Any, raw_key: str, rel: str, text: str, data: bytes
) -> dict[str, Op]:
    def raw_pair() -> object:
        raw.set(raw_key, text)
        return raw.get(raw_key)

    def etha_pair() -> object:
        etha.set(rel, text)
        return etha.get(rel)

    def etha_bytes_pair() -> object:
        etha.set_bytes(f"{rel}-bin", data)
        return etha.get_bytes(f"{rel}-bin")

    ops: dict[str, Op] = {"raw.set+get": raw_pair}
    if etha is not None:
        ops["etha.set+get"] = etha_pair
        ops["etha.set_bytes+get_bytes"] = etha_bytes_pair
    return ops


def bench_etcd(quick: bool) -> dict[str, Figure]:
    import grpc
    from pyetcd import client as pyetcd_client
    from pyetcd import etcdrpc

    rounds, batch, warmup = (3, 40, 20) if quick else (15, 100, 100)
    figures: dict[str, Figure] = {}
    with etcd_server() as cluster:
        endpoint = cluster.endpoints[0]
        host, port = endpoint.rsplit(":", 1)
        namespace = f"bench-ops-{uuid.uuid4().hex[:8]}"
        channel = grpc.insecure_channel(endpoint)
        kv = etcdrpc.KVStub(channel)
        pyetcd = pyetcd_client(host=host, port=int(port))
        etha = _optional_store("etcd", lambda m: m.EtcdKVStore(namespace, endpoints=[endpoint]))
        try:
            for size_name, size in SIZES.items():
                text = "v" * size
                data = bytes(range(256)) * (size // 256) + bytes(size % 256)
                rel = f"ops/{size_name}"
                full = f"{namespace}/default/{rel}".encode()
                full_bin = f"{namespace}/default/{rel}-bin".encode()
                text_b = text.encode()

                ops = _etcd_ops(kv, pyetcd, etha, full, rel, text, data)
                kv.Put(etcdrpc.PutRequest(key=full, value=text_b))
                kv.Put(etcdrpc.PutRequest(key=full_bin, value=data))
                if etha is not None:
                    # What is read while timing exists and holds the right bytes.
                    etha.set(rel, text)
                    etha.set_bytes(f"{rel}-bin", data)
                    assert etha.get(rel) == text_b and etha.get_bytes(f"{rel}-bin") == data

                def raw_get(key: bytes) -> bytes:
                    return bytes(kv.Range(etcdrpc.RangeRequest(key=key)).kvs[0].value)

                assert raw_get(full) == text_b and raw_get(full_bin) == data
                log(f"#1 etcd ops {size_name}: {rounds} rounds x {batch}")
                samples, per_round = _interleaved(ops, rounds, batch, warmup)
                pairs = {"set": "put", "set_bytes": "put", "get": "range", "get_bytes": "range"}
                for name, vals in samples.items():
                    impl, op = name.split(".", 1)
                    figures[f"1.etcd.{impl}.{op}.{size_name}"] = figure(vals)
                for op, raw_op in pairs.items():
                    name = f"1.etcd.etha.{op}.{size_name}"
                    if name not in figures:
                        continue
                    figures[name].update(
                        baseline=f"1.etcd.raw-grpc.{raw_op}.{size_name}",
                        target={"stats": ["p50", "p99"], "max_ratio": 1.10},
                        ratio_rounds=_round_ratios(per_round, f"etha.{op}", f"raw-grpc.{raw_op}"),
                        note="single-op latency, one client per kind in one process, same server",
                    )
                for op in ("put", "get"):
                    raw_op = "put" if op == "put" else "range"
                    figures[f"1.etcd.pyetcd.{op}.{size_name}"]["baseline"] = (
                        f"1.etcd.raw-grpc.{raw_op}.{size_name}"
                    )
        finally:
            if etha is not None:
                etha.close()
            pyetcd.close()
            channel.close()
    return figures


def bench_tcpstore(quick: bool) -> dict[str, Figure]:
    from datetime import timedelta

    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    rounds, batch, warmup = (3, 40, 20) if quick else (15, 100, 100)
    figures: dict[str, Figure] = {}
    with tcpstore_server() as (host, port, _server):
        raw = TCPStore(
            host, port, is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False
        )
        namespace = f"bench-ops-{uuid.uuid4().hex[:8]}"
        etha = _optional_store(
            "tcpstore", lambda m: m.TCPStoreKVStore(namespace, host=host, port=port, timeout=30.0)
        )
        try:
            for size_name, size in SIZES.items():
                text = "v" * size
                data = bytes(range(256)) * (size // 256) + bytes(size % 256)
                rel = f"ops/{size_name}"
                raw_key = f"{namespace}/raw/{rel}"

                ops = _tcpstore_ops(raw, etha, raw_key, rel, text, data)
                for call in ops.values():
                    call()
                assert raw.get(raw_key) == text.encode()
                if etha is not None:
                    assert etha.get(rel) == text.encode() and etha.get_bytes(f"{rel}-bin") == data
                log(f"#2 tcpstore ops {size_name}: {rounds} rounds x {batch}")
                samples, per_round = _interleaved(ops, rounds, batch, warmup)
                for name, vals in samples.items():
                    impl, op = name.split(".", 1)
                    figures[f"2.tcpstore.{impl}.{op}.{size_name}"] = figure(vals)
                for op in ("set+get", "set_bytes+get_bytes"):
                    if f"2.tcpstore.etha.{op}.{size_name}" not in figures:
                        continue
                    figures[f"2.tcpstore.etha.{op}.{size_name}"].update(
                        baseline=f"2.tcpstore.raw.set+get.{size_name}",
                        ratio_rounds=_round_ratios(per_round, f"etha.{op}", "raw.set+get"),
                    )
                if etha is not None:
                    figures[f"2.tcpstore.etha.set+get.{size_name}"]["target"] = {
                        "stat": "p50",
                        "max_ratio": 1.20,
                    }
        finally:
            if etha is not None:
                etha.close()
            del raw, ops
    return figures


def run(quick: bool) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    for part in (bench_etcd, bench_tcpstore):
        figures.update(part(quick))
    return figures
