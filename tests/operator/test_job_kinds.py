"""Job kinds beyond batch/v1 Job, end to end: real operator (gateway mode, real gateway,
real etcd), the emulator serving each kind's CRD, and the operator's webhook server.

Per kind: KVNamespace -> Ready -> a pod injected -> a worker writes keys -> the job's
status written the way its own controller writes it -> keys deleted, the count in status.
Plus the job's deletion, Keep and Revoke; a kind whose CRD is installed only later; a
custom kind from ETHA_OPERATOR_JOB_KINDS; and ``etha.io/kvnamespace: auto``.

Its own module: its own emulator (with the CRDs), etcd (``own_etcd``), gateway and operator.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from tests.operator.helpers import (
    API,
    PLURAL,
    chart_grants,
    count_keys,
    event_reasons,
    kvnamespace,
    secret_env,
    store_from_secret,
    ungranted,
    wait_phase,
    write_keys,
)
from tests.reliability.conftest import ApiRecorder
from tests.support.admission import Webhook, worker_pod
from tests.support.etcd_server import EtcdCluster
from tests.support.gateway import GatewayProcess
from tests.support.job_kinds import (
    AUTO,
    KINDS,
    Kind,
    conditions,
    create_job,
    install_job_crds,
    kind_setting,
    set_job_status,
)
from tests.support.kube_emulator import EmulatorServer, job_crd
from tests.support.operator_runner import OperatorFactory, OperatorProcess, wait_for
from tests.support.workers import REPO, procs, tail

pytestmark = [pytest.mark.timeout(300), pytest.mark.own_etcd]


#: A kind given through ETHA_OPERATOR_JOB_KINDS; its CRD is installed only by a test.
CUSTOM_KIND = kind_setting(
    "ml.example.com/v1",
    "TrainingRun",
    "trainingruns",
    *(
        {"field": "status.outcome", "values": [value], "outcome": outcome}
        for value, outcome in (("Done", "Succeeded"), ("Crashed", "Failed"))
    ),
    podLabel="ml.example.com/run",
)


@pytest.fixture(scope="module")
def kube() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        install_job_crds(server)
        yield server


@pytest.fixture(scope="module")
def recorder(kube: EmulatorServer) -> ApiRecorder:
    """Every Kubernetes API request of the module (installed before the operator starts)."""
    return ApiRecorder(kube)


@pytest.fixture(scope="module", autouse=True)
def operator(
    operator_factory: OperatorFactory,
    recorder: ApiRecorder,
    gateway: GatewayProcess,
    webhook: Webhook,
) -> OperatorProcess:
    """Every test of the module needs it running: gateway mode, webhook, the custom kind."""
    return operator_factory(
        gateway=[f"http://{gateway.endpoint}"],
        **webhook.settings(),
        ETHA_OPERATOR_JOB_KINDS=json.dumps([CUSTOM_KIND]),
        ETHA_OPERATOR_DISCOVERY_INTERVAL="1",
        ETHA_OPERATOR_JOB_CHECK_INTERVAL="2",
    ).start()


def kvns_for(kind: Kind, name: str, job: str, **spec: Any) -> dict[str, Any]:
    """A KVNamespace for the job ``job`` of ``kind``."""
    body = kvnamespace(name, job, **spec)
    body["spec"]["jobRef"].update(apiVersion=kind.api_version, kind=kind.kind)
    return body


def injected(webhook: Webhook, pod: dict[str, Any], namespace: str, secret: str) -> dict[str, Any]:
    """The pod as the webhook patches it, once it injects ``secret`` without warnings."""

    def probe() -> dict[str, Any] | None:
        answer = webhook.review(pod, namespace)
        if not answer.get("allowed") or not answer.get("patch") or answer.get("warnings"):
            return None
        patched: dict[str, Any] = jsonpatch.apply_patch(
            pod, json.loads(base64.b64decode(answer["patch"]))
        )
        return patched

    patched: dict[str, Any] = wait_for(probe, timeout=60, what=f"injection of {secret}")
    assert patched["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": secret}}]
    return patched


@pytest.mark.parametrize("label", list(KINDS))
def test_each_kind_is_cleaned_at_its_end(
    kube: EmulatorServer, etcd: EtcdCluster, webhook: Webhook, k8s_ns: str, label: str
) -> None:
    kind = KINDS[label]
    create_job(kube, kind, "train", k8s_ns)
    kube.create(API, PLURAL, kvns_for(kind, "kv", "train"), k8s_ns)
    status = wait_phase(kube, k8s_ns, "kv", "Ready")["status"]
    assert (
        status["jobUID"]
        == kube.get(kind.api_version, kind.plural, "train", k8s_ns)["metadata"]["uid"]
    )
    injected(webhook, worker_pod({"etha.io/kvnamespace": "kv"}), k8s_ns, "kv-etha-kv")
    write_keys(kube, k8s_ns, "kv-etha-kv", 3)
    assert count_keys(etcd, status["keyPrefix"]) == 3

    # Still running: a status without the end rule's values changes nothing.
    set_job_status(kube, kind, "train", k8s_ns, conditions(("Running", "True", "Running")))
    set_job_status(kube, kind, "train", k8s_ns, kind.succeeded())
    done = wait_phase(kube, k8s_ns, "kv", "Cleaned")["status"]
    assert done["keysDeleted"] == 3
    assert done["jobEndReason"] in ("Complete", "Completed", "Succeeded")
    assert count_keys(etcd, status["keyPrefix"]) == 0
    assert "KeysDeleted" in event_reasons(kube, k8s_ns, "kv")


@pytest.mark.parametrize("label", ["JobSet", "RayJob"])
def test_deleting_the_job_is_its_end(
    kube: EmulatorServer, etcd: EtcdCluster, k8s_ns: str, label: str
) -> None:
    kind = KINDS[label]
    create_job(kube, kind, "gone", k8s_ns)
    kube.create(API, PLURAL, kvns_for(kind, "kv", "gone"), k8s_ns)
    status = wait_phase(kube, k8s_ns, "kv", "Ready")["status"]
    write_keys(kube, k8s_ns, "kv-etha-kv", 2)
    kube.delete(kind.api_version, kind.plural, "gone", k8s_ns)
    done = wait_phase(kube, k8s_ns, "kv", "Cleaned")["status"]
    assert done["jobEndReason"] == "Deleted" and done["keysDeleted"] == 2
    assert count_keys(etcd, status["keyPrefix"]) == 0


def test_keep_and_revoke_on_a_failed_pytorchjob_and_a_terminated_volcano_job(
    kube: EmulatorServer, etcd: EtcdCluster, k8s_ns: str
) -> None:
    torch, volcano = KINDS["PyTorchJob"], KINDS["VolcanoJob"]
    create_job(kube, torch, "keep", k8s_ns)
    create_job(kube, volcano, "revoke", k8s_ns)
    kube.create(API, PLURAL, kvns_for(torch, "keep", "keep", onJobEnd="Keep"), k8s_ns)
    kube.create(API, PLURAL, kvns_for(volcano, "revoke", "revoke", onJobEnd="Revoke"), k8s_ns)
    kept = wait_phase(kube, k8s_ns, "keep", "Ready")["status"]
    revoked = wait_phase(kube, k8s_ns, "revoke", "Ready")["status"]
    write_keys(kube, k8s_ns, "keep-etha-kv", 2)
    write_keys(kube, k8s_ns, "revoke-etha-kv", 2)
    # training-operator: JobFailed = "Failed" (pkg/apis/kubeflow.org/v1/common_types.go).
    set_job_status(kube, torch, "keep", k8s_ns, conditions(("Failed", "True", "PyTorchJobFailed")))
    # volcano-sh/apis batch/v1alpha1 job.go: Terminated is a terminal JobPhase.
    set_job_status(kube, volcano, "revoke", k8s_ns, {"state": {"phase": "Terminated"}})
    ended = wait_phase(kube, k8s_ns, "keep", "JobEnded")["status"]
    assert ended["jobEndReason"] == "Failed"
    assert count_keys(etcd, kept["keyPrefix"]) == 2  # Keep: nothing deleted
    gone = wait_phase(kube, k8s_ns, "revoke", "Revoked")["status"]
    assert gone["jobEndReason"] == "Terminated" and gone["keysDeleted"] == 2
    assert count_keys(etcd, revoked["keyPrefix"]) == 0
    assert kube.find("v1", "secrets", "revoke-etha-kv", k8s_ns) is None


def test_a_kind_installed_later_becomes_ready_without_restart(
    kube: EmulatorServer, etcd: EtcdCluster, operator: OperatorProcess, k8s_ns: str
) -> None:
    """The custom kind from ETHA_OPERATOR_JOB_KINDS: no CRD first, then its CRD."""
    api_version = f"{CUSTOM_KIND['group']}/{CUSTOM_KIND['version']}"
    body = {
        "apiVersion": API,
        "kind": "KVNamespace",
        "metadata": {"name": "later"},
        "spec": {"jobRef": {"apiVersion": api_version, "kind": "TrainingRun", "name": "run"}},
    }
    kube.create(API, PLURAL, body, k8s_ns)
    pending = wait_phase(kube, k8s_ns, "later", "Pending")["status"]
    [ready] = [c for c in pending["conditions"] if c["type"] == "Ready"]
    assert ready["status"] == "False" and ready["reason"] == "JobKindNotServed"
    assert "ml.example.com/v1 TrainingRun" in pending["message"]
    wait_for(
        lambda: "JobKindNotServed" in event_reasons(kube, k8s_ns, "later"),
        timeout=30,
        what="the JobKindNotServed event",
    )
    assert operator.process is not None
    pid = operator.process.pid

    kube.add_crd(job_crd("ml.example.com", "v1", "TrainingRun", "trainingruns"))
    kube.create(
        api_version,
        "trainingruns",
        {"metadata": {"name": "run"}, "spec": {}},
        k8s_ns,
    )
    status = wait_phase(kube, k8s_ns, "later", "Ready", timeout=90)["status"]
    assert operator.process is not None and operator.process.pid == pid  # no restart
    assert operator.process.poll() is None
    write_keys(kube, k8s_ns, "later-etha-kv", 4)
    # The custom rule: status.outcome Done ends it (the kind's watch started with its CRD).
    kube.patch(
        api_version, "trainingruns", "run", {"status": {"outcome": "Done"}}, k8s_ns, "status"
    )
    done = wait_phase(kube, k8s_ns, "later", "Cleaned", timeout=90)["status"]
    assert done["jobEndReason"] == "Done" and done["keysDeleted"] == 4
    assert count_keys(etcd, status["keyPrefix"]) == 0


# -- etha.io/kvnamespace: auto ---------------------------------------------------------------


@pytest.mark.parametrize("label", ["JobSet", "TrainJob"])
def test_auto_annotation_gives_a_kvnamespace_injection_and_clean_up(
    kube: EmulatorServer, etcd: EtcdCluster, webhook: Webhook, k8s_ns: str, label: str
) -> None:
    kind = KINDS[label]
    job = create_job(kube, kind, "llm", k8s_ns, AUTO)
    status = wait_phase(kube, k8s_ns, "llm", "Ready")["status"]
    kvns = kube.get(API, PLURAL, "llm", k8s_ns)
    assert kvns["spec"]["jobRef"] == {
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "name": "llm",
    }
    [owner] = kvns["metadata"]["ownerReferences"]
    assert owner["uid"] == job["metadata"]["uid"]
    assert (owner["kind"], owner["apiVersion"], owner["name"]) == (
        kind.kind,
        kind.api_version,
        "llm",
    )

    # A pod as the kind's controller makes it: its label only, nothing written by the user.
    pod = worker_pod({kind.pod_label: "llm", "jobset.sigs.k8s.io/replicatedjob-name": "node"})
    injected(webhook, pod, k8s_ns, "llm-etha-kv")
    # A pod of another job in the same namespace is left alone.
    other = webhook.review(worker_pod({kind.pod_label: "other"}), k8s_ns)
    assert other["allowed"] is True and "patch" not in other

    write_keys(kube, k8s_ns, "llm-etha-kv", 2)
    set_job_status(kube, kind, "llm", k8s_ns, kind.succeeded())
    done = wait_phase(kube, k8s_ns, "llm", "Cleaned")["status"]
    assert done["keysDeleted"] == 2
    assert count_keys(etcd, status["keyPrefix"]) == 0

    # Deleting the job: the garbage collector removes the KVNamespace (its finalizer runs).
    kube.delete(kind.api_version, kind.plural, "llm", k8s_ns)
    kube.collect_garbage()
    wait_for(
        lambda: kube.find(API, PLURAL, "llm", k8s_ns) is None,
        timeout=60,
        what="the auto KVNamespace to be collected with its job",
    )


def test_auto_kvnamespaces_of_same_named_jobs_stay_apart(
    kube: EmulatorServer, etcd: EtcdCluster, webhook: Webhook
) -> None:
    kind = KINDS["JobSet"]
    spaces = ("team-a-same", "team-b-same")
    statuses = {}
    for ns in spaces:
        create_job(kube, kind, "same", ns, AUTO)
    for ns in spaces:
        statuses[ns] = wait_phase(kube, ns, "same", "Ready")["status"]
    assert statuses[spaces[0]]["keyPrefix"] != statuses[spaces[1]]["keyPrefix"]
    assert statuses[spaces[0]]["etcdUser"] != statuses[spaces[1]]["etcdUser"]
    for ns in spaces:
        injected(webhook, worker_pod({kind.pod_label: "same"}), ns, "same-etha-kv")
    write_keys(kube, spaces[0], "same-etha-kv", 1)
    write_keys(kube, spaces[1], "same-etha-kv", 3)
    # One store's credentials cannot see the other's keys.
    a_env = secret_env(kube, spaces[0], "same-etha-kv")
    with store_from_secret(kube, spaces[0], "same-etha-kv") as store:
        assert store.get("rank:2/ready") is None
    assert a_env["ETHA_KV_NAMESPACE"] == statuses[spaces[0]]["keyPrefix"]
    # Ending one job cleans only its own keys.
    set_job_status(kube, kind, "same", spaces[0], kind.succeeded())
    assert wait_phase(kube, spaces[0], "same", "Cleaned")["status"]["keysDeleted"] == 1
    assert count_keys(etcd, statuses[spaces[1]]["keyPrefix"]) == 3
    assert kube.get(API, PLURAL, "same", spaces[1])["status"]["phase"] == "Ready"


def test_a_pod_arriving_before_its_auto_kvnamespace_waits_for_the_secret(
    kube: EmulatorServer, webhook: Webhook, k8s_ns: str
) -> None:
    kind = KINDS["JobSet"]
    pod = worker_pod({kind.pod_label: "early"})
    with kube.hold("POST", "kvnamespaces", name="early") as hold:
        create_job(kube, kind, "early", k8s_ns, AUTO)
        assert hold.reached.wait(60), "the operator never created the KVNamespace"
        assert kube.find(API, PLURAL, "early", k8s_ns) is None

        # The job is known to be auto: the pod gets the (future) Secret and a warning.
        def answered() -> dict[str, Any] | None:
            answer = webhook.review(pod, k8s_ns)
            return answer if answer.get("patch") else None

        answer = wait_for(answered, timeout=60, what="injection before the KVNamespace exists")
        assert answer["allowed"] is True
        assert any("start once Secret 'early-etha-kv' exists" in w for w in answer["warnings"])
        patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(answer["patch"])))
        assert patched["spec"]["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "early-etha-kv"}}
        ]
        assert kube.find("v1", "secrets", "early-etha-kv", k8s_ns) is None
        hold.release()
    # It resolves by itself: the KVNamespace is made, and with it the Secret.
    wait_phase(kube, k8s_ns, "early", "Ready")
    assert secret_env(kube, k8s_ns, "early-etha-kv")["ETHA_KV_NAMESPACE"]


def test_an_auto_job_never_gets_a_hand_made_kvnamespace_of_its_name(
    kube: EmulatorServer, webhook: Webhook, k8s_ns: str
) -> None:
    """A KVNamespace named like the job but made for something else is not taken over."""
    kind = KINDS["JobSet"]
    kube.create(API, PLURAL, kvns_for(KINDS["Job"], "taken", "some-batch-job"), k8s_ns)
    wait_phase(kube, k8s_ns, "taken", "Ready")
    create_job(kube, kind, "taken", k8s_ns, AUTO)
    wait_for(
        lambda: "KVNamespaceConflict" in event_reasons(kube, k8s_ns, "taken"),
        timeout=60,
        what="the KVNamespaceConflict event on the job",
    )
    kvns = kube.get(API, PLURAL, "taken", k8s_ns)
    assert kvns["spec"]["jobRef"]["kind"] == "Job"  # unchanged
    assert not kvns["metadata"].get("ownerReferences")

    def denied() -> dict[str, Any] | None:
        answer = webhook.review(worker_pod({kind.pod_label: "taken"}), k8s_ns)
        return answer if answer.get("allowed") is False else None

    answer = wait_for(denied, timeout=60, what="the pod of the auto job to be refused")
    assert "not the one made for that job" in answer["status"]["message"]


def node_env(kube: EmulatorServer, namespace: str, secret: str, rank: int) -> dict[str, str]:
    """Node ``rank`` (of 2) of a TrainJob: the Secret's variables and the PET_* ones the
    Trainer's torch runtime sets; none of this machine's ETHA_KV_*/PET_*/RANK/WORLD_SIZE."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETHA_KV_", "PET_")) and k not in ("RANK", "WORLD_SIZE")
    }
    env.update(secret_env(kube, namespace, secret))
    job = secret.removesuffix("-etha-kv")
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            "GLOO_SOCKET_IFNAME": "lo",
            # kubeflow/trainer pkg/constants/constants.go, TorchEnv*:
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": f"{job}-node-0-0.{job}",
            "PET_MASTER_PORT": "29400",
        }
    )
    return env


