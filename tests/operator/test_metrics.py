"""The operator's Prometheus endpoint, scraped while the real operator runs a lifecycle.

Each step (create -> Ready, job end -> clean-up, delete -> finalizer, an orphan for the
audit, a deletion while etcd is down) must move the matching counters and histograms by
exactly what happened, and the exposition must carry no secret, key name, object name or
uid. The module runs its own etcd (auth on), because the last test stops it.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from etha_operator import model
from prometheus_client.parser import text_string_to_metric_families

from tests.operator.helpers import (
    API,
    PLURAL,
    finish_job,
    job,
    kvnamespace,
    restart_etcd,
    root_client,
    secret_env,
    store_from_secret,
    wait_phase,
)
from tests.support.etcd_server import EtcdCluster
from tests.support.etcd_users import grant_prefix_user
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess, wait_for
from tests.support.ports import free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.own_etcd]

Sample = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Metered:
    operator: OperatorProcess
    port: int

    def text(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def scrape(self) -> Scrape:
        return Scrape(self.text())


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[Sample, float] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        return self.get(name, **labels) - before.get(name, **labels)


DEADLINE = 3


@pytest.fixture(scope="module")
def metered(operator_factory: OperatorFactory) -> Metered:
    port = free_port()
    proc = operator_factory(
        ETHA_OPERATOR_METRICS_PORT=str(port),
        ETHA_OPERATOR_AUDIT_INTERVAL="1",
        ETHA_OPERATOR_CLEANUP_DEADLINE=str(DEADLINE),
        ETHA_OPERATOR_ETCD_TIMEOUT="1",
    ).start()
    return Metered(proc, port)


def wait_metric(
    metered: Metered, what: str, check: Callable[[Scrape], bool], timeout: float = 30.0
) -> Scrape:
    def probe() -> Scrape | None:
        scrape = metered.scrape()
        return scrape if check(scrape) else None

    return wait_for(probe, timeout=timeout, what=what)


def test_every_documented_metric_is_exported(metered: Metered) -> None:
    families = metered.scrape().families
    for name in (
        "etha_operator_reconciles",
        "etha_operator_provision_seconds",
        "etha_operator_job_cleanup_seconds",
        "etha_operator_finalizer_seconds",
        "etha_operator_keys_deleted",
        "etha_operator_finalizer_deadline_exceeded",
        "etha_operator_audit_orphans_removed",
        "etha_operator_audit_runs",
        "etha_operator_etcd_request_seconds",
        "etha_operator_etcd_errors",
        "etha_operator_kvnamespaces",
    ):
        assert name in families, name


def test_lifecycle_moves_the_counters_by_what_happened(
    kube: EmulatorServer, metered: Metered, etcd: EtcdCluster, k8s_ns: str
) -> None:
    name = f"m-{uuid.uuid4().hex[:6]}"
    before = metered.scrape()
    kube.create("batch/v1", "jobs", job(name), k8s_ns)
    created = kube.create(API, PLURAL, kvnamespace(name, name), k8s_ns)
    uid = created["metadata"]["uid"]
    status = wait_phase(kube, k8s_ns, name, "Ready")["status"]
    password = secret_env(kube, k8s_ns, f"{name}-etha-kv")["ETHA_KV_PASSWORD"]
    with store_from_secret(kube, k8s_ns, f"{name}-etha-kv") as store:
        for rank in range(3):
            store.set(f"rank:{rank}/ready", "1")

    ready = wait_metric(
        metered,
        "the Ready gauge",
        lambda s: s.delta(before, "etha_operator_kvnamespaces", phase="Ready") == 1,
    )
    assert ready.delta(before, "etha_operator_provision_seconds_count") >= 1
    assert ready.delta(before, "etha_operator_provision_seconds_sum") > 0
    assert (
        ready.delta(
            before, "etha_operator_reconciles_total", handler="reconcile", outcome="success"
        )
        >= 1
    )
    # One new etcd user, one new role: exactly one UserAdd and one RoleAdd were sent.
    assert (
        ready.delta(before, "etha_operator_etcd_request_seconds_count", method="Auth.UserAdd") == 1
    )
    assert (
        ready.delta(before, "etha_operator_etcd_request_seconds_count", method="Auth.RoleAdd") == 1
    )

    finish_job(kube, k8s_ns, name)
    wait_phase(kube, k8s_ns, name, "Cleaned")
    cleaned = wait_metric(
        metered,
        "the job clean-up histogram",
        lambda s: s.delta(before, "etha_operator_job_cleanup_seconds_count") == 1,
    )
    assert cleaned.delta(before, "etha_operator_keys_deleted_total", reason="job_end") == 3
    assert (
        cleaned.delta(before, "etha_operator_etcd_request_seconds_count", method="KV.DeleteRange")
        >= 1
    )
    assert cleaned.delta(before, "etha_operator_kvnamespaces", phase="Cleaned") == 1
    assert cleaned.delta(before, "etha_operator_kvnamespaces", phase="Ready") == 0

    kube.delete(API, PLURAL, name, k8s_ns)
    wait_for(lambda: kube.find(API, PLURAL, name, k8s_ns) is None, what="the object gone")
    gone = wait_metric(
        metered,
        "the finalizer histogram",
        lambda s: s.delta(before, "etha_operator_finalizer_seconds_count") == 1,
    )
    assert (
        gone.delta(before, "etha_operator_reconciles_total", handler="finalize", outcome="success")
        == 1
    )
    assert gone.delta(before, "etha_operator_finalizer_deadline_exceeded_total") == 0
    assert gone.delta(before, "etha_operator_keys_deleted_total", reason="finalizer") == 0
    gone = wait_metric(
        metered,
        "the Cleaned gauge back",
        lambda s: s.delta(before, "etha_operator_kvnamespaces", phase="Cleaned") == 0,
    )

    # Nothing identifying or secret in the exposition.
    for text in (ready.text, cleaned.text, gone.text):
        for forbidden in (password, name, uid, status["keyPrefix"], "rank:", k8s_ns):
            assert forbidden not in text, forbidden


#: The audit's log line for each orphan it removed (etha_operator.reconciler.audit).
REMOVED = re.compile(
    r"audit: removed orphaned [a-z /]+ (etha-[0-9a-f-]+) \(no KVNamespace with uid [0-9a-f-]+\);"
    r" deleted (\d+) keys under "
)


def test_audit_removal_is_counted_with_its_keys(
    kube: EmulatorServer, metered: Metered, etcd: EtcdCluster
) -> None:
    """The orphan made here is removed once, with its 2 keys, and the counters move by
    exactly what the audit removed: the removals the operator logged, one for one.

    Counted against the log rather than as "one more than before": whatever else the
    audit finds on this etcd (what earlier tests left behind) is removed and counted too,
    and must be counted exactly as well.
    """
    uid = str(uuid.uuid4())
    orphan = model.etcd_name(uid)
    prefix = f"orphan-{uid[:8]}"
    before = metered.scrape()
    with root_client(etcd) as root:
        grant_prefix_user(root, orphan, "pw-" + uid, f"{prefix}/".encode())
        # grant_prefix_user names the role "<user>-role"; the audit removes roles named
        # etha-<uid> (with their keys), so give the orphan one of those too.
        from etha_operator.etcd_admin import EtcdAdmin

        EtcdAdmin(root).ensure_role(orphan, prefix)
        for i in range(2):
            root.put(f"{prefix}/default/k{i}".encode(), b"x")

    def consistent() -> tuple[Scrape, list[tuple[str, int]]] | None:
        # A round logs each removal before it counts them: read the counters first, the
        # log second, and retry while a round is between the two.
        scrape = metered.scrape()
        removed = [(m[1], int(m[2])) for m in REMOVED.finditer(metered.operator.log())]
        if orphan not in (name for name, _ in removed):
            return None
        counted = (
            scrape.get("etha_operator_audit_orphans_removed_total"),
            scrape.get("etha_operator_keys_deleted_total", reason="audit"),
        )
        return (scrape, removed) if counted == (len(removed), sum(n for _, n in removed)) else None

    after, removed = wait_for(
        consistent, timeout=30, what="the orphan's removal, counted as the audit logged it"
    )
    # Ours: removed exactly once, with exactly its keys.
    assert [count for name, count in removed if name == orphan] == [2]
    # The counters: exactly the logged removals and their keys, since the operator started.
    assert after.get("etha_operator_audit_orphans_removed_total") == len(removed)
    assert after.get("etha_operator_keys_deleted_total", reason="audit") == sum(
        count for _, count in removed
    )
    # Whatever else it removed belonged to no KVNamespace that exists.
    live = {model.etcd_name(obj["metadata"]["uid"]) for obj in kube.list(API, PLURAL)}
    assert not live & {name for name, _ in removed}
    assert after.delta(before, "etha_operator_audit_orphans_removed_total") >= 1
    assert after.delta(before, "etha_operator_keys_deleted_total", reason="audit") >= 2
    assert after.delta(before, "etha_operator_audit_runs_total", outcome="success") >= 2
    assert uid not in after.text and prefix not in after.text


def test_a_deletion_while_etcd_is_down_counts_the_deadline_and_the_errors(
    kube: EmulatorServer, metered: Metered, etcd: EtcdCluster, k8s_ns: str
) -> None:
    name = f"m-{uuid.uuid4().hex[:6]}"
    kube.create(API, PLURAL, kvnamespace(name, name), k8s_ns)
    wait_phase(kube, k8s_ns, name, "Ready")
    with store_from_secret(kube, k8s_ns, f"{name}-etha-kv") as store:
        for i in range(4):
            store.set(f"k{i}", "v")
    before = metered.scrape()
    etcd.stop()
    try:
        kube.delete(API, PLURAL, name, k8s_ns)
        down = wait_metric(
            metered,
            "the finalizer to give up",
            lambda s: s.delta(before, "etha_operator_finalizer_deadline_exceeded_total") == 1,
            timeout=DEADLINE + 60,
        )
        assert down.delta(before, "etha_operator_finalizer_seconds_count") == 1
        assert down.delta(before, "etha_operator_finalizer_seconds_sum") >= DEADLINE - 0.5
        assert down.delta(before, "etha_operator_keys_deleted_total", reason="finalizer") == 0
        failed = {
            labels: value - before.samples.get((sample, labels), 0.0)
            for (sample, labels), value in down.samples.items()
            if sample == "etha_operator_etcd_errors_total"
        }
        errors = {dict(labels)["error"] for labels, delta in failed.items() if delta > 0}
        assert errors and errors <= {"UnavailableError", "KVTimeoutError"}, failed

        # A KVNamespace created now cannot be provisioned: the create handler fails over
        # to kopf's retry, and the timer's own attempts count as retries too.
        kube.create(API, PLURAL, kvnamespace(f"{name}-later", f"{name}-later"), k8s_ns)
        wait_metric(
            metered,
            "provisioning retries",
            lambda s: (
                s.delta(
                    before, "etha_operator_reconciles_total", handler="reconcile", outcome="retry"
                )
                >= 1
                and s.delta(
                    before, "etha_operator_reconciles_total", handler="recheck", outcome="retry"
                )
                >= 1
            ),
            timeout=60,
        )
    finally:
        restart_etcd(etcd)
    # The audit removes what the finalizer left, and counts it with the keys.
    after = wait_metric(
        metered,
        "the audit to remove the leftovers",
        lambda s: s.delta(before, "etha_operator_audit_orphans_removed_total") >= 1,
        timeout=60,
    )
    assert after.delta(before, "etha_operator_audit_orphans_removed_total") == 1
    assert after.delta(before, "etha_operator_keys_deleted_total", reason="audit") == 4
    wait_phase(kube, k8s_ns, f"{name}-later", "Ready")  # and the retries got there
