"""What the end-to-end suite applies and runs, as plain data (no cluster needed to build it).

The suite (tests/e2e/test_cluster.py) and its dry run (tests/e2e/test_dry_run.py) both
use these builders, so the dry run checks exactly the manifests and commands a real run
uses: the helm install line, a KVNamespace, a Job of ``WORLD`` workers that rendezvous and
exchange data through ``etha.kvstore``, a probe pod for ``kubectl exec ... etha doctor``,
and a pod that replays revoked credentials.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "etha-operator"
WORLD = 4
#: Keys each worker writes (ready, data, done): what the job-end clean-up deletes.
KEYS_PER_WORKER = 3
POD_LABEL = "etha.io/kvnamespace"

# Runs in each worker pod (the operator image has etha); the webhook injected ETHA_KV_*.
WORKER_SCRIPT = textwrap.dedent(
    """
    import os
    import etha.kvstore

    rank = int(os.environ["JOB_COMPLETION_INDEX"])
    world = int(os.environ["WORLD_SIZE"])
    store = etha.kvstore.from_env()
    try:
        store.set(f"rank:{rank}/ready", "1")
        store.wait_for_keys("rank:*/ready", expected_count=world, timeout=300)
        store.set(f"data/{rank}", f"payload-from-{rank}")
        for peer in range(world):
            got = store.wait_for_key(f"data/{peer}", timeout=300).decode()
            assert got == f"payload-from-{peer}", (peer, got)
        store.set(f"done:{rank}", "1")
        store.wait_for_keys("done:*", expected_count=world, timeout=300)
        print(f"rank {rank}: exchanged data with {world} ranks", flush=True)
    finally:
        store.close(cleanup=False)  # the operator deletes the keys when the Job ends
    """
).strip()


@dataclass(frozen=True)
class Image:
    """An image reference split the way the chart's ``image`` values want it."""

    reference: str

    @property
    def values(self) -> dict[str, str]:
        ref = self.reference
        if "@" in ref:
            repository, digest = ref.split("@", 1)
            return {"repository": repository, "digest": digest, "tag": ""}
        name, _, tag = ref.rpartition(":")
        if not name or "/" in tag:  # no tag, or the colon belonged to a registry port
            return {"repository": ref, "tag": "latest", "digest": ""}
        return {"repository": name, "tag": tag, "digest": ""}


@dataclass(frozen=True)
class Plan:
    """Names of one run; every object the run creates is named from ``run_id``."""

    image: Image
    run_id: str

    @property
    def release(self) -> str:
        return f"etha-e2e-{self.run_id}"

    @property
    def system_namespace(self) -> str:
        return f"etha-e2e-{self.run_id}"

    @property
    def tenant_namespace(self) -> str:
        return f"etha-e2e-team-{self.run_id}"

    @property
    def name(self) -> str:
        return "train"

    @property
    def secret(self) -> str:
        return f"{self.name}-etha-kv"

    # -- helm --------------------------------------------------------------------------------

    def helm_values(self) -> dict[str, Any]:
        # IfNotPresent: `kind load docker-image` puts the image on the nodes; nothing pulls it.
        return {"image": {**self.image.values, "pullPolicy": "IfNotPresent"}}

    def helm_set_flags(self) -> list[str]:
        flags = []
        for key, value in self.helm_values()["image"].items():
            flags += ["--set-string", f"image.{key}={value}"]
        return flags

    def _helm_release(self, verb: str) -> list[str]:
        """``helm <verb>`` of this release of the chart, in the system namespace."""
        return [verb, self.release, str(CHART), "--namespace", self.system_namespace]

    def helm_install(self) -> list[str]:
        return [
            *self._helm_release("install"),
            "--create-namespace",
            *self.helm_set_flags(),
            "--wait",
            "--timeout",
            "10m",
        ]

    def helm_template(self) -> list[str]:
        """The install line as `helm template` (what the dry run renders)."""
        return [*self._helm_release("template"), *self.helm_set_flags()]

    def helm_uninstall(self) -> list[str]:
        return ["uninstall", self.release, "--namespace", self.system_namespace, "--wait"]

    # -- manifests ---------------------------------------------------------------------------

    def tenant_namespace_manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": self.tenant_namespace},
        }

    def kvnamespace(self) -> dict[str, Any]:
        return {
            "apiVersion": "etha.io/v1alpha1",
            "kind": "KVNamespace",
            "metadata": {"name": self.name, "namespace": self.tenant_namespace},
            "spec": {
                "jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": self.name},
                "onJobEnd": "Delete",
            },
        }

    def _container(self, name: str, command: list[str]) -> dict[str, Any]:
        return {
            "name": name,
            "image": self.image.reference,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }

    def worker_job(self) -> dict[str, Any]:
        container = self._container("worker", ["python", "-c", WORKER_SCRIPT])
        container["env"] = [{"name": "WORLD_SIZE", "value": str(WORLD)}]
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": self.name, "namespace": self.tenant_namespace},
            "spec": {
                "completionMode": "Indexed",
                "completions": WORLD,
                "parallelism": WORLD,
                "backoffLimit": 0,
                "activeDeadlineSeconds": 600,
                "template": {
                    "metadata": {"labels": {POD_LABEL: self.name}},
                    "spec": {"restartPolicy": "Never", "containers": [container]},
                },
            },
        }

    def probe_pod(self) -> dict[str, Any]:
        """A long-lived pod of the namespace, for `kubectl exec probe -- etha doctor`."""
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "probe",
                "namespace": self.tenant_namespace,
                "labels": {POD_LABEL: self.name},
            },
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [self._container("probe", ["sleep", "3600"])],
            },
        }

    def stale_secret(self, data: dict[str, str]) -> dict[str, Any]:
        """A copy of the KVNamespace's Secret (base64 ``data``), kept past its deletion."""
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "stale-credentials", "namespace": self.tenant_namespace},
            "type": "Opaque",
            "data": data,
        }

    def revoked_doctor_pod(self) -> dict[str, Any]:
        """Not labelled (no injection): runs `etha doctor` on the copied, revoked credentials."""
        container = self._container("doctor", ["etha", "doctor", "--json"])
        container["envFrom"] = [{"secretRef": {"name": "stale-credentials"}}]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "revoked-doctor", "namespace": self.tenant_namespace},
            "spec": {"restartPolicy": "Never", "containers": [container]},
        }

    # -- kubectl commands ----------------------------------------------------------------------

    def _on(self, verb: str, kind: str) -> list[str]:
        """``kubectl <verb> <kind>/<name> -n <tenant namespace>``, without its options."""
        return [verb, f"{kind}/{self.name}", "-n", self.tenant_namespace]

    def wait_phase(self, phase: str, timeout: str = "180s") -> list[str]:
        return [
            *self._on("wait", "kvnamespace"),
            f"--for=jsonpath={{.status.phase}}={phase}",
            f"--timeout={timeout}",
        ]

    def wait_job_complete(self) -> list[str]:
        return [*self._on("wait", "job"), "--for=condition=complete", "--timeout=600s"]

    def worker_logs(self) -> list[str]:
        return [
            "logs",
            "-n",
            self.tenant_namespace,
            "-l",
            f"job-name={self.name}",
            "--tail=-1",
            f"--max-log-requests={WORLD}",
        ]

    def doctor_in_probe(self) -> list[str]:
        return ["exec", "-n", self.tenant_namespace, "probe", "--", "etha", "doctor"]

    def delete_kvnamespace(self) -> list[str]:
        return [*self._on("delete", "kvnamespace"), "--wait=true", "--timeout=180s"]
