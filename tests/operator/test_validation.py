"""Invalid KVNamespace specs are rejected with a clear message: by the CRD's schema (what
the API server enforces; checked here with jsonschema because the emulator does not
validate) and by the operator itself (status Failed + a Warning event)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from etha_operator import model

from tests.operator.helpers import (
    API,
    PLURAL,
    create_ready,
    event_reasons,
    kvnamespace,
    store_from_secret,
    wait_phase,
)
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorProcess, wait_for

pytestmark = pytest.mark.timeout(120)

CRD = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "crds" / "kvnamespace.yaml").read_text()
)
JOB = {"apiVersion": "batch/v1", "kind": "Job", "name": "train"}

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no jobRef", {}, "spec.jobRef"),
    ("unsupported job kind", {"jobRef": {**JOB, "kind": "CronJob"}}, "spec.jobRef"),
    ("unsupported job apiVersion", {"jobRef": {**JOB, "apiVersion": "batch/v2"}}, "spec.jobRef"),
    ("job name not DNS", {"jobRef": {**JOB, "name": "Train_Job"}}, "spec.jobRef.name"),
    ("slash in keyPrefix", {"jobRef": JOB, "keyPrefix": "a/b"}, "spec.keyPrefix"),
    ("space in keyPrefix", {"jobRef": JOB, "keyPrefix": "a b"}, "spec.keyPrefix"),
    ("keyPrefix too long", {"jobRef": JOB, "keyPrefix": "x" * 129}, "spec.keyPrefix"),
    ("unknown policy", {"jobRef": JOB, "onJobEnd": "Purge"}, "spec.onJobEnd"),
    ("negative ttl", {"jobRef": JOB, "ttlSecondsAfterJobEnd": -1}, "spec.ttlSecondsAfterJobEnd"),
    (
        "ttl not an integer",
        {"jobRef": JOB, "ttlSecondsAfterJobEnd": "1h"},
        "spec.ttlSecondsAfterJobEnd",
    ),
    ("unknown field", {"jobRef": JOB, "prefix": "typo"}, "unknown fields"),
    ("bad component", {"jobRef": JOB, "component": "a/b"}, "spec.component"),
]


def schema() -> dict[str, Any]:
    [version] = CRD["spec"]["versions"]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_crd_schema_rejects_invalid_specs(case: str, spec: dict[str, Any], field: str) -> None:
    obj = {"apiVersion": API, "kind": "KVNamespace", "metadata": {"name": "x"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, schema())


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_operator_rejects_invalid_specs_naming_the_field(
    case: str, spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(model.SpecError, match=field.replace(".", r"\.")):
        model.parse_spec(spec)


def test_valid_specs_pass_both_checks() -> None:
    for spec in (
        {"jobRef": JOB},
        {"jobRef": JOB, "keyPrefix": "team-a.run:7", "onJobEnd": "Revoke", "component": "c"},
        {"jobRef": JOB, "onJobEnd": "Keep", "ttlSecondsAfterJobEnd": 3600},
    ):
        jsonschema.validate(
            {"apiVersion": API, "kind": "KVNamespace", "metadata": {"name": "x"}, "spec": spec},
            schema(),
        )
        parsed = model.parse_spec(spec)
        assert parsed.job.name == "train"


def test_crd_declares_immutability_status_and_printer_columns() -> None:
    [version] = CRD["spec"]["versions"]
    spec_schema = schema()["properties"]["spec"]
    rules = [r["rule"] for r in spec_schema["x-kubernetes-validations"]]
    assert any("oldSelf.keyPrefix" in r for r in rules)
    assert spec_schema["properties"]["jobRef"]["x-kubernetes-validations"][0]["rule"] == (
        "self == oldSelf"
    )
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Prefix",
        "Secret",
        "Job",
        "Age",
    ]
    assert CRD["spec"]["names"]["shortNames"] == ["kvns"]
    status_fields = set(schema()["properties"]["status"]["properties"])
    assert {
        "phase",
        "conditions",
        "observedGeneration",
        "keyPrefix",
        "etcdUser",
        "etcdRole",
        "secretName",
        "jobEndedAt",
        "keysCleanedAt",
        "keysDeleted",
    } <= status_fields
    assert not any("password" in f.lower() for f in status_fields)


def test_operator_marks_an_invalid_object_failed_with_the_reason(
    kube: EmulatorServer, operator: OperatorProcess, k8s_ns: str
) -> None:
    # The emulator, unlike an API server, does not validate: the operator must not trust it.
    bad = kvnamespace("bad", "train", onJobEnd="Purge")
    kube.create(API, PLURAL, bad, k8s_ns)
    status = wait_phase(kube, k8s_ns, "bad", "Failed")["status"]
    assert "spec.onJobEnd" in status["message"]
    [ready] = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert "etcdUser" not in status
    wait_for(lambda: "InvalidSpec" in event_reasons(kube, k8s_ns, "bad"), what="the event")


def test_second_kvnamespace_with_the_same_prefix_is_refused(
    kube: EmulatorServer, operator: OperatorProcess, k8s_ns: str
) -> None:
    prefix = f"shared-{k8s_ns}"
    create_ready(kube, k8s_ns, "first", "job-1", keyPrefix=prefix)
    with store_from_secret(kube, k8s_ns, "first-etha-kv") as store:
        store.set("precious", "1")
    kube.create(API, PLURAL, kvnamespace("second", "job-2", keyPrefix=prefix), k8s_ns)
    status = wait_phase(kube, k8s_ns, "second", "Failed")["status"]
    assert "already owned by another KVNamespace" in status["message"]
    assert status["conditions"][0]["reason"] == "PrefixConflict"
    assert kube.find("v1", "secrets", "second-etha-kv", k8s_ns) is None

    # Deleting the refused one must not clean the prefix it never owned.
    kube.delete(API, PLURAL, "second", k8s_ns)
    wait_for(lambda: kube.find(API, PLURAL, "second", k8s_ns) is None, what="deletion")
    assert kube.get(API, PLURAL, "first", k8s_ns)["status"]["phase"] == "Ready"
    with store_from_secret(kube, k8s_ns, "first-etha-kv") as store:
        assert store.get("precious") == b"1"


def test_refused_kvnamespace_takes_the_prefix_once_the_owner_is_gone(
    kube: EmulatorServer, operator: OperatorProcess, k8s_ns: str
) -> None:
    prefix = f"handover-{k8s_ns}"
    create_ready(kube, k8s_ns, "owner", "job-1", keyPrefix=prefix)
    kube.create(API, PLURAL, kvnamespace("waiting", "job-2", keyPrefix=prefix), k8s_ns)
    wait_phase(kube, k8s_ns, "waiting", "Failed")
    kube.delete(API, PLURAL, "owner", k8s_ns)
    # The periodic re-check (ETHA_OPERATOR_JOB_CHECK_INTERVAL) retries failed objects.
    status = wait_phase(kube, k8s_ns, "waiting", "Ready")["status"]
    assert status["keyPrefix"] == prefix
    with store_from_secret(kube, k8s_ns, "waiting-etha-kv") as store:
        store.set("now-mine", "1")