TORCH_WORKER = """
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
import etha.distributed  # registers etha://

dist.init_process_group("gloo", init_method="etha:///finetune-1", timeout=timedelta(seconds=90))
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
with open(sys.argv[1], "w") as f:
    json.dump({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}, f)
dist.destroy_process_group()
"""


def test_trainjob_pods_rendezvous_with_what_the_kind_and_the_secret_give(
    kube: EmulatorServer, etcd: EtcdCluster, webhook: Webhook, k8s_ns: str, tmp_path: Path
) -> None:
    """Two TrainJob nodes: the injected Secret plus the PET_* variables the Trainer's torch
    runtime sets (no RANK, no WORLD_SIZE, nothing hand-written) are enough for etha://,
    through the gateway."""
    kind = KINDS["TrainJob"]
    create_job(kube, kind, "finetune", k8s_ns, AUTO)
    status = wait_phase(kube, k8s_ns, "finetune", "Ready")["status"]
    pod = worker_pod({kind.pod_label: "finetune"})
    secret = injected(webhook, pod, k8s_ns, "finetune-etha-kv")["spec"]["containers"][0]["envFrom"][
        0
    ]["secretRef"]["name"]
    script = tmp_path / "worker.py"
    script.write_text(TORCH_WORKER)
    with procs() as p:
        logs = [tmp_path / f"node{r}.log" for r in range(2)]
        workers = [
            p.python(
                script,
                [str(tmp_path / f"out{r}.json")],
                node_env(kube, k8s_ns, secret, r),
                logs[r],
            )
            for r in range(2)
        ]
        codes = p.wait_all(workers, timeout=150)
        assert codes == [0, 0], "\n---\n".join(tail(log) for log in logs)
    results = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)
    assert count_keys(etcd, status["keyPrefix"]) > 0  # the rendezvous used the job's store
    set_job_status(kube, kind, "finetune", k8s_ns, kind.succeeded())
    assert wait_phase(kube, k8s_ns, "finetune", "Cleaned")["status"]["keysDeleted"] > 0
    assert count_keys(etcd, status["keyPrefix"]) == 0


