"""#7-#9: the operator against the Kubernetes API emulator and a real etcd with auth.

The real operator runs as a subprocess (``python -m etha_operator``, standalone kopf),
talking to the kmock-based emulator (tests/support/kube_emulator.py, in this process)
and to etcd as root. Times are taken here: ``perf_counter`` just before the emulator
stores the change, and the first poll that sees the outcome (polls every
``POLL_S``, so a figure is late by at most one poll).

* #7 create -> Ready: one KVNamespace at a time (its Job exists), until
  ``status.phase == Ready``.
* #8 Job end -> keys deleted: a Ready namespace with a few keys; the Job's status gets
  a ``Complete`` condition (as the Job controller would write it); until etcd holds no
  key under the prefix. Then the same for one namespace holding 100k keys, next to a
  plain ``DeleteRange`` of 100k keys on the same etcd (the floor).
* #9 500 KVNamespaces created at once (a fresh operator): until all are Ready; the
  operator's peak RSS is its ``VmHWM`` (``/proc/<pid>/status``) at the end. The full
  run does it in direct mode (etcd users and roles), with bcrypt cost 4, and in gateway
  mode (tenant records; a real ``etha-gateway`` process watches the registry meanwhile).

``python -m bench.bench_operator --storm [-n 500] [--rounds 3]`` runs only #9, gateway
and direct mode interleaved on fresh systems, and prints medians and spread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import EtcdCounters, Figure, etcd_server, figure, log
from tests.operator.helpers import job

GROUP_VERSION = "etha.io/v1alpha1"
PLURAL = "kvnamespaces"
NS = "bench"
POLL_S = 0.005
ROOT = "root"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (``/proc/<pid>/stat``); 0 if gone.

    Under a loaded machine wall-clock figures mostly measure the load; CPU seconds per
    object show what the operator itself costs.
    """
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM of a process in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


