"""``init_process_group`` wall time: ``etha://`` against torch's default TCPStore rendezvous.

N worker processes (forked from one preloaded server, so torch is imported already)
call ``init_process_group("gloo", ...)`` together: this process picks a start time
``go`` a little ahead, every rank sleeps until ``go`` and initialises. The figure is
``max(done) - go``: from the common start until the last rank has its process group,
i.e. the store rendezvous plus gloo's full-mesh connect, which uses the store.

Kinds, measured in the same run and interleaved round by round:

* ``tcpstore``: ``init_method="tcp://127.0.0.1:<free port>"``, rank 0 hosts the
  TCPStore (torch's default rendezvous);
* ``etha``: ``init_method="etha:///<run id>"`` on one etcd member (auth on; a password
  user limited to the namespace, as the operator provisions). Cold like TCPStore: each
  round opens a new channel and logs in (bcrypt on the server), as a real process does
  for its one ``init_process_group``;
* ``etha-warm``: the same, with the channel and log-in made before ``go``: what the
  rendezvous and gloo's store traffic cost alone.

Round 0 is a warm-up; the order of the kinds rotates every round.

``run(quick)`` returns ``{name: figure}`` for ``bench/run.py``; standalone:
``python -m bench.bench_init_process_group [--quick]`` prints the JSON and writes
``bench/out/init_process_group.json``.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from datetime import timedelta
from typing import Any

from bench.common import Figure, Workers, etcd_with_user, figure, log, module_main, sleep_until

NAMESPACE = "bench-init"
USER, PASSWORD = "bench-init", "bench-init-password"
KINDS = ("tcpstore", "etha", "etha-warm")
TIMEOUT_S = 180.0

# -- inside the worker processes -------------------------------------------------------------


def _init_once(kind: str, url: str, rank: int, world: int, go: float, env: dict[str, str]) -> float:
    """Initialise a gloo process group at ``go``; return when this rank had it."""
    os.environ.update(env)
    import torch.distributed as dist

    warm = None
    if kind.startswith("etha"):
        import etha.distributed

        # Cold: no etcd connection survives from an earlier round (a store torch no
        # longer holds is freed, with its client, at the next garbage collection).
        gc.collect()
        if kind == "etha-warm":
            # Connect and log in before the clock starts; the rendezvous reuses it.
            warm = etha.distributed.EthaStore(scope="warm-up")
            warm.check(["nothing"])

    sleep_until(go)
    dist.init_process_group(
        "gloo", init_method=url, rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S)
    )
    done = time.perf_counter()
    # Not measured: keep rank 0's TCPStore up until every rank is through.
    dist.barrier()
    dist.destroy_process_group()
    if kind.startswith("etha"):
        gc.collect()
        if warm is not None:
            warm.close()
    return done


# -- this process -------------------------------------------------------------------------------


def _env(cluster: Any) -> dict[str, str]:
    return {
        "ETHA_KV_BACKEND": "etcd",
        "ETHA_KV_NAMESPACE": NAMESPACE,
        "ETHA_KV_ENDPOINTS": ",".join(cluster.urls),
        "ETHA_KV_USERNAME": USER,
        "ETHA_KV_PASSWORD": PASSWORD,
        # Gloo must use loopback; reverse DNS stalls connects in this sandbox.
        "GLOO_SOCKET_IFNAME": "lo",
        "RES_OPTIONS": "timeout:1 attempts:1",
    }


def _round(workers: Workers, kind: str, world: int, env: dict[str, str]) -> float:
    from tests.support.ports import free_port

    if kind.startswith("etha"):
        url = f"etha:///init-{uuid.uuid4().hex[:10]}"
    else:
        url = f"tcp://127.0.0.1:{free_port()}"
    go = time.perf_counter() + 0.5 + world * 0.01
    done = workers.call(
        _init_once, lambda r: (kind, url, r, world, go, env), timeout=TIMEOUT_S + 60
    )
    return max(done) - go


def run(quick: bool = False) -> dict[str, Figure]:
    """``{name: figure}`` with ``init_pg.<kind>.n<N>`` for N in 8, 32 (quick: 8 only)."""
    worlds = (8,) if quick else (8, 32)
    runs = 1 if quick else 5
    samples: dict[tuple[str, int], list[float]] = {}
    with etcd_with_user(USER, PASSWORD, f"{NAMESPACE}/") as cluster:
        env = _env(cluster)
        for world in worlds:
            with Workers(world) as workers:
                for i in range(runs + 1):  # round 0: warm-up
                    for kind in KINDS[i % len(KINDS) :] + KINDS[: i % len(KINDS)]:
                        seconds = _round(workers, kind, world, env)
                        log(f"init_pg {kind} N={world} round {i}: {seconds * 1000:.0f} ms")
                        if i > 0:
                            samples.setdefault((kind, world), []).append(seconds)
    figures: dict[str, Figure] = {}
    for world in worlds:
        base = f"init_pg.tcpstore.n{world}"
        figures[base] = figure(
            samples[("tcpstore", world)],
            note=f"init_process_group(gloo, tcp://) of {world} processes, cold TCPStore",
        )
        figures[f"init_pg.etha.n{world}"] = figure(
            samples[("etha", world)],
            baseline=base,
            note=(
                f"init_process_group(gloo, etha://) of {world} processes, etcd with auth,"
                " new channel + password log-in per process (the real-life case)"
            ),
        )
        figures[f"init_pg.etha-warm.n{world}"] = figure(
            samples[("etha-warm", world)],
            baseline=base,
            note=(
                "the same with each process's etcd channel and log-in made before the"
                " clock starts: the rendezvous and gloo's store traffic alone"
            ),
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    return module_main(run, "init_process_group", argv)


if __name__ == "__main__":
    raise SystemExit(main())
