"""Turn a run's JSON into markdown tables and PNG plots for docs/benchmarks.md.

``python -m bench.report [--json bench/out/latest.json] [--img docs/img]
[--doc docs/benchmarks.md]`` writes the plots, then replaces the text between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in the doc with the tables (or
prints them when the doc has no markers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.common import LATEST, fmt

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SUM_BEGIN, SUM_END = "<!-- summary:begin -->", "<!-- summary:end -->"
Fig = dict[str, Any]


def _r(fig: Fig | None, stat: str = "median") -> str:
    if not fig or fig.get(stat) is None:
        return "-"
    return fmt(fig[stat])


def _spread(fig: Fig | None) -> str:
    if not fig:
        return "-"
    if fig.get("error"):
        return f"failed: {fig['error'][:90]}"
    return f"{fmt(fig.get('median'))} ({fmt(fig.get('min'))}-{fmt(fig.get('max'))})"


def _ratio(fig: Fig | None, key: str = "ratio") -> str:
    if not fig or fig.get(key) is None:
        return "-"
    return f"{fig[key]:.2f}x"


def _met(fig: Fig | None) -> str:
    if not fig or fig.get("met") is None:
        return ""
    return "yes" if fig["met"] else "**no**"


def _details(fig: Fig) -> str:
    """The extra facts of an operator figure, in one cell."""
    parts = []
    for key in (
        "incomplete",
        "keys_deleted_status",
        "fill_s",
        "ready",
        "created_in_s",
        "rss_at_start_mib",
        "rss_at_end_mib",
    ):
        if fig.get(key) is not None:
            parts.append(f"{key} {fig[key]}")
    per = fig.get("etcd_requests_per_object")
    if per:
        parts.append("etcd requests per object: " + ", ".join(f"{k} {v:g}" for k, v in per.items()))
    return "; ".join(parts)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ns(figs: dict[str, Fig], prefix: str) -> list[int]:
    out = set()
    for name in figs:
        m = re.match(re.escape(prefix) + r"\.[^.]+\.N(\d+)$", name)
        if m:
            out.add(int(m.group(1)))
    return sorted(out)


def tables(result: dict[str, Any]) -> str:
    figs: dict[str, Fig] = result["figures"]
    f: Fig | None
    m = result["machine"]
    v = result["versions"]
    out: list[str] = [
        f"Run of {result['date']} ({result['mode']}), {m['nproc']} x {m['cpu_model']}, "
        f"{m.get('memory_mib')} MiB, Linux {m['kernel']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', []))}. "
        f"Python {v['python']}, torch {v['torch']}, etcd {v['etcd']}, grpcio {v['grpcio']}, "
        f"protobuf {v['protobuf']}, etcd-sdk-python {v['etcd-sdk-python']}, "
        f"kopf {v['kopf']}, etha {v['etha']}. fsync: {result['fsync_mode']}. "
        f"Total {result.get('total_s')} s. Code: commit {result.get('git', {}).get('commit')}"
        + (
            f" plus uncommitted changes in {', '.join(result['git']['dirty'])}"
            if result.get("git", {}).get("dirty")
            else ""
        )
        + ".",
        "",
    ]
    if any(n.startswith("1.") for n in figs):
        out += ["### #1 etcd op latency (ms): etha vs the raw gRPC stubs, same server", ""]
        rows = []
        for size in ("100B", "64KiB"):
            for op, raw in (
                ("set", "put"),
                ("get", "range"),
                ("set_bytes", "put"),
                ("get_bytes", "range"),
            ):
                e = figs.get(f"1.etcd.etha.{op}.{size}")
                r = figs.get(f"1.etcd.raw-grpc.{raw}.{size}")
                p = figs.get(f"1.etcd.pyetcd.{'put' if raw == 'put' else 'get'}.{size}")
                rr = (e or {}).get("ratio_rounds") or {}
                rows.append(
                    [
                        f"`{op}` {size}",
                        _r(r, "p50"),
                        _r(p, "p50"),
                        _r(e, "p50"),
                        _ratio(e, "ratio_p50")
                        + (f" ({rr['min']:.2f}-{rr['max']:.2f})" if rr else ""),
                        _r(r, "p99"),
                        _r(e, "p99"),
                        _ratio(e, "ratio_p99"),
                        _met(e),
                    ]
                )
        out += [
            _table(
                [
                    "op",
                    "raw gRPC p50",
                    "pyetcd p50",
                    "etha p50",
                    "etha/raw p50 (per-round min-max)",
                    "raw p99",
                    "etha p99",
                    "etha/raw p99",
                    "≤ 1.10x",
                ],
                rows,
            ),
            "",
        ]
        first = next((f for k, f in figs.items() if k.startswith("1.etcd.etha")), {})
        out += [f"{first.get('runs', '?')} samples per cell, interleaved in rounds.", ""]
    if any(n.startswith("2.") for n in figs):
        out += ["### #2 TCPStore `set`+`get` (ms): etha vs raw `TCPStore`, same server", ""]
        rows = []
        for size in ("100B", "64KiB"):
            r = figs.get(f"2.tcpstore.raw.set+get.{size}")
            e = figs.get(f"2.tcpstore.etha.set+get.{size}")
            b = figs.get(f"2.tcpstore.etha.set_bytes+get_bytes.{size}")
            rows.append(
                [
                    size,
                    _r(r, "p50"),
                    _r(e, "p50"),
                    _ratio(e, "ratio_p50"),
                    _r(r, "p99"),
                    _r(e, "p99"),
                    _r(b, "p50"),
                    _ratio(b, "ratio_p50"),
                    _met(e),
                ]
            )
        out += [
            _table(
                [
                    "size",
                    "raw p50",
                    "etha p50",
                    "etha/raw",
                    "raw p99",
                    "etha p99",
                    "etha set_bytes+get_bytes p50",
                    "its ratio",
                    "≤ 1.20x",
                ],
                rows,
            ),
            "",
        ]
    if any(n.startswith("3.") for n in figs):
        out += ["### #3 wake-up latency across processes (ms)", ""]
        rows = []
        for name, f in figs.items():
            if name.startswith("3.raw-etcd-put."):
                kind, mode = "raw-etcd Put alone", name.split(".", 2)[2]
            elif name.startswith("3.wake."):
                _, _, kind, mode = name.split(".", 3)
            else:
                continue
            rows.append(
                [
                    kind,
                    f"`{mode}`",
                    str(f["runs"]),
                    _r(f, "p50"),
                    _r(f, "p99"),
                    _r(f, "min"),
                    _r(f, "max"),
                    _r(f.get("set_call_ms"), "p50"),
                    _ratio(f),
                    _met(f),
                ]
            )
        out += [
            _table(
                [
                    "kind",
                    "wait",
                    "runs",
                    "p50",
                    "p99",
                    "min",
                    "max",
                    "setter's set() p50",
                    "vs raw TCPStore p50",
                    "etcd p50 ≤ 1.5 ms",
                ],
                rows,
            ),
            "",
        ]
    if any(n.startswith("4.") for n in figs):
        out += ["### #4 barrier of N processes (ms, median (min-max) of rounds)", ""]
        rows = []
        for n in _ns(figs, "4.barrier"):
            for kind in ("raw-tcpstore", "etha-tcpstore", "etha-etcd", "raw-etcd"):
                f = figs.get(f"4.barrier.{kind}.N{n}")
                c = figs.get(f"4.barrier.{kind}.N{n}.connect")
                if not f:
                    continue
                pr = f.get("per_rank") or {}
                rows.append(
                    [
                        str(n),
                        kind,
                        _spread(f),
                        _ratio(f),
                        _met(f),
                        _r(f.get("skew_ms")),
                        _r(c),
                        _r(c, "max"),
                        ", ".join(f"{k} {v:g}" for k, v in pr.items()) or "-",
                    ]
                )
        out += [
            _table(
                [
                    "N",
                    "kind",
                    "barrier",
                    "vs raw TCPStore",
                    "target",
                    "start skew",
                    "connect median",
                    "connect max",
                    "etcd requests/events per rank",
                ],
                rows,
            ),
            "",
        ]
    if any(n.startswith("5.") for n in figs):
        out += [
            "### #5 barrier scaling (ms; ranks are threads in processes, see layout)",
            "",
        ]
        rows = []
        for n in _ns(figs, "5.scaling"):
            for kind in (
                "raw-tcpstore",
                "etha-tcpstore",
                "etha-etcd",
                "raw-etcd",
                "etha-etcd-view",
            ):
                f = figs.get(f"5.scaling.{kind}.N{n}")
                c = figs.get(f"5.scaling.{kind}.N{n}.connect")
                if not f:
                    continue
                pr = f.get("per_rank") or {}
                rows.append(
                    [
                        str(n),
                        kind,
                        f.get("layout", ""),
                        _spread(f),
                        _ratio(f),
                        _met(f),
                        _r(c, "max"),
                        ", ".join(f"{k} {v:g}" for k, v in pr.items()) or "-",
                    ]
                )
        out += [
            _table(
                [
                    "N",
                    "kind",
                    "layout",
                    "barrier",
                    "vs raw TCPStore",
                    "1024 ≤ 5 s",
                    "connect max",
                    "etcd requests/events per rank",
                ],
                rows,
            ),
            "",
        ]
    if any(n.startswith("6.") for n in figs):
        out += ["### #6 log-in storm, password auth (ms)", ""]
        rows = []
        for name, f in figs.items():
            if name.startswith("6."):
                pc = f.get("per_client_ms") or {}
                rows.append(
                    [
                        name[len("6.login.") :],
                        str(f.get("k", 1)),
                        str(f.get("logins", 1)),
                        _spread(f),
                        fmt(f.get("logins_per_s")),
                        fmt(pc.get("p50")),
                        fmt(pc.get("p99")),
                        str(f.get("failed_logins") or 0)
                        + (f" ({f['failed_example'][:60]})" if f.get("failed_example") else ""),
                    ]
                )
        out += [
            _table(
                [
                    "variant",
                    "K",
                    "log-ins",
                    "all done",
                    "log-ins/s",
                    "per client p50",
                    "per client p99",
                    "failed",
                ],
                rows,
            ),
            "",
        ]
    op_figs = [(k, f) for k, f in figs.items() if k[:2] in ("7.", "8.", "9.")]
    if op_figs:
        out += ["### #7-#9 operator", ""]
        rows = [
            [
                k,
                str(f["runs"]),
                _spread(f),
                f.get("unit", ""),
                (f.get("target") and f"{f['target'].get('stat')} ≤ {f['target'].get('max')}") or "",
                _met(f),
                _details(f),
            ]
            for k, f in op_figs
        ]
        out += [
            _table(
                ["figure", "runs", "median (min-max)", "unit", "target", "met", "details"], rows
            ),
            "",
        ]
    other = [(k, f) for k, f in figs.items() if not k[:1].isdigit()]
    if other:
        out += ["### Other", ""]
        rows = [[k, str(f.get("runs")), _spread(f), f.get("unit", ""), _ratio(f)] for k, f in other]
        out += [_table(["figure", "runs", "median (min-max)", "unit", "ratio"], rows), ""]
    if result.get("errors"):
        out += ["### Errors in this run", ""]
        out += [f"- `{k}`: {v.splitlines()[0]}" for k, v in result["errors"].items()] + [""]
    return "\n".join(out)


def summary(result: dict[str, Any]) -> str:
    """One row per figure that has a target: the result and whether it is met."""
    rows = []
    for name, f in result["figures"].items():
        target = f.get("target")
        if not target:
            continue
        stats = target.get("stats") or [target.get("stat", "median")]
        if "max_ratio" in target:
            want = f"{'/'.join(stats)} ≤ {target['max_ratio']}x {f.get('baseline', '')}"
            got = ", ".join(
                f"{st} {f[f'ratio_{st}']:.2f}x" for st in stats if f.get(f"ratio_{st}") is not None
            )
        else:
            want = f"{'/'.join(stats)} ≤ {target['max']:g} {f.get('unit', '')}"
            got = ", ".join(f"{st} {fmt(f.get(st))} {f.get('unit', '')}" for st in stats)
        if f.get("incomplete"):
            got += f" ({f['incomplete']})"
        if f.get("error"):
            got = f"failed: {f['error'][:80]}"
        rows.append([f"`{name}`", want, got or "-", _met(f) or "-"])
    return _table(["figure", "target", "result", "met"], rows)


def _replace(doc: str, begin: str, end: str, text: str) -> str:
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def plots(result: dict[str, Any], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, Fig] = result["figures"]
    img.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    styles = {
        "raw-tcpstore": "o-",
        "etha-tcpstore": "s--",
        "etha-etcd": "D-",
        "raw-etcd": "^:",
        "etha-etcd-view": "v-.",
    }

    def curve(ax: Any, prefix: str, scale: float = 1.0) -> None:
        for kind, style in styles.items():
            pts = [
                (n, figs[f"{prefix}.{kind}.N{n}"])
                for n in _ns(figs, prefix)
                if f"{prefix}.{kind}.N{n}" in figs
            ]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            ys = [f["median"] * scale for _, f in pts]
            lo = [(f["median"] - f["min"]) * scale for _, f in pts]
            hi = [(f["max"] - f["median"]) * scale for _, f in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=kind)

    for prefix, title, fname, target in (
        ("4.barrier", "#4 barrier, N processes (median, min-max)", "barrier.png", None),
        ("5.scaling", "#5 barrier scaling, ranks as threads in processes", "scaling.png", 5.0),
    ):
        if not _ns(figs, prefix):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        curve(ax, prefix, 1 / 1000 if prefix == "5.scaling" else 1.0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks N")
        ax.set_ylabel("seconds" if prefix == "5.scaling" else "ms")
        if target:
            ax.axhline(target, color="grey", lw=0.8, ls="--", label="target 5 s at 1024")
        ax.set_xticks(_ns(figs, prefix), [str(n) for n in _ns(figs, prefix)])
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = img / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    login = {k: f for k, f in figs.items() if re.match(r"6\.login\.[^.]+\.K\d+$", k)}
    if login:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        variants = sorted({k.split(".")[2] for k in login})
        for variant in variants:
            pts = sorted((f["k"], f) for k, f in login.items() if k.split(".")[2] == variant)
            ax.errorbar(
                [k for k, _ in pts],
                [f["median"] / 1000 for _, f in pts],
                yerr=[
                    [(f["median"] - f["min"]) / 1000 for _, f in pts],
                    [(f["max"] - f["median"]) / 1000 for _, f in pts],
                ],
                fmt="o-",
                capsize=3,
                label=variant,
            )
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients K logging in at once")
        ax.set_ylabel("seconds until all logged in")
        ax.set_title("#6 log-in storm, password auth (bcrypt in etcd)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = img / "login.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    storms = {k: f for k, f in figs.items() if k.startswith("9.") and f.get("ready_curve")}
    if storms:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, storm in storms.items():
            xs, ys = zip(*storm["ready_curve"], strict=True)
            ax.plot(xs, ys, label=name.split(".", 2)[2])
        ax.axvline(60, color="grey", lw=0.8, ls="--", label="target: all Ready in 60 s")
        ax.legend()
        ax.set_xlabel("seconds after the first create")
        ax.set_ylabel("KVNamespaces Ready")
        ax.set_title("#9 KVNamespaces created at once → Ready")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = img / "operator_storm.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("--json", type=Path, default=LATEST)
    parser.add_argument("--img", type=Path, default=Path("docs/img"))
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    result = json.loads(args.json.read_text())
    for fig in result["figures"].values():
        for key, value in list(fig.items()):
            if value is None and key in ("median", "min", "max"):
                fig[key] = math.nan
    if not args.no_plots:
        for path in plots(result, args.img):
            print(f"wrote {path}")
    text = tables(result)
    doc = args.doc.read_text() if args.doc.exists() else ""
    if BEGIN in doc and END in doc:
        doc = _replace(doc, BEGIN, END, text)
        if SUM_BEGIN in doc and SUM_END in doc:
            doc = _replace(doc, SUM_BEGIN, SUM_END, summary(result))
        args.doc.write_text(doc)
        print(f"updated {args.doc}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
