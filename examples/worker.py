"""An etha worker, as training code would write it: rendezvous, rank-0 broadcast, barrier.

Configuration comes only from the environment: the ``ETHA_KV_*`` variables that the etha
operator's webhook injects (see docs/configuration.md), plus torch's usual ``RANK`` and
``WORLD_SIZE``. It prints one JSON line with its timings, for the demo to collect.

Clean-up: the worker closes with ``cleanup=False``. Its keys are removed by the operator
when the Job ends (one range delete over the namespace's prefix); deleting barrier keys
here, while slower peers may still be waiting on them, would strand those peers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import etha.kvstore


def main() -> int:
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    timeout = float(os.environ.get("ETHA_WORKER_TIMEOUT", "120"))
    ready_keys = [f"rank:{i}/ready" for i in range(world_size)]
    done_keys = [f"rank:{i}/done" for i in range(world_size)]
    timings: dict[str, float] = {}

    started = time.perf_counter()
    store = etha.kvstore.from_env()
    try:
        timings["connect_ms"] = (time.perf_counter() - started) * 1000

        # 1. Rendezvous: everyone announces itself, then waits for all the others.
        t0 = time.perf_counter()
        store.set(f"rank:{rank}/ready", "1")
        store.wait_for_keys("rank:*/ready", world_size, timeout=timeout, candidate_keys=ready_keys)
        timings["rendezvous_ms"] = (time.perf_counter() - t0) * 1000

        # 2. Rank 0 broadcasts a binary blob (NUL bytes included); the others fetch it and
        # check its digest. The digest is written last, so it doubles as "payload ready".
        t0 = time.perf_counter()
        if rank == 0:
            payload = bytes(range(256)) * 256  # 64 KiB, every byte value
            store.set_bytes("broadcast/payload", payload)
            store.set("broadcast/sha256", hashlib.sha256(payload).hexdigest())
        digest = store.wait_for_key("broadcast/sha256", timeout=timeout).decode()
        payload = store.get_bytes("broadcast/payload") or b""
        if hashlib.sha256(payload).hexdigest() != digest:
            print(f"rank {rank}: broadcast payload corrupted", file=sys.stderr)
            return 1
        timings["broadcast_ms"] = (time.perf_counter() - t0) * 1000

        # 3. Final barrier: nobody leaves before everyone has the payload.
        t0 = time.perf_counter()
        store.set(f"rank:{rank}/done", "1")
        store.wait_for_keys("rank:*/done", world_size, timeout=timeout, candidate_keys=done_keys)
        timings["barrier_ms"] = (time.perf_counter() - t0) * 1000
    finally:
        store.close(cleanup=False)
    print(json.dumps({"rank": rank, "payload_bytes": len(payload), **timings}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
