"""#3 wake-up latency: a waiter in another process returns after this process sets a key.

One iteration: the waiter process is told to wait for a fresh key; this process sleeps
``ARM_S`` (so that the waiter has read and armed its watch or poll), takes ``t0`` and
sets the key; the waiter takes ``t1`` when its wait returns. Latency = ``t1 - t0``
(``perf_counter`` is CLOCK_MONOTONIC, one clock for every process). Each kind uses its
own client for the set, so a latency includes that client's set.

Kinds: ``raw-tcpstore`` (``TCPStore.wait([key])``: the issue's baseline),
``etha-tcpstore`` (polled), ``raw-etcd`` (the generated gRPC stubs: one Range, then a
watch on a persistent Watch stream: the leanest event-driven wait) and ``etha-etcd``.
etcd runs with auth on and the clients use a password user limited to the namespace, as
a job's workers do.
"""

from __future__ import annotations

import queue
import time
import uuid
from datetime import timedelta
from typing import Any

from bench.common import (
    Figure,
    Workers,
    etcd_with_user,
    figure,
    log,
    queue_items,
    summarize,
    tcpstore_server,
)

ARM_S = 0.02
USER, PASSWORD = "bench-wait", "bench-wait-password"

# -- the waiter process ------------------------------------------------------------------------

_W: dict[str, Any] = {}


class RawEtcdWaiter:
    """Range, then watch on one persistent Watch stream; gRPC stubs only, token as metadata."""

    def __init__(self, endpoint: str, user: str, password: str) -> None:
        import grpc
        from pyetcd import etcdrpc

        self.rpc = etcdrpc
        self.channel = grpc.insecure_channel(endpoint)
        auth = etcdrpc.AuthStub(self.channel)
        token = auth.Authenticate(etcdrpc.AuthenticateRequest(name=user, password=password)).token
        self.metadata = (("token", token),)
        self.kv = etcdrpc.KVStub(self.channel)
        self.requests: queue.Queue[Any] = queue.Queue()
        self.responses = etcdrpc.WatchStub(self.channel).Watch(
            queue_items(self.requests), metadata=self.metadata
        )

    def wait_for_key(self, key: bytes) -> bytes:
        rpc = self.rpc
        resp = self.kv.Range(rpc.RangeRequest(key=key), metadata=self.metadata)
        if resp.kvs:
            return bytes(resp.kvs[0].value)
        self.requests.put(
            rpc.WatchRequest(
                create_request=rpc.WatchCreateRequest(
                    key=key, start_revision=resp.header.revision + 1
                )
            )
        )
        watch_id = None
        for wresp in self.responses:
            if wresp.created and watch_id is None:
                watch_id = wresp.watch_id
            if wresp.watch_id == watch_id and wresp.events:
                self.requests.put(
                    rpc.WatchRequest(cancel_request=rpc.WatchCancelRequest(watch_id=watch_id))
                )
                return bytes(wresp.events[0].kv.value)
        raise RuntimeError("watch stream ended")

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()
        self.channel.close()


def open_store(kind: str, info: dict[str, Any]) -> Any:
    """A client of ``kind`` (both the waiter and the setter use this)."""
    if kind == "raw-tcpstore":
        from torch.distributed import TCPStore  # type: ignore[attr-defined]

        return TCPStore(
            info["host"],
            info["port"],
            is_master=False,
            timeout=timedelta(seconds=30),
            wait_for_workers=False,
        )
    if kind == "etha-tcpstore":
        from etha.kvstore.tcpstore import TCPStoreKVStore

        return TCPStoreKVStore(
            info["namespace"], host=info["host"], port=info["port"], timeout=30.0
        )
    if kind == "raw-etcd":
        return RawEtcdWaiter(info["endpoint"], USER, PASSWORD)
    if kind == "etha-etcd":
        from etha.kvstore.etcd import EtcdKVStore

        return EtcdKVStore(
            info["namespace"],
            endpoints=[info["endpoint"]],
            username=USER,
            password=PASSWORD,
            timeout=30.0,
        )
    raise ValueError(kind)


def w_open(kind: str, info: dict[str, Any]) -> None:
    _W["store"] = open_store(kind, info)
    _W["kind"] = kind


def w_wait(mode: str, key: str, expected: str) -> tuple[float, float]:
    """Wait as the current kind does; (time of the call, time it returned)."""
    store, kind = _W["store"], _W["kind"]
    t_call = time.perf_counter()
    if kind == "raw-tcpstore":
        store.wait([key], timedelta(seconds=30))
    elif kind == "raw-etcd":
        store.wait_for_key(key.encode())
    elif mode == "key":
        store.wait_for_key(key, timeout=30.0)
    else:
        store.wait_for_value(key, expected, timeout=30.0)
    return t_call, time.perf_counter()


