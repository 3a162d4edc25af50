"""The job kind table as data: each shipped rule against its controller's status shapes,
parsing of ETHA_OPERATOR_JOB_KINDS (clear errors), and the webhook's auto decisions."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from etha_operator import model, webhook
from etha_operator.jobkinds import SHIPPED, JobKindError, JobKinds, parse_extra
from etha_operator.settings import load_settings

from etha.kvstore.errors import ConfigurationError
from tests.support.job_kinds import kind_setting

KINDS = JobKinds()


def _cond(type_: str, status: str = "True") -> dict[str, Any]:
    return {"status": {"conditions": [{"type": type_, "status": status}]}}


def _phase(phase: str) -> dict[str, Any]:
    return {"status": {"state": {"phase": phase}}}


def _ray(status: str) -> dict[str, Any]:
    return {"status": {"jobDeploymentStatus": status}}


def _ended(*rules: dict[str, Any]) -> str:
    return json.dumps([{**CUSTOM, "ended": list(rules)}])


VOLCANO = "batch.volcano.sh/v1alpha1"
# (apiVersion, kind, job status as its controller writes it, expected end or None)
CASES = [
    ("batch/v1", "Job", _cond("Complete"), ("Complete", "Succeeded")),
    ("batch/v1", "Job", _cond("Failed"), ("Failed", "Failed")),
    ("batch/v1", "Job", _cond("Complete", "False"), None),
    ("batch/v1", "Job", _cond("SuccessCriteriaMet"), None),
    ("jobset.x-k8s.io/v1alpha2", "JobSet", _cond("Completed"), ("Completed", "Succeeded")),
    ("jobset.x-k8s.io/v1alpha2", "JobSet", _cond("Failed"), ("Failed", "Failed")),
    ("jobset.x-k8s.io/v1alpha2", "JobSet", _cond("Suspended"), None),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob", _cond("Complete"), ("Complete", "Succeeded")),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob", _cond("Failed"), ("Failed", "Failed")),
    ("kubeflow.org/v1", "PyTorchJob", _cond("Succeeded"), ("Succeeded", "Succeeded")),
    ("kubeflow.org/v1", "PyTorchJob", _cond("Running"), None),
    ("kubeflow.org/v1", "PyTorchJob", _cond("Restarting"), None),
    ("kubeflow.org/v2beta1", "MPIJob", _cond("Failed"), ("Failed", "Failed")),
    ("ray.io/v1", "RayJob", _ray("Complete"), ("Complete", "Succeeded")),
    ("ray.io/v1", "RayJob", _ray("Failed"), ("Failed", "Failed")),
    ("ray.io/v1", "RayJob", _ray("Running"), None),
    # Ray's own job status alone is not the deployment's end (the cluster may still run).
    ("ray.io/v1", "RayJob", {"status": {"jobStatus": "SUCCEEDED"}}, None),
    (VOLCANO, "Job", _phase("Completed"), ("Completed", "Succeeded")),
    (VOLCANO, "Job", _phase("Aborted"), ("Aborted", "Failed")),
    (VOLCANO, "Job", _phase("Terminated"), ("Terminated", "Failed")),
    (VOLCANO, "Job", _phase("Completing"), None),
    (VOLCANO, "Job", {"status": {"state": "odd"}}, None),
    (VOLCANO, "Job", {}, None),
]


@pytest.mark.parametrize(("api_version", "kind", "job", "expected"), CASES)
def test_shipped_end_rules(
    api_version: str, kind: str, job: dict[str, Any], expected: tuple[str, str] | None
) -> None:
    rule = KINDS.get(api_version, kind)
    assert rule is not None
    assert rule.end(job) == expected


def test_batch_job_and_volcano_job_are_told_apart_by_api_version() -> None:
    batch, volcano = KINDS.get("batch/v1", "Job"), KINDS.get("batch.volcano.sh/v1alpha1", "Job")
    assert batch is not None and volcano is not None and batch is not volcano
    assert (batch.group, volcano.group) == ("batch", "batch.volcano.sh")


def test_every_shipped_kind_round_trips_through_its_json_form() -> None:
    text = json.dumps([k.to_json() for k in SHIPPED])
    assert parse_extra(text) == SHIPPED


DONE = {"field": "status.outcome", "values": ["Done"], "outcome": "Succeeded"}
CUSTOM = kind_setting("ml.example.com/v1", "TrainingRun", "trainingruns", DONE)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("{", "not valid JSON"),
        ('{"group": "x"}', "must be a JSON list"),
        (json.dumps([{**CUSTOM, "plural": "Runs"}]), "[0]: plural"),
        (json.dumps([{**CUSTOM, "ended": []}]), "ended must be a non-empty list"),
        (json.dumps([{**CUSTOM, "extra": 1}]), "unknown fields ['extra']"),
        (
            _ended({"field": "spec.x", "values": ["a"], "outcome": "Succeeded"}),
            "dotted path under status",
        ),
        (
            _ended({"conditionType": "Done", "outcome": "Maybe"}),
            "outcome 'Maybe'",
        ),
        (
            _ended({"conditionType": "Boom", "outcome": "Failed"}),
            "no rule with outcome Succeeded",
        ),
        (
            _ended({"conditionType": "A", "field": "status.a", "outcome": "Failed"}),
            "either conditionType",
        ),
    ],
)
def test_bad_job_kind_settings_name_the_entry_and_the_fix(text: str, names: str) -> None:
    with pytest.raises(JobKindError) as info:
        JobKinds.from_setting(text)
    assert names in str(info.value)
    assert isinstance(info.value, ConfigurationError)
    assert "ETHA_OPERATOR_JOB_KINDS" in str(info.value)


def test_the_setting_adds_and_replaces_kinds() -> None:
    succeeded = {"field": "status.jobStatus", "values": ["SUCCEEDED"], "outcome": "Succeeded"}
    stricter_ray = kind_setting("ray.io/v1", "RayJob", "rayjobs", succeeded)
    env = {
        "ETHA_OPERATOR_ETCD_ENDPOINTS": "http://127.0.0.1:2379",
        "ETHA_OPERATOR_ETCD_PASSWORD": "x",
        "ETHA_OPERATOR_GATEWAY_ENDPOINTS": "http://127.0.0.1:2380",
        "ETHA_OPERATOR_JOB_KINDS": json.dumps([CUSTOM, stricter_ray]),
    }
    kinds = load_settings(env).job_kinds
    assert len(kinds) == len(SHIPPED) + 1
    ray = kinds.get("ray.io/v1", "RayJob")
    assert ray is not None and ray.end({"status": {"jobStatus": "SUCCEEDED"}}) is not None
    spec = model.parse_spec(
        {"jobRef": {"apiVersion": "ml.example.com/v1", "kind": "TrainingRun", "name": "r"}}, kinds
    )
    assert spec.job.plural == "trainingruns"
    # Without the setting, the same jobRef is refused with the list of supported kinds.
    with pytest.raises(model.SpecError, match="ETHA_OPERATOR_JOB_KINDS"):
        model.parse_spec(
            {"jobRef": {"apiVersion": "ml.example.com/v1", "kind": "TrainingRun", "name": "r"}}
        )


def test_the_shipped_setting_keeps_only_the_named_shipped_kinds() -> None:
    kept = JobKinds.from_setting(None, json.dumps(["rayjobs.ray.io", "jobs.batch"]))
    assert [k.key for k in kept] == [("batch/v1", "Job"), ("ray.io/v1", "RayJob")]  # shipped order
    assert kept.get("batch.volcano.sh/v1alpha1", "Job") is None
    with pytest.raises(
        model.SpecError, match=re.escape("supported: batch/v1 Job, ray.io/v1 RayJob (")
    ):
        model.parse_spec(
            {"jobRef": {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "p"}},
            kept,
        )
    # Unset or blank: every shipped kind; none of them plus an extra kind: only that one.
    assert [k.key for k in JobKinds.from_setting(None, " ")] == [k.key for k in SHIPPED]
    only = JobKinds.from_setting(json.dumps([CUSTOM]), "[]")
    assert [k.kind for k in only] == ["TrainingRun"]


@pytest.mark.parametrize(
    ("shipped", "extra", "names"),
    [
        ('["rayjobs"]', None, "['rayjobs'], which no shipped job kind is"),
        ('"jobs.batch"', None, "must be a JSON list"),
        ("[jobs.batch]", None, "is not valid JSON"),
        ("[]", None, "no job kinds"),
    ],
)
def test_bad_shipped_settings_name_the_problem_and_the_fix(
    shipped: str, extra: str | None, names: str
) -> None:
    with pytest.raises(JobKindError) as info:
        JobKinds.from_setting(extra, shipped)
    assert names in str(info.value)
    assert "ETHA_OPERATOR_SHIPPED_JOB_KINDS" in str(info.value)
    # The fix: every shipped name is listed (or the way to enable one).
    assert "jobsets.jobset.x-k8s.io" in str(info.value) or "enable a shipped kind" in str(
        info.value
    )


# -- the webhook's auto decisions --------------------------------------------------------------


def _pod(labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "main"}]}}


LABELS = ("jobset.sigs.k8s.io/jobset-name", "training.kubeflow.org/job-name")
READY = webhook.KVNamespaceInfo("llm", "Ready", "llm-etha-kv")


def test_auto_pod_is_injected_by_its_kinds_label() -> None:
    def auto(label: str, job: str) -> tuple[str, bool] | None:
        return (job, True) if (label, job) == (LABELS[0], "llm") else None

    mutation = webhook.mutate_pod(_pod({LABELS[0]: "llm"}), "ns", {"llm": READY}.get, auto, LABELS)
    ref = {"secretRef": {"name": "llm-etha-kv"}}
    assert mutation.ops == [{"op": "add", "path": "/spec/containers/0/envFrom", "value": [ref]}]
    # Another job's pod, or a pod with no kind label: untouched.
    assert (
        webhook.mutate_pod(_pod({LABELS[0]: "x"}), "ns", {"llm": READY}.get, auto, LABELS).ops == []
    )
    assert webhook.mutate_pod(_pod({}), "ns", {"llm": READY}.get, auto, LABELS).ops == []


def test_auto_pod_before_its_kvnamespace_gets_the_future_secret_with_a_warning() -> None:
    mutation = webhook.mutate_pod(
        _pod({LABELS[1]: "early"}), "ns", {}.get, lambda _l, job: (job, False), LABELS
    )
    assert mutation.ops[0]["value"] == [{"secretRef": {"name": "early-etha-kv"}}]
    assert any("start once Secret 'early-etha-kv' exists" in w for w in mutation.warnings)


def test_auto_pod_is_refused_a_kvnamespace_not_made_for_its_job() -> None:
    with pytest.raises(webhook.AdmissionDenied, match="not the one made for that job"):
        webhook.mutate_pod(
            _pod({LABELS[0]: "llm"}), "ns", {"llm": READY}.get, lambda _l, j: (j, False), LABELS
        )


def test_explicit_label_wins_over_the_kind_label() -> None:
    other = webhook.KVNamespaceInfo("mine", "Ready", "mine-etha-kv")
    mutation = webhook.mutate_pod(
        _pod({"etha.io/kvnamespace": "mine", LABELS[0]: "llm"}),
        "ns",
        {"mine": other, "llm": READY}.get,
        lambda _l, j: (j, True),
        LABELS,
    )
    assert mutation.ops[0]["value"] == [{"secretRef": {"name": "mine-etha-kv"}}]


def test_every_shipped_kind_has_an_example_the_operator_accepts() -> None:
    """examples/jobs/: one manifest per kind, auto-annotated or with a valid KVNamespace."""
    import pathlib

    import yaml

    root = pathlib.Path(__file__).resolve().parents[2] / "examples" / "jobs"
    seen = set()
    for path in sorted(root.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        for doc in docs:
            if doc["kind"] == "KVNamespace":
                spec = model.parse_spec(doc["spec"])
                assert any(
                    (d["apiVersion"], d["kind"], d["metadata"]["name"])
                    == (spec.job.api_version, spec.job.kind, spec.job.name)
                    for d in docs
                ), path
                continue
            rule = KINDS.get(doc["apiVersion"], doc["kind"])
            assert rule is not None, f"{path}: {doc['apiVersion']} {doc['kind']}"
            seen.add(rule.key)
    assert seen == {k.key for k in SHIPPED}
