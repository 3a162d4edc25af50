"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME ...]``.

Prints one table of every figure and writes ``bench/out/latest.json`` (after each
benchmark, so that a crash keeps what was measured). A benchmark that fails is reported
under ``errors`` and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    FSYNC_MODE,
    LATEST,
    Figure,
    evaluate,
    git_state,
    log,
    machine_info,
    table,
    utc_now,
    versions,
    write_json,
)

#: name -> (module, function, what it measures). Functions take ``quick`` and return
#: ``{figure name: figure}``.
BENCHES: dict[str, tuple[str, str, str]] = {
    "ops": ("bench.bench_ops", "run", "#1 etcd op latency, #2 TCPStore set+get"),
    "wait": ("bench.bench_wait", "run", "#3 wake-up latency across processes"),
    "cpu": ("bench.bench_cpu", "run", "client CPU per call, etha vs raw (explains #1, #4, #5)"),
    "barrier": ("bench.bench_barrier", "run_barrier", "#4 barrier of N processes"),
    "scaling": ("bench.bench_barrier", "run_scaling", "#5 barrier of 64..1024 ranks"),
    "login": ("bench.bench_barrier", "run_login", "#6 log-in storm with password auth"),
    "operator": ("bench.bench_operator", "run", "#7-#9 operator latencies and RSS"),
    "gateway": (
        "bench.bench_gateway",
        "run",
        "etha through etha-gateway vs straight to etcd: ops, wake-up, barrier, log-ins, CPU",
    ),
    "init_pg": (
        "bench.bench_init_process_group",
        "run",
        "init_process_group: etha:// vs TCPStore rendezvous",
    ),
    "torch_store": (
        "bench.bench_torch_store",
        "run",
        "set+get of a 16 MiB value: EthaStore (chunked) vs TCPStore",
    ),
}


def _normalise(name: str, raw: dict[str, Any]) -> dict[str, Figure]:
    """Accept figures from other modules' ``run()`` that carry fewer fields."""
    out: dict[str, Figure] = {}
    for key, fig in raw.items():
        if not isinstance(fig, dict):
            fig = {"median": fig, "runs": 1}
        fig = dict(fig)
        fig.setdefault("runs", 1)
        for stat in ("median", "min", "max"):
            fig.setdefault(stat, math.nan)
        fig.setdefault("p50", fig["median"])
        fig.setdefault("p99", math.nan)
        fig.setdefault("unit", "ms")
        full = key if key[:1].isdigit() or key.startswith(f"{name}.") else f"{name}.{key}"
        out[full] = fig
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions; under 60 s")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHES),
        metavar="NAME",
        help=f"run only these ({', '.join(BENCHES)})",
    )
    parser.add_argument("--skip", nargs="+", choices=sorted(BENCHES), metavar="NAME", default=[])
    parser.add_argument("--out", type=Path, default=LATEST, help=f"JSON output [{LATEST}]")
    args = parser.parse_args(argv)

    selected = [b for b in (args.only or list(BENCHES)) if b not in args.skip]
    started = time.monotonic()
    result: dict[str, Any] = {
        "date": utc_now(),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "versions": versions(),
        "git": git_state(),
        "fsync_mode": FSYNC_MODE,
        "benchmarks": selected,
        "durations_s": {},
        "errors": {},
        "skipped": {},
        "figures": {},
    }
    figures: dict[str, Figure] = result["figures"]
    for name in selected:
        module_name, func_name, what = BENCHES[name]
        log(f"== {name}: {what}")
        t0 = time.monotonic()
        try:
            func: Callable[[bool], dict[str, Any]] = getattr(
                importlib.import_module(module_name), func_name
            )
            figures.update(_normalise(name, func(args.quick)))
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            # a benchmark module another part of the project has not delivered yet
            log(f"{name} skipped: {exc}")
            result["skipped"][name] = str(exc)
        except Exception as exc:
            import traceback

            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            result["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        result["durations_s"][name] = round(time.monotonic() - t0, 2)
        evaluate(figures)
        result["total_s"] = round(time.monotonic() - started, 2)
        result["machine"]["loadavg_end"] = os.getloadavg()
        write_json(result, args.out)

    print(
        f"\netha benchmarks ({result['mode']}), {result['date']}, "
        f"{result['machine']['nproc']} x {result['machine']['cpu_model']}, "
        f"kernel {result['machine']['kernel']}"
    )
    print(f"fsync: {FSYNC_MODE}")
    print(table(figures))
    missed = [n for n, f in figures.items() if f.get("met") is False]
    if missed:
        print(f"\ntargets missed: {', '.join(missed)}")
    for name, why in result["skipped"].items():
        print(f"\nskipped {name}: {why}")
    for name, err in result["errors"].items():
        print(f"\nERROR in {name}: {err.splitlines()[0]}")
    print(f"\nwrote {args.out} in {result['total_s']} s")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