class Operator:
    """``python -m etha_operator`` as a subprocess; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(
        self, kubeconfig: Path, cluster: Any, workdir: Path, tag: str, gateway: str | None = None
    ) -> None:
        """:param gateway: run in gateway mode handing workers this endpoint; None: direct
        mode (with the override: the bench etcd is a 3.5 release)."""
        from tests.support.ports import free_port

        self.health_port = free_port()
        self.log_path = workdir / f"operator-{tag}.log"
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(kubeconfig),
            ETHA_OPERATOR_ETCD_ENDPOINTS=",".join(cluster.urls),
            ETHA_OPERATOR_ETCD_USERNAME=ROOT,
            ETHA_OPERATOR_ETCD_PASSWORD=cluster.root_password,
            ETHA_OPERATOR_NAMESPACES="",
            ETHA_OPERATOR_HEALTH_PORT=str(self.health_port),
            ETHA_OPERATOR_AUDIT_INTERVAL="3600",
            ETHA_OPERATOR_LOG_LEVEL="WARNING",
        )
        for key in [k for k in env if k.startswith("ETHA_OPERATOR_GATEWAY_")]:
            env.pop(key)
        if gateway is not None:
            env.update(ETHA_OPERATOR_MODE="gateway", ETHA_OPERATOR_GATEWAY_ENDPOINTS=gateway)
        else:
            env.update(ETHA_OPERATOR_MODE="direct", ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT="true")
        for key in ("ETHA_OPERATOR_WEBHOOK_CERT_FILE", "ETHA_OPERATOR_WEBHOOK_KEY_FILE"):
            env.pop(key, None)
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "etha_operator"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.peak_rss_samples: list[int] = []

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited: {self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not healthy after {timeout}s: {self.log_tail()}")
            time.sleep(0.1)

    def memory(self) -> dict[str, int]:
        return _proc_status(self.proc.pid)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def running_operator(
    kube: Any, cluster: Any, workdir: Path, tag: str, gateway: bool = False
) -> Iterator[Operator]:
    """An operator; with ``gateway``, in gateway mode next to a real gateway process."""
    kubeconfig = kube.write_kubeconfig(workdir / f"kubeconfig-{tag}.yaml")
    with contextlib.ExitStack() as stack:
        endpoint = None
        if gateway:
            from tests.support.gateway import GatewayProcess

            gw = GatewayProcess(
                cluster.endpoints,
                workdir / f"gateway-{tag}",
                username=ROOT,
                password=cluster.root_password,
            )
            stack.callback(gw.stop)
            gw.start()
            endpoint = f"http://{gw.endpoint}"
        op = Operator(kubeconfig, cluster, workdir, tag, gateway=endpoint)
        stack.callback(op.stop)
        op.wait_healthy()
        yield op


def _kvns(name: str) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "KVNamespace",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": name}},
    }


def _phase(kube: Any, name: str) -> tuple[str | None, dict[str, Any]]:
    obj = kube.find(GROUP_VERSION, PLURAL, name, NS)
    status = (obj or {}).get("status") or {}
    return status.get("phase"), status


def _wait_phase(kube: Any, name: str, phases: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        phase, status = _phase(kube, name)
        if phase in phases:
            return status
        if phase == "Failed":
            raise RuntimeError(f"KVNamespace {name} failed: {status.get('message')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"KVNamespace {name} not {phases} after {timeout}s: {status}")
        time.sleep(POLL_S)


def _create_ready(kube: Any, name: str, timeout: float = 60.0) -> tuple[float, dict[str, Any]]:
    kube.create("batch/v1", "jobs", job(name), NS)
    t0 = time.perf_counter()
    kube.create(GROUP_VERSION, PLURAL, _kvns(name), NS)
    status = _wait_phase(kube, name, {"Ready"}, timeout)
    return time.perf_counter() - t0, status


def _count(client: Any, prefix: bytes) -> int:
    from etha.kvstore.etcd_client import prefix_range_end

    return int(client.range(prefix, prefix_range_end(prefix), count_only=True).count)


def _fill(client: Any, prefix: bytes, n: int) -> None:
    """Write ``n`` small keys under ``prefix`` in transactions of 128 puts."""
    from pyetcd import etcdrpc

    for start in range(0, n, 128):
        ops = [
            etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=prefix + b"k%07d" % i, value=b"1"))
            for i in range(start, min(n, start + 128))
        ]
        client.txn(etcdrpc.TxnRequest(success=ops))


def _end_job(kube: Any, name: str) -> float:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    kube.patch(
        "batch/v1",
        "jobs",
        name,
        {
            "status": {
                "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now}],
                "completionTime": now,
                "succeeded": 1,
            }
        },
        NS,
        subresource="status",
    )
    return t0


def _wait_empty(client: Any, prefix: bytes, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while _count(client, prefix):
        if time.monotonic() > deadline:
            raise TimeoutError(f"keys under {prefix!r} still there after {timeout}s")
        time.sleep(POLL_S)
    return time.perf_counter()


def run(quick: bool) -> dict[str, Figure]:
    from etha.kvstore.etcd_client import EtcdClient
    from tests.support.kube_emulator import EmulatorServer

    n_create = 5 if quick else 50
    n_end = 3 if quick else 20
    big_keys = 10_000 if quick else 100_000
    n_storm = 10 if quick else 500
    figures: dict[str, Figure] = {}
    with (
        tempfile.TemporaryDirectory(prefix="etha-bench-operator-") as tmp,
        etcd_server(auth=True) as cluster,
        EmulatorServer() as kube,
    ):
        workdir = Path(tmp)
        root = EtcdClient(
            cluster.endpoints, username=ROOT, password=cluster.root_password, timeout=30.0
        )
        try:
            with running_operator(kube, cluster, workdir, "main") as op:
                # warm-up: the first object pays for imports and connections
                _create_ready(kube, "warmup")
                log(f"#7 create -> Ready x {n_create}")
                ready: list[float] = []
                prefixes: dict[str, str] = {}
                for i in range(n_create):
                    name = f"ready-{i}"
                    seconds, status = _create_ready(kube, name)
                    ready.append(seconds)
                    prefixes[name] = status["keyPrefix"]
                figures["7.operator.create-to-ready"] = figure(
                    ready,
                    target={"stat": "median", "max": 300},
                    note=f"one at a time; poll {POLL_S * 1000:g} ms",
                )

                log(f"#8 job end -> keys deleted x {n_end}")
                ended: list[float] = []
                for name in list(prefixes)[:n_end]:
                    prefix = f"{prefixes[name]}/".encode()
                    _fill(root, prefix, 10)
                    assert _count(root, prefix) == 10
                    t0 = _end_job(kube, name)
                    ended.append(_wait_empty(root, prefix, 60.0) - t0)
                figures["8.operator.job-end-to-keys-deleted"] = figure(
                    ended,
                    target={"stat": "median", "max": 500},
                    note="10 keys; Job status patched to Complete -> no key left in etcd",
                )

                log(f"#8 clean-up of {big_keys} keys")
                name = "bigjob"
                _, status = _create_ready(kube, name)
                prefix = f"{status['keyPrefix']}/".encode()
                t_fill = time.perf_counter()
                _fill(root, prefix, big_keys)
                fill_s = time.perf_counter() - t_fill
                assert _count(root, prefix) == big_keys
                t0 = _end_job(kube, name)
                big = _wait_empty(root, prefix, 120.0) - t0
                final = _wait_phase(kube, name, {"Cleaned", "Revoked"}, 30.0)
                figures[f"8.operator.cleanup-{big_keys // 1000}k-keys"] = figure(
                    [big],
                    target={"stat": "median", "max": 2000},
                    keys_deleted_status=final.get("keysDeleted"),
                    fill_s=round(fill_s, 2),
                    note="Job end -> all keys under the prefix gone (one DeleteRange)",
                )
                scratch = b"bench-scratch/"
                _fill(root, scratch, big_keys)
                t0 = time.perf_counter()
                root.delete_range(scratch, b"bench-scratch0")
                figures[f"8.etcd.delete-range-{big_keys // 1000}k-keys"] = figure(
                    [time.perf_counter() - t0],
                    note="the floor: one DeleteRange of as many keys, same etcd",
                )
                figures["7.operator.rss-after-7-8"] = figure(
                    [op.memory().get("VmHWM", 0) / 1024], unit="MiB", scale=1.0
                )
                if quick:  # same operator: no second start-up; its RSS is not the storm's alone
                    figures.update(_storm(kube, cluster, workdir, n_storm, "", quick, op))
        finally:
            root.close()
        if not quick:
            # Each storm on a fresh etcd, emulator and operator: 500 objects into an empty
            # system, and the operator's peak RSS is the storm's alone. Then the same with
            # etcd hashing passwords at bcrypt cost 4, and in gateway mode.
            storms: tuple[tuple[str, list[str], bool], ...] = (
                ("", [], False),
                ("@bcrypt4", ["--bcrypt-cost=4"], False),
                ("@gateway", [], True),
            )
            for tag, extra, gateway in storms:
                figures.update(_fresh_storm(workdir, n_storm, tag, extra, gateway, quick))
    return figures


def _fresh_storm(
    workdir: Path, n_storm: int, tag: str, extra: list[str], gateway: bool, quick: bool
) -> dict[str, Figure]:
    from tests.support.kube_emulator import EmulatorServer

    with (
        etcd_server(auth=True, extra_args=extra) as cluster,
        EmulatorServer() as kube,
        running_operator(kube, cluster, workdir, f"storm{tag}", gateway=gateway) as op,
    ):
        return _storm(kube, cluster, workdir, n_storm, tag, quick, op)


def storm_compare(n_storm: int, rounds: int) -> dict[str, Any]:
    """#9 only: gateway and direct mode interleaved, ``rounds`` times each, fresh systems."""
    import statistics

    seconds: dict[str, list[float]] = {"direct": [], "gateway": []}
    cpu_ms: dict[str, list[float]] = {"direct": [], "gateway": []}
    ready: dict[str, list[int]] = {"direct": [], "gateway": []}
    incomplete: list[str] = []
    with tempfile.TemporaryDirectory(prefix="etha-bench-storm-") as tmp:
        for i in range(rounds):
            for mode in ("gateway", "direct"):
                tag = f"@{mode}{i}"
                result = _fresh_storm(Path(tmp), n_storm, tag, [], mode == "gateway", False)
                fig = result[f"9.operator.{n_storm}-at-once-all-ready{tag}"]
                if fig.get("incomplete"):
                    incomplete.append(f"{tag}: {fig['incomplete']}")
                seconds[mode].append(float(fig["median"]))  # one sample: unit s
                cpu_ms[mode].append(float(fig["operator_cpu_ms_per_object"]))
                ready[mode].append(int(fig["ready"]))
    summary: dict[str, Any] = {"n": n_storm, "rounds": rounds, "incomplete": incomplete}
    for mode, values in seconds.items():
        summary[mode] = {
            "median_s": round(statistics.median(values), 2),
            "min_s": round(min(values), 2),
            "max_s": round(max(values), 2),
            "samples_s": [round(v, 2) for v in values],
            "ready": ready[mode],
            "operator_cpu_ms_per_object_median": round(statistics.median(cpu_ms[mode]), 2),
            "operator_cpu_ms_per_object": cpu_ms[mode],
        }
    summary["gateway_over_direct"] = round(
        summary["gateway"]["median_s"] / summary["direct"]["median_s"], 2
    )
    return summary


