"""Shared helpers of the operator tests (what a user or a controller would do)."""

from __future__ import annotations

import base64
import datetime
import os
import secrets
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from etha.kvstore import KVStore, from_env
from etha.kvstore.etcd_client import EtcdClient, prefix_range_end
from tests.support.etcd_server import EtcdCluster
from tests.support.job_kinds import KINDS, make_job
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import wait_for

API = "etha.io/v1alpha1"
PLURAL = "kvnamespaces"


def secret_env(kube: EmulatorServer, namespace: str, name: str) -> dict[str, str]:
    secret = kube.get("v1", "secrets", name, namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


@contextmanager
def store_from_secret(
    kube: EmulatorServer, namespace: str, secret: str, **override: str
) -> Iterator[KVStore]:
    """What a worker pod gets: ``from_env()`` over the Secret's variables.

    Closed with ``cleanup=False`` so that the keys stay for the operator to clean.
    """
    env = secret_env(kube, namespace, secret)
    env.update(override)
    store = from_env(env)
    try:
        yield store
    finally:
        store.close(cleanup=False)


def root_client(etcd: EtcdCluster) -> EtcdClient:
    return EtcdClient(etcd.urls, username="root", password=etcd.root_password, timeout=5)


def count_keys(etcd: EtcdCluster, prefix: str) -> int:
    with root_client(etcd) as client:
        key = f"{prefix}/".encode()
        return int(client.range(key, prefix_range_end(key), count_only=True).count)


def etcd_users(etcd: EtcdCluster) -> list[str]:
    return etcd.users()


def etcd_roles(etcd: EtcdCluster) -> list[str]:
    return etcd.roles()


def finish_job(kube: EmulatorServer, namespace: str, name: str, condition: str = "Complete") -> Any:
    """Patch the Job's status the way the Job controller does when it ends."""
    return kube.patch(
        "batch/v1",
        "jobs",
        name,
        {
            "status": {
                "conditions": [
                    {
                        "type": condition,
                        "status": "True",
                        "reason": "Completed"
                        if condition == "Complete"
                        else "BackoffLimitExceeded",
                        "lastTransitionTime": datetime.datetime.now(datetime.timezone.utc).strftime(
                            "%Y-%m-%dT%H:%M:%SZ"
                        ),
                    }
                ],
                "succeeded": 1 if condition == "Complete" else 0,
            }
        },
        namespace,
        subresource="status",
    )


def event_reasons(kube: EmulatorServer, namespace: str, name: str) -> list[str]:
    return [e.get("reason", "") for e in kube.events_for(name, namespace)]


def kvnamespace(name: str, job: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "KVNamespace",
        "metadata": {"name": name},
        "spec": {"jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": job}, **spec},
    }


def job(name: str) -> dict[str, Any]:
    """A batch/v1 Job whose pods carry the label that asks for KVNamespace ``name``."""
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [{"name": "worker", "image": "python:3.11-slim"}],
    }
    template = {"metadata": {"labels": {"etha.io/kvnamespace": name}}, "spec": pod_spec}
    return {**make_job(KINDS["Job"], name), "spec": {"template": template}}


def create_ready(
    kube: EmulatorServer, namespace: str, name: str, job_name: str | None = None, **spec: Any
) -> dict[str, Any]:
    """What a user does: create KVNamespace ``name`` for the Job ``job_name`` (without one,
    a Job named ``name`` is created for it first); its status once Ready."""
    if job_name is None:
        job_name = name
        kube.create("batch/v1", "jobs", job(name), namespace)
    kube.create(API, PLURAL, kvnamespace(name, job_name, **spec), namespace)
    status: dict[str, Any] = wait_phase(kube, namespace, name, "Ready")["status"]
    return status


def write_keys(kube: EmulatorServer, namespace: str, secret: str, count: int) -> None:
    """A worker with the Secret ``secret`` writes ``count`` keys."""
    with store_from_secret(kube, namespace, secret) as store:
        for i in range(count):
            store.set(f"rank:{i}/ready", "1")


def wait_gone_from_etcd(etcd: EtcdCluster, user: str, role: str, what: str) -> None:
    """Wait (60 s at most) until etcd has neither ``user`` nor ``role``."""
    wait_for(
        lambda: user not in etcd.users() and role not in etcd.roles(),
        timeout=60,
        interval=0.5,
        what=what,
    )


def restart_etcd(etcd: EtcdCluster) -> None:
    """Start the stopped members again; wait (60 s at most) until etcd answers again."""
    for node in etcd.nodes:
        node.start()
    # EtcdCluster.wait_healthy checks without credentials, which fails once auth is on.
    wait_for(
        lambda: etcd.etcdctl("endpoint", "health", check=False).returncode == 0,
        timeout=60,
        interval=0.2,
        what="etcd to come back",
    )


def chart_grants(values: dict[str, Any] | None = None) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> the verbs the chart's ClusterRoles grant, with ``values``."""
    from tests.test_chart import manifests  # renders with helm: only where it is needed

    return role_grants(d for d in manifests(values) if d["kind"] == "ClusterRole")


def role_grants(roles: Iterable[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> the verbs these Roles or ClusterRoles grant together."""
    granted: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def ungranted(
    used: dict[tuple[str | None, str, str], set[str]], granted: dict[tuple[str, str], set[str]]
) -> dict[str, list[str]]:
    """The verbs used (an ApiRecorder's ``verbs()``) that ``granted`` lacks, by resource."""
    return {
        f"{group or 'core'}/{resource}": sorted(verbs - granted.get((group, resource), set()))
        for (_, group, resource), verbs in used.items()
        if verbs - granted.get((group, resource), set())
    }


def wait_phase(
    kube: EmulatorServer, namespace: str, name: str, phase: str, timeout: float = 60.0
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = kube.find(API, PLURAL, name, namespace)
        if obj is not None and (obj.get("status") or {}).get("phase") == phase:
            return obj
        return None

    try:
        return wait_for(probe, timeout=timeout, what=f"KVNamespace {namespace}/{name} {phase}")
    except TimeoutError:
        obj = kube.find(API, PLURAL, name, namespace)
        raise TimeoutError(f"{namespace}/{name} never became {phase}; last: {obj!r}") from None


BOOTSTRAP_SCRIPT = Path(__file__).resolve().parents[2] / (
    "charts/etha-operator/files/bootstrap_etcd_auth.py"
)


def gateway_etcd_user(etcd: EtcdCluster, name: str = "etha-gateway") -> tuple[str, str]:
    """The gateway's least-privilege etcd user, made by the chart's own bootstrap script
    (read-write on the tenant keyspace, read-only on the registry); (user, password)."""
    password = secrets.token_urlsafe(24)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "GATEWAY_"))},
        "ETCD_ENDPOINT": etcd.endpoints[0],
        "ETCD_ROOT_PASSWORD": etcd.root_password,
        "ETCD_ENABLE_AUTH": "false",
        "GATEWAY_ETCD_USER": name,
        "GATEWAY_ETCD_PASSWORD": password,
        "BOOTSTRAP_TIMEOUT": "20",
    }
    result = subprocess.run(
        [sys.executable, str(BOOTSTRAP_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return name, password
