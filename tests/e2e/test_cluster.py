"""The whole flow on a real cluster: install, KVNamespace, a 4-worker Job, clean-up,
deletion and revocation, uninstall. Skipped unless a cluster is configured (conftest.py).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.conftest import Tools
from tests.e2e.plan import KEYS_PER_WORKER, WORLD, Plan

pytestmark = pytest.mark.timeout(1800)


def _wait_pod(tools: Tools, plan: Plan, name: str, phases: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        pod = tools.get_json("pod", name, "-n", plan.tenant_namespace)
        phase = str(pod.get("status", {}).get("phase"))
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in pod.get("status", {}).get("conditions") or []
        )
        if phase in phases or ("Ready" in phases and ready):
            return phase
        if time.monotonic() > deadline:
            raise TimeoutError(f"pod {name} is {phase}, not {phases}, after {timeout}s")
        time.sleep(2)


def test_job_lifecycle_on_a_real_cluster(tools: Tools, installed: Plan) -> None:
    plan = installed
    ns = plan.tenant_namespace

    # A KVNamespace becomes Ready; a labelled pod gets working credentials.
    tools.apply(plan.kvnamespace())
    tools.ok("kubectl", plan.wait_phase("Ready"))
    tools.apply(plan.probe_pod())
    _wait_pod(tools, plan, "probe", {"Ready"}, timeout=300)
    doctor = tools.ok("kubectl", plan.doctor_in_probe())
    assert "verdict: OK" in doctor, doctor
    secret = tools.get_json("secret", plan.secret, "-n", ns)
    tools.apply(plan.stale_secret(secret["data"]))

    # Four workers rendezvous and exchange data, then the Job completes.
    tools.apply(plan.worker_job())
    tools.ok("kubectl", plan.wait_job_complete())
    logs = tools.ok("kubectl", plan.worker_logs())
    for rank in range(WORLD):
        assert f"rank {rank}: exchanged data with {WORLD} ranks" in logs, logs

    # Job end: the operator deletes every key the workers wrote.
    tools.ok("kubectl", plan.wait_phase("Cleaned"))
    status = tools.get_json("kvnamespace", plan.name, "-n", ns)["status"]
    assert status["keysDeleted"] == WORLD * KEYS_PER_WORKER, status

    # Deletion: the finalizer runs, the Secret goes, the credentials stop working.
    tools.ok("kubectl", ["delete", "pod", "probe", "-n", ns, "--wait=true"])
    tools.ok("kubectl", plan.delete_kvnamespace())
    gone = tools.run("kubectl", ["get", "secret", plan.secret, "-n", ns])
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    tools.apply(plan.revoked_doctor_pod())
    _wait_pod(tools, plan, "revoked-doctor", {"Succeeded", "Failed"}, timeout=300)
    report = json.loads(tools.ok("kubectl", ["logs", "revoked-doctor", "-n", ns]))
    assert report["ok"] is False
    assert report["problems"][0] == "credentials", report
