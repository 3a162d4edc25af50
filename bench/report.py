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
from collections.abc import Callable, Iterable, Iterator
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


def _section(title: str, columns: str, rows: Iterable[list[str]]) -> list[str]:
    """A ``###`` heading, its table (``columns``: the header cells joined by `` | ``) and
    a blank line."""
    return [f"### {title}", "", _table(columns.split(" | "), rows), ""]


def _per_rank(fig: Fig) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in (fig.get("per_rank") or {}).items()) or "-"


def _barriers(
    figs: dict[str, Fig], prefix: str, kinds: Iterable[str]
) -> Iterator[tuple[str, str, Fig, Fig | None]]:
    """``(N, kind, figure, its connect figure)`` for each barrier figure under ``prefix``."""
    for n in _ns(figs, prefix):
        for kind in kinds:
            fig = figs.get(f"{prefix}.{kind}.N{n}")
            if fig:
                yield str(n), kind, fig, figs.get(f"{prefix}.{kind}.N{n}.connect")


def _op_rows(figs: dict[str, Fig]) -> Iterator[list[str]]:
    ops = (("set", "put"), ("get", "range"), ("set_bytes", "put"), ("get_bytes", "range"))
    for size in ("100B", "64KiB"):
        for op, raw in ops:
            e = figs.get(f"1.etcd.etha.{op}.{size}")
            r = figs.get(f"1.etcd.raw-grpc.{raw}.{size}")
            p = figs.get(f"1.etcd.pyetcd.{'put' if raw == 'put' else 'get'}.{size}")
            rr = (e or {}).get("ratio_rounds") or {}
            spread = f" ({rr['min']:.2f}-{rr['max']:.2f})" if rr else ""
            p50 = [_r(r, "p50"), _r(p, "p50"), _r(e, "p50"), _ratio(e, "ratio_p50") + spread]
            p99 = [_r(r, "p99"), _r(e, "p99"), _ratio(e, "ratio_p99")]
            yield [f"`{op}` {size}", *p50, *p99, _met(e)]


def _tcpstore_rows(figs: dict[str, Fig]) -> Iterator[list[str]]:
    for size in ("100B", "64KiB"):
        r = figs.get(f"2.tcpstore.raw.set+get.{size}")
        e = figs.get(f"2.tcpstore.etha.set+get.{size}")
        b = figs.get(f"2.tcpstore.etha.set_bytes+get_bytes.{size}")
        etha = [_r(e, "p50"), _ratio(e, "ratio_p50"), _r(r, "p99"), _r(e, "p99")]
        yield [size, _r(r, "p50"), *etha, _r(b, "p50"), _ratio(b, "ratio_p50"), _met(e)]


def _wake_rows(figs: dict[str, Fig]) -> Iterator[list[str]]:
    for name, f in figs.items():
        if name.startswith("3.raw-etcd-put."):
            kind, mode = "raw-etcd Put alone", name.split(".", 2)[2]
        elif name.startswith("3.wake."):
            _, _, kind, mode = name.split(".", 3)
        else:
            continue
        stats = [_r(f, stat) for stat in ("p50", "p99", "min", "max")]
        setter = _r(f.get("set_call_ms"), "p50")
        yield [kind, f"`{mode}`", str(f["runs"]), *stats, setter, _ratio(f), _met(f)]


def _barrier_rows(figs: dict[str, Fig]) -> Iterator[list[str]]:
    kinds = ("raw-tcpstore", "etha-tcpstore", "etha-etcd", "raw-etcd")
    for n, kind, f, c in _barriers(figs, "4.barrier", kinds):
        connect = [_r(c), _r(c, "max")]
        yield [
            n,
            kind,
            _spread(f),
            _ratio(f),
            _met(f),
            _r(f.get("skew_ms")),
            *connect,
            _per_rank(f),
        ]


