"""A 16 MiB value through ``EthaStore`` against torch's ``TCPStore``: ``set`` then ``get``.

Values over one etcd request (1.5 MiB) are stored in 1 MiB chunks (docs/torch.md): a
``set`` of 16 MiB is 16 chunk puts plus one manifest transaction, a ``get`` one read of
the key plus 4 chunk reads at its revision. TCPStore sends the value in one message.

Both stores live in this process, measured in the same run and interleaved round by
round (the order alternates): a TCPStore server on loopback (``use_libuv=False``: torch
2.13's default libuv server drops the connection for values over 8 MiB), and an
``EthaStore`` on a
one-member etcd (``--unsafe-no-fsync``, auth on, a password user limited to the
namespace, as the operator provisions). Each round writes a new value (so that the
store really replaces a 16 MiB value) and reads it back; round 0 is a warm-up.

``run(quick)`` returns ``{name: figure}`` for ``bench/run.py`` (``--only torch_store``);
standalone: ``python -m bench.bench_torch_store [--quick]`` prints the JSON and writes
``bench/out/torch_store.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bench.common import Figure, etcd_with_user, figure, log, module_main

NAMESPACE = "bench-torch-store"
USER, PASSWORD = "bench-torch-store", "bench-torch-store-password"
SIZE = 16 * 1024 * 1024
KEY = "bench/value"


def _values(rounds: int) -> list[bytes]:
    """One distinct 16 MiB value per round (built before the clock runs)."""
    block = bytes(range(256)) * 16
    return [bytes([i % 251]) + (block * (SIZE // len(block)))[1:] for i in range(rounds)]


def _round(store: Any, value: bytes) -> tuple[float, float]:
    """Seconds for ``set`` and for ``get`` of ``value``; checks what came back."""
    t0 = time.perf_counter()
    store.set(KEY, value)
    t1 = time.perf_counter()
    got = store.get(KEY)
    t2 = time.perf_counter()
    if got != value:
        raise RuntimeError(f"{type(store).__name__} returned {len(got)} bytes, not the value set")
    return t1 - t0, t2 - t1


def run(quick: bool = False) -> dict[str, Figure]:
    """``torch_store.<kind>.{set_get,set,get}_16MiB`` for kind tcpstore and etha."""
    from etha.distributed import EthaStore
    from etha.kvstore.config import EtcdConfig, parse_endpoints

    rounds = 3 if quick else 10
    values = _values(rounds + 1)
    samples: dict[tuple[str, str], list[float]] = {}
    import torch.distributed as dist

    from tests.support.ports import free_port

    tcp = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1",
        free_port(),
        is_master=True,
        timeout=timedelta(seconds=120),
        wait_for_workers=False,
        use_libuv=False,
    )
    with etcd_with_user(USER, PASSWORD, f"{NAMESPACE}/") as cluster:
        endpoints, _ = parse_endpoints(",".join(cluster.urls))
        config = EtcdConfig(
            namespace=NAMESPACE, endpoints=endpoints, username=USER, password=PASSWORD
        )
        etha = EthaStore(config, scope="bench", timeout=timedelta(seconds=120))
        stores: dict[str, Callable[[bytes], tuple[float, float]]] = {
            "tcpstore": lambda v: _round(tcp, v),
            "etha": lambda v: _round(etha, v),
        }
        try:
            for i, value in enumerate(values):  # round 0: warm-up
                order = ["tcpstore", "etha"] if i % 2 == 0 else ["etha", "tcpstore"]
                for kind in order:
                    set_s, get_s = stores[kind](value)
                    log(
                        f"torch_store {kind} round {i}: set {set_s * 1000:.0f} ms,"
                        f" get {get_s * 1000:.0f} ms"
                    )
                    if i > 0:
                        samples.setdefault((kind, "set"), []).append(set_s)
                        samples.setdefault((kind, "get"), []).append(get_s)
                        samples.setdefault((kind, "set_get"), []).append(set_s + get_s)
        finally:
            etha.close()
    figures: dict[str, Figure] = {}
    notes = {
        "set_get": "set then get of a new 16 MiB value",
        "set": "set of a 16 MiB value (replacing the previous one)",
        "get": "get of the 16 MiB value just set",
    }
    for op, note in notes.items():
        base = f"torch_store.tcpstore.{op}_16MiB"
        figures[base] = figure(samples[("tcpstore", op)], note=f"TCPStore: {note}")
        figures[f"torch_store.etha.{op}_16MiB"] = figure(
            samples[("etha", op)],
            baseline=base,
            note=f"EthaStore on etcd with auth: {note} (1 MiB chunks)",
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    return module_main(run, "torch_store", argv)


if __name__ == "__main__":
    raise SystemExit(main())