def _storm(
    kube: Any, cluster: Any, workdir: Path, n_storm: int, tag: str, quick: bool, op: Operator
) -> dict[str, Figure]:
    """#9: ``n_storm`` KVNamespaces created at once for ``op``; until all Ready; its RSS."""
    figures: dict[str, Figure] = {}
    log(f"#9 {n_storm} KVNamespaces at once{tag}")
    stem = f"storm{tag.replace('@', '-')}-"
    rss_start = op.memory().get("VmRSS", 0) / 1024
    counters = EtcdCounters(cluster.urls[0])
    cpu_before = _cpu_seconds(op.proc.pid), time.process_time()
    names = [f"{stem}{i}" for i in range(n_storm)]
    for name in names:
        kube.create("batch/v1", "jobs", job(name), NS)
    t0 = time.perf_counter()
    for name in names:
        kube.create(GROUP_VERSION, PLURAL, _kvns(name), NS)
    created_s = time.perf_counter() - t0
    deadline = time.monotonic() + (60 if quick else 90)
    curve: list[tuple[float, int]] = []
    rss_curve: list[tuple[float, float]] = []
    while True:
        items = kube.list(GROUP_VERSION, PLURAL, NS)
        n_ready = sum(
            1
            for o in items
            if o["metadata"]["name"].startswith(stem)
            and (o.get("status") or {}).get("phase") == "Ready"
        )
        now = round(time.perf_counter() - t0, 3)
        curve.append((now, n_ready))
        rss_curve.append((now, round(op.memory().get("VmRSS", 0) / 1024, 1)))
        if n_ready >= n_storm or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    all_ready = time.perf_counter() - t0
    operator_cpu = _cpu_seconds(op.proc.pid) - cpu_before[0]
    emulator_cpu = time.process_time() - cpu_before[1]
    load = os.getloadavg()[0]
    mem = op.memory()
    delta = counters.delta()
    per_object = {k: round(v / n_storm, 1) for k, v in sorted(delta.items()) if v}
    log(
        f"#9{tag}: {n_ready}/{n_storm} Ready after {all_ready:.1f} s (load {load:.1f});"
        f" operator CPU {operator_cpu * 1000 / max(n_ready, 1):.1f} ms per Ready object;"
        f" etcd requests per object {per_object}"
    )
    step = max(1, len(curve) // 100)
    figures[f"9.operator.{n_storm}-at-once-all-ready{tag}"] = figure(
        [all_ready],
        unit="s",
        scale=1.0,
        target={"stat": "median", "max": 60},
        ready=n_ready,
        created_in_s=round(created_s, 2),
        ready_curve=curve[::step] + curve[-1:],
        etcd_requests_per_object=per_object,
        rss_curve_mib=rss_curve[::step] + rss_curve[-1:],
        operator_cpu_ms_per_object=round(operator_cpu * 1000 / max(n_ready, 1), 2),
        emulator_cpu_ms_per_object=round(emulator_cpu * 1000 / max(n_ready, 1), 2),
        load_average_1m=round(load, 1),
        note="all created in a loop, then until every one is Ready",
    )
    figures[f"9.operator.peak-rss{tag}"] = figure(
        [mem.get("VmHWM", 0) / 1024],
        unit="MiB",
        scale=1.0,
        target={"stat": "median", "max": 250},
        rss_at_start_mib=round(rss_start, 1),
        rss_at_end_mib=round(mem.get("VmRSS", 0) / 1024, 1),
        note=("VmHWM of the operator process (full run: a fresh one that handled only this storm)"),
    )
    if n_ready < n_storm:
        # a figure, not an exception: #7 and #8 of this run stay; the curve shows the rate
        error = f"only {n_ready} of {n_storm} Ready after {all_ready:.0f} s (the deadline)"
        figures[f"9.operator.{n_storm}-at-once-all-ready{tag}"]["incomplete"] = error
        log(f"#9{tag}: {error}; operator log tail: {op.log_tail(3)}")
    return figures


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="operator benchmarks (#9 storm only)")
    parser.add_argument("--storm", action="store_true", required=True)
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(storm_compare(args.n, args.rounds), indent=2))