def _scaling_rows(figs: dict[str, Fig]) -> Iterator[list[str]]:
    kinds = ("raw-tcpstore", "etha-tcpstore", "etha-etcd", "raw-etcd", "etha-etcd-view")
    for n, kind, f, c in _barriers(figs, "5.scaling", kinds):
        barrier = [_spread(f), _ratio(f), _met(f)]
        yield [n, kind, f.get("layout", ""), *barrier, _r(c, "max"), _per_rank(f)]


def _login_rows(figs: dict[str, Fig]) -> Iterator[list[str]]:
    for name, f in figs.items():
        if not name.startswith("6."):
            continue
        pc = f.get("per_client_ms") or {}
        failed = str(f.get("failed_logins") or 0)
        if f.get("failed_example"):
            failed += f" ({f['failed_example'][:60]})"
        count = [str(f.get("k", 1)), str(f.get("logins", 1)), _spread(f)]
        rates = [fmt(f.get("logins_per_s")), fmt(pc.get("p50")), fmt(pc.get("p99"))]
        yield [name[len("6.login.") :], *count, *rates, failed]


#: (figure name prefix, title, columns, rows) of each numbered table.
_SECTIONS: tuple[tuple[str, str, str, Callable[[dict[str, Fig]], Iterable[list[str]]]], ...] = (
    (
        "1.",
        "#1 etcd op latency (ms): etha vs the raw gRPC stubs, same server",
        "op | raw gRPC p50 | pyetcd p50 | etha p50 | etha/raw p50 (per-round min-max)"
        " | raw p99 | etha p99 | etha/raw p99 | ≤ 1.10x",
        _op_rows,
    ),
    (
        "2.",
        "#2 TCPStore `set`+`get` (ms): etha vs raw `TCPStore`, same server",
        "size | raw p50 | etha p50 | etha/raw | raw p99 | etha p99"
        " | etha set_bytes+get_bytes p50 | its ratio | ≤ 1.20x",
        _tcpstore_rows,
    ),
    (
        "3.",
        "#3 wake-up latency across processes (ms)",
        "kind | wait | runs | p50 | p99 | min | max | setter's set() p50"
        " | vs raw TCPStore p50 | etcd p50 ≤ 1.5 ms",
        _wake_rows,
    ),
    (
        "4.",
        "#4 barrier of N processes (ms, median (min-max) of rounds)",
        "N | kind | barrier | vs raw TCPStore | target | start skew | connect median"
        " | connect max | etcd requests/events per rank",
        _barrier_rows,
    ),
    (
        "5.",
        "#5 barrier scaling (ms; ranks are threads in processes, see layout)",
        "N | kind | layout | barrier | vs raw TCPStore | 1024 ≤ 5 s | connect max"
        " | etcd requests/events per rank",
        _scaling_rows,
    ),
    (
        "6.",
        "#6 log-in storm, password auth (ms)",
        "variant | K | log-ins | all done | log-ins/s | per client p50 | per client p99 | failed",
        _login_rows,
    ),
)


def tables(result: dict[str, Any]) -> str:
    figs: dict[str, Fig] = result["figures"]
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
    for prefix, title, columns, rows in _SECTIONS:
        if not any(n.startswith(prefix) for n in figs):
            continue
        out += _section(title, columns, rows(figs))
        if prefix == "1.":
            first = next((f for k, f in figs.items() if k.startswith("1.etcd.etha")), {})
            out += [f"{first.get('runs', '?')} samples per cell, interleaved in rounds.", ""]
    op_figs = [(k, f) for k, f in figs.items() if k[:2] in ("7.", "8.", "9.")]
    if op_figs:
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
        out += _section(
            "#7-#9 operator",
            "figure | runs | median (min-max) | unit | target | met | details",
            rows,
        )
    other = [(k, f) for k, f in figs.items() if not k[:1].isdigit()]
    if other:
        rows = [[k, str(f.get("runs")), _spread(f), f.get("unit", ""), _ratio(f)] for k, f in other]
        out += _section("Other", "figure | runs | median (min-max) | unit | ratio", rows)
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
