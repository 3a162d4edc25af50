"""The chart's monitoring: the operator's metrics port and Service, and the ServiceMonitor.

Rendered offline with Helm's engine (as tests/test_chart.py does); the ServiceMonitor's
selector is evaluated against the rendered Services, so it provably finds the operator's
and the gateway's metrics ports and nothing else.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from tests.test_chart import CHART, NAMESPACE, RELEASE, by_kind, manifests

pytestmark = pytest.mark.timeout(120)

MONITORED = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
    return True


def _operator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = [
        d
        for d in by_kind(docs, "Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    ]
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_the_operator_serves_metrics_on_the_documented_port_by_default() -> None:
    docs = manifests()
    container = _operator(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["ETHA_OPERATOR_METRICS_PORT"] == "9102" and ports["metrics"] == 9102
    [service] = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9102, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert not by_kind(docs, "ServiceMonitor")


def test_port_zero_turns_metrics_off() -> None:
    docs = manifests({"metrics": {"port": 0}})
    container = _operator(docs)
    assert {e["name"]: e.get("value") for e in container["env"]}[
        "ETHA_OPERATOR_METRICS_PORT"
    ] == "0"
    assert "metrics" not in {p["name"] for p in container["ports"]}
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]


def test_service_monitor_scrapes_the_operator_and_the_gateway() -> None:
    docs = manifests(MONITORED)
    [monitor] = by_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    scraped = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]
        for s in by_kind(docs, "Service")
        if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        and any(p["name"] == "metrics" for p in s["spec"]["ports"])
    }
    assert scraped == {"operator", "gateway"}
    # Each scraped Service's metrics port leads to a container port of its pods.
    for service in by_kind(docs, "Service"):
        if not _selects(monitor["spec"]["selector"], service["metadata"]["labels"]):
            continue
        for port in service["spec"]["ports"]:
            if port["name"] != "metrics":
                continue
            pods = [
                d
                for d in by_kind(docs, "Deployment")
                if _selects(
                    {"matchLabels": service["spec"]["selector"]},
                    d["spec"]["template"]["metadata"]["labels"],
                )
            ]
            assert pods, service["metadata"]["name"]
            names = {
                p["name"]
                for c in pods[0]["spec"]["template"]["spec"]["containers"]
                for p in c["ports"]
            }
            assert port["targetPort"] in names


def test_every_other_manifest_still_validates_strictly() -> None:
    for doc in manifests(MONITORED):
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD kind the validator does not know
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metrics": {"port": 8080}}, "also operator.healthPort"),
        ({"metrics": {"port": 9443}}, "also webhook.port"),
        ({"metrics": {"port": 0, "serviceMonitor": {"enabled": True}}}, "needs metrics.port > 0"),
    ],
)
def test_contradictory_metrics_values_fail_with_a_message(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(Exception, match=message), helm.Chart.load(CHART) as chart:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_schema_rejects_a_bad_interval() -> None:
    with pytest.raises(Exception, match="interval"), helm.Chart.load(CHART) as chart:
        chart.validate_schema({"metrics": {"serviceMonitor": {"interval": "soon"}}})