TORCHRUN_WORKER = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")  # env://: what torchrun gives its workers
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def test_torchrun_with_the_etha_backend_needs_only_the_trainjob_command(
    kube: EmulatorServer, etcd: EtcdCluster, k8s_ns: str, tmp_path: Path
) -> None:
    """examples/jobs/trainjob.yaml's command, `torchrun --rdzv-backend=etha train.py`, on
    two nodes: torchrun takes the node count from PET_NNODES, etha the store from the
    Secret; no --nnodes, no --rdzv-endpoint, no --rdzv-id."""
    kind = KINDS["TrainJob"]
    create_job(kube, kind, "elastic", k8s_ns, AUTO)
    status = wait_phase(kube, k8s_ns, "elastic", "Ready")["status"]
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=etha",
        # Only because both "nodes" share this machine's loopback:
        "--local-addr=127.0.0.1",
        str(script), str(out),
    ]  # fmt: skip
    with procs() as p:
        logs = [tmp_path / f"node{r}.log" for r in range(2)]
        nodes = [
            p.start(cmd, node_env(kube, k8s_ns, "elastic-etha-kv", r), logs[r]) for r in range(2)
        ]
        codes = p.wait_all(nodes, timeout=180)
        assert codes == [0, 0], "\n---\n".join(tail(log, 60) for log in logs)
    results = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)
    # The rendezvous state lived in the job's own prefix.
    assert count_keys(etcd, status["keyPrefix"]) > 0


def test_the_chart_grants_every_call_the_operator_made_for_these_kinds(
    operator: OperatorProcess, recorder: ApiRecorder
) -> None:
    """Least privilege over the whole module (every kind, auto mode, a custom kind): the
    chart with the same jobKinds.extra grants each verb used, and nothing on job kinds
    beyond read."""
    granted = chart_grants({"jobKinds": {"extra": [CUSTOM_KIND]}})
    used = recorder.verbs()
    assert used, "nothing recorded"
    missing = ungranted(used, granted)
    assert not missing, f"the chart does not grant {missing}"
    kinds = {(k.group, k.plural) for k in KINDS.values()} | {("ml.example.com", "trainingruns")}
    for key in kinds:
        assert granted[key] == {"get", "list", "watch"}, key
    used_kinds = {(g, r) for (_, g, r) in used} & kinds
    assert len(used_kinds) >= 2, used_kinds  # the job kinds really were called
