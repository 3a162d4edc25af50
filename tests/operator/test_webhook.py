"""The pod-mutating admission webhook: the pure decision, and the real kopf webhook server
of a running operator answering AdmissionReviews over HTTPS (what the API server sends).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import pytest
from etha_operator import webhook

from tests.operator.helpers import API, PLURAL, kvnamespace, wait_phase
from tests.support.admission import Webhook
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorFactory, OperatorProcess, wait_for

pytestmark = pytest.mark.timeout(120)


def pod(labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "worker-", "labels": labels or {}},
        "spec": spec
        or {
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [
                {"name": "main", "image": "python:3.11-slim"},
                {
                    "name": "sidecar",
                    "image": "busybox",
                    "envFrom": [{"configMapRef": {"name": "settings"}}],
                },
            ],
        },
    }


READY = webhook.KVNamespaceInfo("train", "Ready", "train-etha-kv")


def lookup_of(*infos: webhook.KVNamespaceInfo) -> webhook.Lookup:
    table = {i.name: i for i in infos}
    return table.get


# -- the pure decision --------------------------------------------------------------------


def test_labelled_pod_gets_the_secret_on_every_container() -> None:
    original = pod({"etha.io/kvnamespace": "train"})
    mutation = webhook.mutate_pod(original, "ns", lookup_of(READY))
    assert mutation.warnings == []
    patched = jsonpatch.apply_patch(original, mutation.ops)
    ref = {"secretRef": {"name": "train-etha-kv"}}
    spec = patched["spec"]
    assert spec["initContainers"][0]["envFrom"] == [ref]
    assert spec["containers"][0]["envFrom"] == [ref]
    # Existing sources are kept; ours comes last so it wins for duplicate keys.
    assert spec["containers"][1]["envFrom"] == [{"configMapRef": {"name": "settings"}}, ref]
    # Applying the decision again adds nothing (reinvocation is harmless).
    assert webhook.mutate_pod(patched, "ns", lookup_of(READY)).ops == []


def test_unlabelled_pod_is_untouched() -> None:
    mutation = webhook.mutate_pod(pod({"app": "x"}), "ns", lookup_of(READY))
    assert mutation.ops == [] and mutation.warnings == []


def test_pod_setting_reserved_variables_is_rejected() -> None:
    bad = pod(
        {"etha.io/kvnamespace": "train"},
        containers=[
            {"name": "main", "image": "x", "env": [{"name": "ETHA_KV_NAMESPACE", "value": "other"}]}
        ],
    )
    with pytest.raises(webhook.AdmissionDenied, match=r"main: ETHA_KV_NAMESPACE.*remove them"):
        webhook.mutate_pod(bad, "ns", lookup_of(READY))


def test_unknown_failed_or_revoked_kvnamespace_is_rejected() -> None:
    labelled = pod({"etha.io/kvnamespace": "train"})
    with pytest.raises(webhook.AdmissionDenied, match="no KVNamespace 'train'"):
        webhook.mutate_pod(labelled, "ns", lookup_of())
    failed = webhook.KVNamespaceInfo("train", "Failed", "train-etha-kv", "PrefixConflict")
    with pytest.raises(webhook.AdmissionDenied, match="is Failed"):
        webhook.mutate_pod(labelled, "ns", lookup_of(failed))
    revoked = webhook.KVNamespaceInfo("train", "Revoked", "train-etha-kv")
    with pytest.raises(webhook.AdmissionDenied, match="revoked"):
        webhook.mutate_pod(labelled, "ns", lookup_of(revoked))


def test_not_ready_kvnamespace_is_injected_with_a_warning() -> None:
    pending = webhook.KVNamespaceInfo("train", None, "train-etha-kv")
    mutation = webhook.mutate_pod(pod({"etha.io/kvnamespace": "train"}), "ns", lookup_of(pending))
    assert len(mutation.ops) == 3
    assert any("start once Secret 'train-etha-kv' exists" in w for w in mutation.warnings)


# -- the real webhook server of the operator -----------------------------------------------


@pytest.fixture(scope="module")
def operator(operator_factory: OperatorFactory, webhook: Webhook) -> OperatorProcess:
    return operator_factory(**webhook.settings()).start()


def test_webhook_server_patches_labelled_pods_and_leaves_others_alone(
    kube: EmulatorServer, operator: OperatorProcess, webhook: Webhook, k8s_ns: str
) -> None:
    kube.create(API, PLURAL, kvnamespace("train", "train-job"), k8s_ns)
    wait_phase(kube, k8s_ns, "train", "Ready")
    labelled = pod({"etha.io/kvnamespace": "train"})

    # The webhook reads the operator's index, which follows the watch stream: until it
    # has seen the Ready status, the pod is injected with a "not Ready yet" warning.
    def injected() -> dict[str, Any] | None:
        answer = webhook.review(labelled, k8s_ns)
        return answer if answer.get("patch") and not answer.get("warnings") else None

    answer = wait_for(injected, timeout=60, what="the webhook to see the Ready KVNamespace")
    assert answer["allowed"] is True
    assert answer["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(answer["patch"]))
    patched = jsonpatch.apply_patch(labelled, ops)
    ref = {"secretRef": {"name": "train-etha-kv"}}
    for container in patched["spec"]["initContainers"] + patched["spec"]["containers"]:
        assert container["envFrom"][-1] == ref

    untouched = webhook.review(pod({"app": "other"}), k8s_ns)
    assert untouched["allowed"] is True
    assert "patch" not in untouched


def test_webhook_server_rejects_reserved_variables_and_unknown_kvnamespaces(
    kube: EmulatorServer, operator: OperatorProcess, webhook: Webhook, k8s_ns: str
) -> None:
    unknown = webhook.review(pod({"etha.io/kvnamespace": "nope"}), k8s_ns)
    assert unknown["allowed"] is False
    assert "no KVNamespace 'nope'" in unknown["status"]["message"]
    assert unknown["status"]["code"] == 403

    kube.create(API, PLURAL, kvnamespace("strict", "strict-job"), k8s_ns)
    wait_phase(kube, k8s_ns, "strict", "Ready")
    bad = pod(
        {"etha.io/kvnamespace": "strict"},
        containers=[
            {"name": "main", "image": "x", "env": [{"name": "ETHA_KV_PASSWORD", "value": "x"}]}
        ],
    )

    def rejected() -> dict[str, Any] | None:
        answer = webhook.review(bad, k8s_ns)
        return answer if "reserved" in answer.get("status", {}).get("message", "") else None

    answer = wait_for(rejected, timeout=60, what="the reserved-variable rejection")
    assert answer["allowed"] is False
    assert "ETHA_KV_PASSWORD" in answer["status"]["message"]