def w_close() -> None:
    store = _W.pop("store", None)
    if store is not None and hasattr(store, "close"):
        store.close()


# -- the setter (this process) -------------------------------------------------------------


def _setter(kind: str, info: dict[str, Any]) -> Any:
    if kind == "raw-etcd":
        import grpc
        from pyetcd import etcdrpc

        channel = grpc.insecure_channel(info["endpoint"])
        token = (
            etcdrpc.AuthStub(channel)
            .Authenticate(etcdrpc.AuthenticateRequest(name=USER, password=PASSWORD))
            .token
        )
        kv = etcdrpc.KVStub(channel)
        md = (("token", token),)

        class RawSetter:
            def set(self, key: str, value: str) -> None:
                kv.Put(etcdrpc.PutRequest(key=key.encode(), value=value.encode()), metadata=md)

            def close(self) -> None:
                channel.close()

        return RawSetter()
    return open_store(kind, info)


def _full(kind: str, info: dict[str, Any], key: str) -> str:
    """Raw clients see the stored key; etha clients the key relative to the component."""
    return f"{info['namespace']}/default/{key}" if kind.startswith("raw") else key


def measure(
    workers: Workers, kind: str, mode: str, info: dict[str, Any], iters: int, warmup: int
) -> tuple[list[float], list[float], int]:
    """Wake-up latencies, the setter's set() times, and how many late starts were dropped."""
    setter = _setter(kind, info)
    workers.call(w_open, (kind, info))
    samples: list[float] = []
    set_times: list[float] = []
    late = 0
    try:
        for i in range(warmup + iters):
            key = _full(kind, info, f"wake/{kind}/{mode}/{i}")
            if mode == "value":
                setter.set(key, f"old-{i}")
            workers.send(0, w_wait, mode, key, f"new-{i}")
            time.sleep(ARM_S)
            t0 = time.perf_counter()
            setter.set(key, f"new-{i}" if mode == "value" else "1")
            t_set = time.perf_counter()
            t_call, t1 = workers.recv(0, timeout=60)
            if i < warmup:
                continue
            if t_call > t0:  # the waiter started after the set: not a wake-up, drop it
                late += 1
                continue
            samples.append(t1 - t0)
            set_times.append(t_set - t0)
    finally:
        workers.call(w_close, ())
        if hasattr(setter, "close"):
            setter.close()
        else:
            del setter
    return samples, set_times, late


def run(quick: bool) -> dict[str, Figure]:
    iters, warmup = (10, 2) if quick else (200, 20)
    figures: dict[str, Figure] = {}
    namespace = f"bench-wait-{uuid.uuid4().hex[:8]}"
    with (
        etcd_with_user(USER, PASSWORD, f"{namespace}/") as cluster,
        tcpstore_server() as (host, port, _server),
        Workers(1) as workers,
    ):
        info = {
            "host": host,
            "port": port,
            "endpoint": cluster.endpoints[0],
            "namespace": namespace,
        }
        plan = [
            ("raw-tcpstore", "key"),
            ("etha-tcpstore", "key"),
            ("raw-etcd", "key"),
            ("etha-etcd", "key"),
            ("etha-tcpstore", "value"),
            ("etha-etcd", "value"),
        ]
        for kind, mode in plan:
            log(f"#3 wake-up {kind} wait_for_{mode}: {iters} iterations")
            samples, set_times, late = measure(workers, kind, mode, info, iters, warmup)
            name = f"3.wake.{kind}.wait_for_{mode}"
            fig = figure(
                samples,
                late_starts_dropped=late,
                set_call_ms=summarize([t * 1000 for t in set_times]),
                note=f"set in one process -> wait returns in another; arm {ARM_S * 1000:.0f} ms",
            )
            if kind != "raw-tcpstore":
                fig["baseline"] = "3.wake.raw-tcpstore.wait_for_key"
            if kind == "etha-etcd":
                fig["target"] = {"stat": "p50", "max": 1.5}
            figures[name] = fig
        figures.update(_idle_puts(info, 20 if quick else 150))
    return figures


def _idle_puts(info: dict[str, Any], n: int) -> dict[str, Figure]:
    """A raw Put back to back, and after ARM_S of idleness (as the setter above does)."""
    setter = _setter("raw-etcd", info)
    key = f"{info['namespace']}/default/idle"
    out: dict[str, Figure] = {}
    try:
        for name, gap in (("back-to-back", 0.0), (f"after-{ARM_S * 1000:.0f}ms-idle", ARM_S)):
            samples = []
            for _ in range(n):
                if gap:
                    time.sleep(gap)
                t0 = time.perf_counter()
                setter.set(key, "1")
                samples.append(time.perf_counter() - t0)
            out[f"3.raw-etcd-put.{name}"] = figure(
                samples, note="raw gRPC Put with a token; the floor of a wake-up's set()"
            )
    finally:
        setter.close()
    return out
