"""The Helm chart charts/etha-operator, checked offline.

Rendering uses helm-python-sdk (Helm's own Go engine, no cluster); every manifest is
validated with kubernetes-validate in strict mode against the oldest and newest
Kubernetes the chart supports. The expectations (RBAC verbs, operator settings) mirror
the operator contract the operator code follows; the CRD must equal crds/kvnamespace.yaml.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.support.etcd_server import etcd_cluster
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "etha-operator"
RELEASE = "etha"
NAMESPACE = "etha-system"
# kubeVersion in Chart.yaml is >=1.25; validate against both ends of what the validator knows.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

# The operator's settings (OPERATOR-CONTRACT "Operator settings").
CONTRACT_ENV = {
    "ETHA_OPERATOR_MODE",
    "ETHA_OPERATOR_GATEWAY_ENDPOINTS",
    "ETHA_OPERATOR_GATEWAY_CA_FILE",
    "ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT",
    "ETHA_OPERATOR_ETCD_ENDPOINTS",
    "ETHA_OPERATOR_WORKER_ENDPOINTS",
    "ETHA_OPERATOR_ETCD_USERNAME",
    "ETHA_OPERATOR_ETCD_PASSWORD",
    "ETHA_OPERATOR_ETCD_CA_FILE",
    "ETHA_OPERATOR_ETCD_CERT_FILE",
    "ETHA_OPERATOR_ETCD_KEY_FILE",
    "ETHA_OPERATOR_NAMESPACES",
    "ETHA_OPERATOR_WEBHOOK_PORT",
    "ETHA_OPERATOR_WEBHOOK_CERT_FILE",
    "ETHA_OPERATOR_WEBHOOK_KEY_FILE",
    "ETHA_OPERATOR_HEALTH_PORT",
    "ETHA_OPERATOR_AUDIT_INTERVAL",
    "ETHA_OPERATOR_CLEANUP_DEADLINE",
    "ETHA_OPERATOR_LOG_LEVEL",
    "ETHA_OPERATOR_METRICS_PORT",
}

# The Kubernetes API surface the operator uses (OPERATOR-CONTRACT "Kubernetes API surface"):
# (apiGroup, resource) -> verbs.
#: Read-only on each shipped job kind (etha_operator.jobkinds.SHIPPED), nothing more.
JOB_KIND_RULES = {
    ("batch", "jobs"): {"get", "list", "watch"},
    ("jobset.x-k8s.io", "jobsets"): {"get", "list", "watch"},
    ("trainer.kubeflow.org", "trainjobs"): {"get", "list", "watch"},
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch"},
    ("kubeflow.org", "mpijobs"): {"get", "list", "watch"},
    ("ray.io", "rayjobs"): {"get", "list", "watch"},
    ("batch.volcano.sh", "jobs"): {"get", "list", "watch"},
}
NAMESPACED_RULES = {
    # create: the KVNamespace of a job annotated etha.io/kvnamespace: auto.
    ("etha.io", "kvnamespaces"): {"get", "list", "watch", "patch", "create"},
    ("etha.io", "kvnamespaces/status"): {"patch"},
    ("", "secrets"): {"get", "create", "patch", "delete"},
    **JOB_KIND_RULES,
    ("", "events"): {"create"},
}
CLUSTER_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
# Namespaced mode only: kopf watches the listed namespaces' existence, and the orphan
# audit lists KVNamespaces cluster-wide (cluster-wide mode gets both from the rules above).
NAMESPACED_MODE_CLUSTER_RULES = {
    ("", "namespaces"): {"list", "watch"},
    ("etha.io", "kvnamespaces"): {"list"},
}

PRODUCTION = {
    "image": {
        "repository": "registry.example.com/etha/etha-operator",
        "digest": "sha256:" + "a" * 64,
    },
    "watchNamespaces": ["team-a", "team-b"],
    "etcd": {
        "bundled": {"enabled": False},
        "endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"],
        "rootCredentials": {"secretName": "etcd-root", "usernameKey": "user"},
        "tls": {"enabled": True, "secretName": "etcd-client-tls", "clientCert": True},
    },
    "gateway": {
        "replicas": 3,
        "workerEndpoints": ["https://etha-gateway.example.com:443"],
        "etcdCredentials": {"secretName": "etha-gateway-etcd"},
        "tls": {"certManager": {"enabled": True}},
    },
    "webhook": {"certManager": {"enabled": True}},
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "production": PRODUCTION,
    "cert-manager-cluster-issuer": {
        "webhook": {
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"},
            },
            "failurePolicy": "Ignore",
        },
        "etcd": {"bundled": {"persistence": {"enabled": False}}},
    },
    # Direct mode (single-tenant clusters): no gateway, workers get etcd's endpoints.
    "minimal": {
        "mode": "direct",
        "crds": {"install": False},
        "webhook": {"enabled": False},
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "rbac": {"create": False},
        "etcd": {
            "bundled": {"enabled": False},
            "endpoints": ["http://etcd.etcd.svc:2379"],
            "workerEndpoints": ["http://etcd.example.com:2379"],
            "rootCredentials": {"secretName": "etcd-root"},
        },
        "operator": {
            "logLevel": "DEBUG",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "allowUnsafeDirect": True,
        },
    },
    "gateway-plaintext": {
        "gateway": {"tls": {"enabled": False}, "replicas": 2},
        "etcd": {"bundled": {"persistence": {"size": "8Gi"}, "quotaBackendBytes": 4294967296}},
    },
}


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def component(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one ``kind`` object of the component ``name`` (operator, gateway, etcd)."""
    found = [
        d
        for d in by_kind(docs, kind)
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name
    ]
    assert len(found) == 1, f"expected one {kind} of the {name}, got {len(found)}"
    return found[0]


def operator_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return component(docs, "Deployment", "operator")


def gateway_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return component(docs, "Deployment", "gateway")


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, manifests(VALUE_SETS[request.param])


# --- rendering, validation, lint ---------------------------------------------------------


def test_every_manifest_validates_strictly(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    assert docs, name
    unchecked = []
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unchecked.append(doc["kind"])
                break
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{name}: {doc['kind']}/{doc['metadata']['name']} @ {version}: "
                    f"{where}: {exc.message}"
                )
    # Only cert-manager's kinds have no built-in schema; they are checked in their own test.
    assert set(unchecked) <= {"Issuer", "Certificate"}, unchecked


def test_validation_catches_an_unknown_field() -> None:
    """The strict validator is not a no-op: a misspelt field fails."""
    deployment = operator_deployment(manifests())
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean(name: str) -> None:
    for version in ("v" + v for v in KUBE_VERSIONS):
        report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=version)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems, problems
        assert not report["errors"], report["errors"]


def test_lint_reports_a_broken_chart(tmp_path: Path) -> None:
    """Lint can fail: a template with a syntax error is reported as an error."""
    broken = tmp_path / "etha-operator"
    with helm.Chart.load(CHART) as chart:
        chart.save_dir(tmp_path)
    (broken / "templates" / "broken.yaml").write_text("{{ .Values.image.repository\n")
    report = helm.lint(broken)
    assert [m for m in report["messages"] if m["severity"] == 3] or report["errors"]


@pytest.mark.parametrize(
    ("path", "max_line"),
    [
        ("Chart.yaml", 100),
        ("values.yaml", 100),
        # The CRD copy belongs to crds/: CEL rules and descriptions make long lines.
        ("files/crds/kvnamespace.yaml", 160),
    ],
)
def test_plain_yaml_files_pass_yamllint(path: str, max_line: int) -> None:
    """Templates are not YAML before rendering; every other YAML file of the chart is."""
    config = (
        f"{{extends: default, rules: {{line-length: {{max: {max_line}}}, document-start: disable, "
        "comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}"
    )
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-d", config, str(CHART / path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_notes_say_what_to_apply_next() -> None:
    notes = render()[f"{CHART.name}/templates/NOTES.txt"]
    assert "kubectl apply -n <namespace> -f examples/kvnamespace.yaml" in notes
    assert "etha.io/kvnamespace: <kvnamespace name>" in notes
    assert f"rollout status deployment/{RELEASE}-etha-operator" in notes


# --- values schema -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 2}, "replicaCount"),
        ({"operator": {"logLevel": "TRACE"}}, "/operator/logLevel"),
        ({"operator": {"healthPort": "8080"}}, "/operator/healthPort"),
        ({"operator": {"auditIntervall": 60}}, "auditIntervall"),
        ({"webhook": {"failurePolicy": "fail"}}, "/webhook/failurePolicy"),
        ({"webhook": {"timeoutSeconds": 60}}, "/webhook/timeoutSeconds"),
        ({"crds": {"install": "yes"}}, "/crds/install"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"etcd": {"endpoints": ["etcd:2379"]}}, "/etcd/endpoints/0"),
        ({"etcd": {"tls": {"ca": "x"}}}, "ca"),
        ({"etcd": {"bundled": {"enabled": False}}}, "/etcd/endpoints"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"mode": "proxy"}, "/mode"),
        ({"gateway": {"replicas": 1}}, "/gateway/replicas"),
        ({"gateway": {"quotas": {"keys": -1}}}, "/gateway/quotas/keys"),
        ({"gateway": {"etcdSpaceHighWater": 1.5}}, "/gateway/etcdSpaceHighWater"),
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as excinfo:
        chart.validate_schema(values)
    assert complaint in str(excinfo.value)
    # Rendering (what `helm install` does) refuses them too.
    with pytest.raises(helm.HelmError):
        render(values)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_schema_accepts_the_documented_value_sets(name: str) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(VALUE_SETS[name])


def test_schema_forbids_unknown_keys_at_every_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], value: Any, where: str) -> None:
        if not isinstance(value, dict) or "properties" not in node:
            return
        assert node.get("additionalProperties") is False, f"{where or '/'} allows unknown keys"
        assert set(value) <= set(node["properties"]), (
            f"{where}: {set(value) - set(node['properties'])}"
        )
        for key, sub in value.items():
            walk(node["properties"][key], sub, f"{where}/{key}")

    walk(schema, defaults, "")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"etcd": {"endpoints": ["http://x:2379"]}}, "etcd.endpoints must stay empty"),
        ({"etcd": {"tls": {"enabled": True, "secretName": "t"}}}, "bundled etcd serves plain"),
        (
            {
                "etcd": {
                    "bundled": {"enabled": False},
                    "endpoints": ["https://x:2379"],
                    "rootCredentials": {"secretName": "r"},
                    "tls": {"enabled": True},
                }
            },
            "etcd.tls.secretName is required",
        ),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
        (
            {
                "etcd": {
                    "bundled": {"enabled": False},
                    "endpoints": ["https://x:2379"],
                    "rootCredentials": {"secretName": "r"},
                }
            },
            "gateway.etcdCredentials.secretName is required",
        ),
        ({"operator": {"allowUnsafeDirect": True}}, "applies to mode: direct only"),
        ({"etcd": {"workerEndpoints": ["http://x:2379"]}}, "applies to mode: direct only"),
        (
            {"mode": "direct", "gateway": {"workerEndpoints": ["https://g:443"]}},
            "applies to mode: gateway only",
        ),
    ],
)
def test_contradictory_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as excinfo:
        render(values)
    assert message in str(excinfo.value)


# --- the operator Deployment -------------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_deployment_runs_one_replica_recreated_with_probes(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    deployment = operator_deployment(docs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == int(env["ETHA_OPERATOR_HEALTH_PORT"]["value"])
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_operator_env_follows_the_contract(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    deployment = operator_deployment(docs)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert set(env) <= CONTRACT_ENV, set(env) - CONTRACT_ENV
    assert {
        "ETHA_OPERATOR_ETCD_ENDPOINTS",
        "ETHA_OPERATOR_ETCD_PASSWORD",
        "ETHA_OPERATOR_HEALTH_PORT",
        "ETHA_OPERATOR_NAMESPACES",
    } <= set(env)
    # Credentials only by reference, never as a literal in the manifest.
    for secret_var in ("ETHA_OPERATOR_ETCD_USERNAME", "ETHA_OPERATOR_ETCD_PASSWORD"):
        assert "value" not in env[secret_var]
        assert env[secret_var]["valueFrom"]["secretKeyRef"]["name"]
    assert "optional" not in env["ETHA_OPERATOR_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]
    # Every mounted file the env points at exists in a mounted volume.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for var in env.values():
        if var["name"].endswith("_FILE"):
            assert any(var["value"].startswith(m + "/") for m in mounts), var
    webhook_on = VALUE_SETS[name].get("webhook", {}).get("enabled", True)
    assert ("ETHA_OPERATOR_WEBHOOK_CERT_FILE" in env) == webhook_on
    mode = VALUE_SETS[name].get("mode", "gateway")
    assert env["ETHA_OPERATOR_MODE"]["value"] == mode
    # Gateway mode hands workers the gateway; direct mode etcd's worker endpoints.
    assert ("ETHA_OPERATOR_GATEWAY_ENDPOINTS" in env) == (mode == "gateway")
    assert ("ETHA_OPERATOR_WORKER_ENDPOINTS" in env) == (mode == "direct")


def test_production_values_reach_the_operator() -> None:
    docs = manifests(PRODUCTION)
    deployment = operator_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert container["image"] == "registry.example.com/etha/etha-operator@sha256:" + "a" * 64
    assert env["ETHA_OPERATOR_ETCD_ENDPOINTS"]["value"] == (
        "https://etcd-0.etcd:2379,https://etcd-1.etcd:2379"
    )
    assert env["ETHA_OPERATOR_GATEWAY_ENDPOINTS"]["value"] == (
        "https://etha-gateway.example.com:443"
    )
    assert env["ETHA_OPERATOR_NAMESPACES"]["value"] == "team-a,team-b"
    assert env["ETHA_OPERATOR_ETCD_USERNAME"]["valueFrom"]["secretKeyRef"] == {
        "name": "etcd-root",
        "key": "user",
        "optional": True,
    }
    assert env["ETHA_OPERATOR_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "etcd-root",
        "key": "password",
    }
    assert env["ETHA_OPERATOR_ETCD_CA_FILE"]["value"] == "/etc/etha/etcd-tls/ca.crt"
    assert env["ETHA_OPERATOR_ETCD_CERT_FILE"]["value"] == "/etc/etha/etcd-tls/tls.crt"
    assert env["ETHA_OPERATOR_ETCD_KEY_FILE"]["value"] == "/etc/etha/etcd-tls/tls.key"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["etcd-tls"]["secret"]["secretName"] == "etcd-client-tls"
    # No bundled etcd, no generated root or gateway etcd Secret, no NetworkPolicy (the
    # chart cannot select external etcd pods); the bootstrap step only makes the gateway's
    # etcd user, over TLS, without touching auth.
    assert not by_kind(docs, "StatefulSet")
    assert not by_kind(docs, "NetworkPolicy")
    names = {d["metadata"]["name"] for d in by_kind(docs, "Secret")}
    assert not [n for n in names if n.endswith("-root") or n.endswith("-gateway-etcd")]
    (init,) = pod["initContainers"]
    init_env = _env(init)
    assert init_env["ETCD_ENDPOINT"]["value"] == "etcd-0.etcd:2379"
    assert init_env["ETCD_ENABLE_AUTH"]["value"] == "false"
    assert init_env["ETCD_CA_FILE"]["value"] == "/etc/etha/etcd-tls/ca.crt"
    assert init_env["GATEWAY_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "etha-gateway-etcd"
    )
    gateway = gateway_deployment(docs)
    assert gateway["spec"]["replicas"] == 3
    gw_env = _env(gateway["spec"]["template"]["spec"]["containers"][0])
    assert (
        gw_env["ETHA_GATEWAY_ETCD_ENDPOINTS"]["value"]
        == env["ETHA_OPERATOR_ETCD_ENDPOINTS"]["value"]
    )
    assert gw_env["ETHA_GATEWAY_ETCD_CERT_FILE"]["value"] == "/etc/etha/etcd-tls/tls.crt"
    assert gw_env["ETHA_GATEWAY_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "etha-gateway-etcd"
    )


def test_default_values_point_the_operator_at_the_bundled_etcd() -> None:
    docs = manifests()
    deployment = operator_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    env = _env(pod["containers"][0])
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-etcd"))
    url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:2379"
    assert env["ETHA_OPERATOR_ETCD_ENDPOINTS"]["value"] == url
    # Workers get the gateway (TLS), never etcd.
    gateway_service = component(docs, "Service", "gateway")
    assert env["ETHA_OPERATOR_GATEWAY_ENDPOINTS"]["value"] == (
        f"https://{gateway_service['metadata']['name']}.{NAMESPACE}.svc:2379"
    )
    assert "ETHA_OPERATOR_WORKER_ENDPOINTS" not in env
    root_secret = next(
        s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("-root")
    )
    secret_ref = env["ETHA_OPERATOR_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["name"] == root_secret["metadata"]["name"]
    password = base64.b64decode(root_secret["data"][secret_ref["key"]]).decode()
    assert len(password) >= 32
    # The bootstrap init container reaches the same etcd and reads the same Secret.
    (init,) = pod["initContainers"]
    init_env = _env(init)
    assert f"http://{init_env['ETCD_ENDPOINT']['value']}" == url
    assert init_env["ETCD_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret_ref


# --- restricted Pod Security Standard ----------------------------------------------------

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def test_every_pod_meets_the_restricted_pod_security_standard(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    specs = list(pod_specs(docs))
    assert specs, name
    for where, pod in specs:
        pod_ctx = pod.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), (where, flag)
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= ALLOWED_VOLUMES, (where, volume)
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod_ctx.get("runAsUser", 1) != 0, where
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = container["securityContext"]
            cname = f"{where}/{container['name']}"
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, cname
            assert ctx.get("runAsUser", 1) != 0, cname
            assert ctx["allowPrivilegeEscalation"] is False, cname
            assert ctx["readOnlyRootFilesystem"] is True, cname
            assert ctx["capabilities"]["drop"] == ["ALL"], cname
            assert not ctx["capabilities"].get("add"), cname
            assert not ctx.get("privileged"), cname
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", cname
            assert not container.get("ports") or all(
                "hostPort" not in p for p in container["ports"]
            )
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), cname


def test_read_only_root_keeps_a_writable_tmp() -> None:
    pod = operator_deployment(manifests())["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod["initContainers"]:
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in volumes[tmp["name"]]


# --- RBAC --------------------------------------------------------------------------------


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule or rule["resourceNames"]
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource)
                assert key not in granted, f"{key} granted twice"
                granted[key] = set(rule["verbs"])
    return granted


def test_cluster_wide_rbac_grants_exactly_the_contract() -> None:
    docs = manifests()
    role = one(docs, "ClusterRole")
    assert _rules(role) == {**CLUSTER_RULES, **NAMESPACED_RULES}
    assert not by_kind(docs, "Role")
    binding = one(docs, "ClusterRoleBinding")
    account = one(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    pod = operator_deployment(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_namespaced_rbac_grants_the_contract_per_watched_namespace() -> None:
    docs = manifests(PRODUCTION)
    assert _rules(one(docs, "ClusterRole")) == {**CLUSTER_RULES, **NAMESPACED_MODE_CLUSTER_RULES}
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert _rules(role) == NAMESPACED_RULES
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")}
    assert set(bindings) == set(roles)
    for ns, binding in bindings.items():
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[ns]["metadata"]["name"],
        }
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_every_rbac_rule_is_commented() -> None:
    """Each rule's reason is written next to it in the template: why each grant exists."""
    lines = (CHART / "templates" / "rbac.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            assert lines[i - 1].strip().startswith("#"), f"rbac.yaml:{i + 1} has no comment"


def test_rbac_can_be_left_to_the_user() -> None:
    docs = manifests(VALUE_SETS["minimal"])
    assert not [
        d
        for d in docs
        if d["kind"]
        in ("ClusterRole", "Role", "ServiceAccount", "ClusterRoleBinding", "RoleBinding")
    ]
    pod = operator_deployment(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing-sa"


# --- CRD ---------------------------------------------------------------------------------


def test_chart_crd_file_is_generated_from_crds() -> None:
    source = ROOT / "crds" / "kvnamespace.yaml"
    assert source.exists(), "crds/kvnamespace.yaml is missing"
    header, _, body = (CHART / "files" / "crds" / "kvnamespace.yaml").read_bytes().partition(b"\n")
    stale = "the chart's CRD is out of date with crds/kvnamespace.yaml: run `make crds`"
    assert b"`make crds`" in header, stale
    assert body == source.read_bytes(), stale


def test_rendered_crd_equals_crds_plus_the_keep_annotation() -> None:
    source = yaml.safe_load((ROOT / "crds" / "kvnamespace.yaml").read_text())
    crd = one(manifests(), "CustomResourceDefinition")
    annotations = crd["metadata"].pop("annotations")
    assert annotations.pop("helm.sh/resource-policy") == "keep"
    assert annotations == source["metadata"].pop("annotations", {})
    source["metadata"].pop("annotations", None)
    if not crd["metadata"].get("annotations"):
        crd["metadata"].pop("annotations", None)
    assert crd == source


def test_crd_is_rendered_as_a_template_so_upgrades_update_it() -> None:
    assert not (CHART / "crds").exists(), "Helm never upgrades crds/: keep the CRD in templates"
    upgraded = helm.Chart.load(CHART).render(
        None, name=RELEASE, namespace=NAMESPACE, is_upgrade=True, revision=2
    )
    assert "CustomResourceDefinition" in upgraded[f"{CHART.name}/templates/crd.yaml"]
    assert not [
        d
        for d in manifests({"crds": {"install": False}})
        if d["kind"] == "CustomResourceDefinition"
    ]


# --- admission webhook -------------------------------------------------------------------


def _webhook_secret(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        s
        for s in by_kind(docs, "Secret")
        if s["type"] == "kubernetes.io/tls" and s["metadata"]["name"].endswith("-webhook-tls")
    )


def _webhook(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The webhook of labelled pods (the others are for auto jobs' pods)."""
    config = one(docs, "MutatingWebhookConfiguration")
    hooks: list[dict[str, Any]] = config["webhooks"]
    assert hooks[0]["name"] == "pods.kvnamespaces.etha.io"
    assert all(h["name"].startswith("auto-") for h in hooks[1:])
    return hooks[0]


def test_webhook_selects_labelled_pods_on_create(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    if not VALUE_SETS[name].get("webhook", {}).get("enabled", True):
        assert not by_kind(docs, "MutatingWebhookConfiguration")
        return
    hook = _webhook(docs)
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": "etha.io/kvnamespace", "operator": "Exists"}]
    }
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "operations": ["CREATE"],
            "scope": "Namespaced",
        }
    ]
    assert hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] <= 10
    expected_policy = VALUE_SETS[name].get("webhook", {}).get("failurePolicy", "Fail")
    assert hook["failurePolicy"] == expected_policy
    # The Service routes to the operator pod's webhook port.
    service_ref = hook["clientConfig"]["service"]
    service = next(
        s for s in by_kind(docs, "Service") if s["metadata"]["name"] == service_ref["name"]
    )
    assert service_ref["namespace"] == service["metadata"]["namespace"] == NAMESPACE
    (port,) = service["spec"]["ports"]
    assert port["port"] == service_ref["port"]
    deployment = operator_deployment(docs)
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    webhook_port = next(p for p in container["ports"] if p["name"] == port["targetPort"])
    assert webhook_port["containerPort"] == int(
        _env(container)["ETHA_OPERATOR_WEBHOOK_PORT"]["value"]
    )


def test_webhook_only_sees_watched_namespaces() -> None:
    hook = _webhook(manifests(PRODUCTION))
    assert hook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
        ]
    }
    assert "namespaceSelector" not in _webhook(manifests())


def test_self_signed_certificate_matches_ca_bundle_and_service() -> None:
    docs = manifests()
    hook = _webhook(docs)
    secret = _webhook_secret(docs)
    ca_pem = base64.b64decode(hook["clientConfig"]["caBundle"])
    assert ca_pem == base64.b64decode(secret["data"]["ca.crt"])
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    # The serving certificate is signed by the CA the API server is told to trust.
    public_key = ca.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    if isinstance(public_key, rsa.RSAPublicKey):
        assert cert.signature_hash_algorithm is not None
        public_key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
    assert cert.issuer == ca.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = hook["clientConfig"]["service"]
    assert f"{service['name']}.{service['namespace']}.svc" in names.get_values_for_type(
        x509.DNSName
    )
    # The operator mounts exactly this Secret.
    pod = operator_deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "webhook-tls")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def _tls_echo(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> bytes:
    """One TLS connection over loopback: the client sends 5 bytes, the server echoes them."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except (OSError, ssl.SSLError):
            pass  # the client's verdict is what the tests assert on

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            tls.sendall(b"hello")
            return tls.recv(5)
    finally:
        listener.close()
        thread.join(timeout=10)


def _serving(secret: dict[str, Any], workdir: Path) -> ssl.SSLContext:
    """A server context with the TLS Secret's pair, loaded the way kopf's server does."""
    for key in ("tls.crt", "tls.key"):
        (workdir / key).write_bytes(base64.b64decode(secret["data"][key]))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(workdir / "tls.crt", workdir / "tls.key")
    return context


def test_self_signed_pair_serves_tls_that_the_ca_bundle_verifies(tmp_path: Path) -> None:
    """A real TLS handshake: the server loads the Secret's pair the way kopf's webhook
    server does (ssl load_cert_chain); the client trusts only the webhook's caBundle and
    checks the Service's DNS name, as the API server does."""
    docs = manifests()
    hook = _webhook(docs)
    secret = _webhook_secret(docs)
    server_ctx = _serving(secret, tmp_path)
    client_ctx = ssl.create_default_context(
        cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
    )
    service = hook["clientConfig"]["service"]
    hostname = f"{service['name']}.{service['namespace']}.svc"
    assert _tls_echo(server_ctx, client_ctx, hostname) == b"hello"
    # The same client refuses a name the certificate does not cover.
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_echo(server_ctx, client_ctx, "evil.example.com")


def _secrets(rendered_files: dict[str, str]) -> dict[str, dict[str, Any]]:
    docs = [
        d
        for path, text in rendered_files.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}


def test_upgrade_reuses_the_live_webhook_pair_and_root_password(tmp_path: Path) -> None:
    """Generated secrets are made once: an upgrade reads them back with ``lookup``.

    Helm's cluster-aware render runs against the Kubernetes API emulator holding the
    Secrets of a first install.
    """
    from tests.support.kube_emulator import EmulatorServer

    with helm.Chart.load(CHART) as chart:
        installed = _secrets(chart.render(None, name=RELEASE, namespace=NAMESPACE, is_install=True))
        # The webhook pair, the bundled etcd's root password, and the gateway's signing
        # key, etcd password and serving pair.
        assert len(installed) == 5, sorted(installed)
        with EmulatorServer() as kube:
            for secret in installed.values():
                kube.create("v1", "secrets", secret, namespace=NAMESPACE)
            with helm.Config(
                kubeconfig_path=kube.write_kubeconfig(tmp_path / "kubeconfig"), namespace=NAMESPACE
            ) as config:
                upgraded = _secrets(
                    config.render(
                        chart, None, name=RELEASE, namespace=NAMESPACE, is_upgrade=True, revision=2
                    )
                )
        fresh = _secrets(chart.render(None, name=RELEASE, namespace=NAMESPACE, is_install=True))
    assert set(upgraded) == set(installed)
    for name, secret in installed.items():
        assert upgraded[name]["data"] == secret["data"], f"{name} was regenerated"
        # Without a live Secret the chart does generate new material (so the check bites).
        assert fresh[name]["data"] != secret["data"], name


def test_cert_manager_mode_injects_the_ca_from_the_certificate(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    cert_manager = VALUE_SETS[name].get("webhook", {}).get("certManager", {})
    if not cert_manager.get("enabled"):
        assert not by_kind(docs, "Certificate")
        return
    config = one(docs, "MutatingWebhookConfiguration")
    certificate = component(docs, "Certificate", "operator")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    )
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    # No chart-generated pair competes with cert-manager's Secret.
    assert not [
        s
        for s in by_kind(docs, "Secret")
        if s["metadata"]["name"] == certificate["spec"]["secretName"]
    ]
    pod = operator_deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "webhook-tls")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    service = config["webhooks"][0]["clientConfig"]["service"]
    assert f"{service['name']}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    issuer_ref = certificate["spec"]["issuerRef"]
    wanted = cert_manager.get("issuerRef")
    if wanted:
        assert issuer_ref["name"] == wanted["name"] and issuer_ref["kind"] == wanted["kind"]
        assert not by_kind(docs, "Issuer")
    else:
        issuer = component(docs, "Issuer", "operator")
        assert issuer["spec"] == {"selfSigned": {}}
        assert issuer_ref["name"] == issuer["metadata"]["name"]
    for doc in [*by_kind(docs, "Issuer"), certificate]:
        assert doc["apiVersion"] == "cert-manager.io/v1"
        assert doc["metadata"]["namespace"] == NAMESPACE


# --- bundled etcd ------------------------------------------------------------------------


def test_bundled_etcd_is_a_single_pinned_member() -> None:
    docs = manifests()
    statefulset = one(docs, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    repository, tag = container["image"].rsplit(":", 1)
    assert repository == "quay.io/coreos/etcd" and tag.startswith("v3.5.")
    args = container["args"]
    assert "--initial-cluster-state=new" in args
    service = next(
        s
        for s in by_kind(docs, "Service")
        if s["metadata"]["name"] == statefulset["spec"]["serviceName"]
    )
    assert service["spec"]["clusterIP"] == "None"
    assert (
        f"--advertise-client-urls=http://{service['metadata']['name']}.{NAMESPACE}.svc:2379" in args
    )
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert not statefulset["spec"]["template"]["spec"]["automountServiceAccountToken"]


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_bundled_etcd_listens_on_the_pod_ip_and_survives_its_alarms() -> None:
    statefulset = one(manifests(), "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    # The pod IP (expanded by Kubernetes from the downward API), never every interface.
    env = _env(container)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert _flag(args, "listen-client-urls") == "http://$(POD_IP):2379"
    assert _flag(args, "listen-metrics-urls") == "http://$(POD_IP):2381"
    assert not [a for a in args if "0.0.0.0" in a]
    # The backend quota is below the volume (a quarter of it stays for WAL and snapshots).
    quota = int(_flag(args, "quota-backend-bytes"))
    assert 0 < quota * 4 <= 2 * 1024**3 * 3
    # Auto-compaction is on.
    assert _flag(args, "auto-compaction-mode") == "periodic"
    assert _flag(args, "auto-compaction-retention")
    # Liveness ignores NOSPACE (a restart frees no space); readiness does not.
    liveness = container["livenessProbe"]["httpGet"]["path"]
    assert "exclude=NOSPACE" in liveness
    assert "exclude" not in container["readinessProbe"]["httpGet"]["path"]
    # The gateway's space guard uses the same quota.
    gw_env = _env(gateway_deployment(manifests())["spec"]["template"]["spec"]["containers"][0])
    assert int(gw_env["ETHA_GATEWAY_ETCD_QUOTA_BACKEND_BYTES"]["value"]) == quota


def test_a_quota_that_would_fill_the_volume_is_refused() -> None:
    values = {"etcd": {"bundled": {"quotaBackendBytes": 2 * 1024**3}}}
    with pytest.raises(helm.HelmRenderError) as excinfo:
        render(values)
    assert "etcd.bundled.quotaBackendBytes" in str(excinfo.value)
    assert "grow the volume" in str(excinfo.value)


def test_bundled_etcd_without_persistence_uses_an_empty_dir() -> None:
    docs = manifests({"etcd": {"bundled": {"persistence": {"enabled": False}}}})
    statefulset = one(docs, "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "data", "emptyDir": {"sizeLimit": "2Gi"}}]


def test_bundled_etcd_uses_an_existing_root_secret_when_named() -> None:
    docs = manifests({"etcd": {"rootCredentials": {"secretName": "my-root"}}})
    assert not [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("-root")]
    pod = operator_deployment(docs)["spec"]["template"]["spec"]
    env = _env(pod["initContainers"][0])
    assert env["ETCD_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "my-root"


def _bootstrap_script(tmp_path: Path) -> Path:
    """The script exactly as the chart ships it in its ConfigMap."""
    configmap = next(
        c for c in by_kind(manifests(), "ConfigMap") if c["metadata"]["name"].endswith("-bootstrap")
    )
    script = tmp_path / "bootstrap_etcd_auth.py"
    script.write_text(configmap["data"]["bootstrap_etcd_auth.py"])
    return script


def _run_bootstrap(
    script: Path, endpoint: str, password: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        ETCD_ENDPOINT=endpoint,
        ETCD_ROOT_PASSWORD=password,
        BOOTSTRAP_TIMEOUT="20",
        **extra,
    )
    env.pop("ETCD_ROOT_USER", None)
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=90
    )


def test_bootstrap_enables_auth_on_a_real_etcd_idempotently(tmp_path: Path) -> None:
    script = _bootstrap_script(tmp_path)
    password = "bootstrap-test-secret-9f3a"
    with etcd_cluster(tmp_path / "etcd") as cluster:
        endpoint = cluster.endpoints[0]
        assert cluster.etcdctl("put", "probe", "1", auth=False, check=False).returncode == 0

        first = _run_bootstrap(script, endpoint, password)
        assert first.returncode == 0, first.stderr
        assert "auth enabled" in first.stderr
        # Anonymous access is now refused; root with the Secret's password works.
        denied = cluster.etcdctl("get", "probe", auth=False, check=False)
        assert denied.returncode != 0
        allowed = cluster.etcdctl(
            "get", "probe", f"--user=root:{password}", auth=False, check=False
        )
        assert allowed.returncode == 0 and "probe" in allowed.stdout, allowed.stderr

        again = _run_bootstrap(script, endpoint, password)
        assert again.returncode == 0, again.stderr
        assert "auth already enabled" in again.stderr and "created" not in again.stderr

        wrong = _run_bootstrap(script, endpoint, "not-the-password")
        assert wrong.returncode == 1
        assert "cannot log in" in wrong.stderr
        for result in (first, again, wrong):
            assert password not in result.stdout + result.stderr
            assert "not-the-password" not in result.stdout + result.stderr


def test_bootstrap_makes_the_gateway_user_with_exactly_two_ranges(tmp_path: Path) -> None:
    """Against a real etcd: the gateway's user may write tenant keys and read the
    registry, and nothing else; a stray permission is removed on the next run."""
    from pyetcd import etcdrpc
    from pyetcd.etcdrpc import auth_pb2

    from etha.gateway.tenancy import REGISTRY_PREFIX, TENANT_KEYSPACE, TENANTS_PREFIX
    from etha.kvstore.errors import PermissionDeniedError
    from etha.kvstore.etcd_client import EtcdClient

    script = _bootstrap_script(tmp_path)
    password, gw_password = "bootstrap-root-5c1d", "bootstrap-gateway-77ab"
    extra = {"GATEWAY_ETCD_USER": "etha-gateway", "GATEWAY_ETCD_PASSWORD": gw_password}
    with etcd_cluster(tmp_path / "etcd") as cluster:
        endpoint = cluster.endpoints[0]
        first = _run_bootstrap(script, endpoint, password, **extra)
        assert first.returncode == 0, first.stderr
        assert "created gateway user" in first.stderr
        with EtcdClient(cluster.endpoints, username="root", password=password) as root:
            root.put(TENANTS_PREFIX + b"etha-x", b"{}")
            role = root.call("Auth", "RoleGet", etcdrpc.AuthRoleGetRequest(role="etha-gateway"))
            assert {(p.permType, p.key, p.range_end) for p in role.perm} == {
                (auth_pb2.Permission.READWRITE, *TENANT_KEYSPACE),
                (auth_pb2.Permission.READ, REGISTRY_PREFIX, b"!etha/registry0"),
            }
            user = root.call("Auth", "UserGet", etcdrpc.AuthUserGetRequest(name="etha-gateway"))
            assert list(user.roles) == ["etha-gateway"]
            # A stray grant (say, added by hand) is taken away by the next run.
            stray = auth_pb2.Permission(
                permType=auth_pb2.Permission.READ, key=b"\0", range_end=b"\0"
            )
            root.call(
                "Auth",
                "RoleGrantPermission",
                etcdrpc.AuthRoleGrantPermissionRequest(name="etha-gateway", perm=stray),
            )
        again = _run_bootstrap(script, endpoint, password, **extra)
        assert again.returncode == 0, again.stderr
        with EtcdClient(cluster.endpoints, username="etha-gateway", password=gw_password) as gw:
            gw.put(b"team.job.1234/default/k", b"v")
            gw.put(b"-", b"lowest key of the keyspace")
            assert gw.range(TENANTS_PREFIX + b"etha-x").count == 1
            for key in (TENANTS_PREFIX + b"etha-y", b"+below", b"\x7f", b"\x7fabove", b"!etha/x"):
                with pytest.raises(PermissionDeniedError):
                    gw.put(key, b"v")
            with pytest.raises(PermissionDeniedError):
                gw.range(b"\0", b"-")
        for result in (first, again):
            assert password not in result.stderr and gw_password not in result.stderr


def test_bootstrap_gives_up_when_etcd_never_answers(tmp_path: Path) -> None:
    script = _bootstrap_script(tmp_path)
    env = dict(
        os.environ,
        ETCD_ENDPOINT=f"127.0.0.1:{free_port()}",
        ETCD_ROOT_PASSWORD="x",
        BOOTSTRAP_TIMEOUT="1",
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1
    assert "did not answer" in result.stderr


# --- the gateway --------------------------------------------------------------------------


def test_gateway_runs_replicated_probed_and_spread(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    if VALUE_SETS[name].get("mode") == "direct":
        assert not [d for d in docs if d["metadata"]["name"].endswith("-gateway")]
        return
    deployment = gateway_deployment(docs)
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # no Kubernetes API access at all
    (container,) = pod["containers"]
    assert container["command"] == ["etha-gateway"]
    assert (
        container["image"]
        == operator_deployment(docs)["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = _env(container)
    assert env["ETHA_GATEWAY_LISTEN"]["value"].endswith(f":{ports['grpc']}")
    assert int(env["ETHA_GATEWAY_METRICS_PORT"]["value"]) == ports["metrics"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # Credentials only by reference; every file it reads is mounted.
    for var in ("ETHA_GATEWAY_ETCD_USERNAME", "ETHA_GATEWAY_ETCD_PASSWORD"):
        assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["name"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for var in env.values():
        if var["name"].endswith("_FILE"):
            assert any(var["value"].startswith(m + "/") for m in mounts), var
    # Preferred anti-affinity on the node: one replica per node when the cluster allows.
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    # The Service reaches the gateway pods on both ports.
    service = component(docs, "Service", "gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    # The PodDisruptionBudget keeps one up through drains, and selects exactly these pods.
    pdb = component(docs, "PodDisruptionBudget", "gateway")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # The signing key Secret exists (or is the one mounted) and holds a long random key.
    token = next(v for v in pod["volumes"] if v["name"] == "token-key")["secret"]["secretName"]
    secret = next(s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == token)
    assert len(base64.b64decode(secret["data"]["keys"])) >= 64


def test_network_policy_admits_only_gateway_and_operator_to_etcd(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    values = VALUE_SETS[name]
    bundled = values.get("etcd", {}).get("bundled", {}).get("enabled", True)
    if not bundled or values.get("mode") == "direct":
        assert not by_kind(docs, "NetworkPolicy")
        return
    policy = one(docs, "NetworkPolicy")
    etcd_pod = one(docs, "StatefulSet")["spec"]["template"]
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= etcd_pod["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    container = etcd_pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    by_port: dict[str, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            by_port[port["port"]] = rule.get("from", [])
    assert set(by_port) == {"client", "metrics"} and ports["client"] == 2379
    admitted = by_port["client"]
    assert admitted, "the client port must not be open to every pod"
    selected = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in by_kind(docs, "Deployment")
        if any(
            peer["podSelector"]["matchLabels"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
            for peer in admitted
        )
    ]
    assert sorted(labels["app.kubernetes.io/component"] for labels in selected) == [
        "gateway",
        "operator",
    ]
    for peer in admitted:  # same namespace only, no ipBlock, no namespaceSelector
        assert set(peer) == {"podSelector"}
    # A worker pod (labelled for a KVNamespace) matches none of them.
    worker = {"etha.io/kvnamespace": "train", "app.kubernetes.io/name": "etha-operator"}
    assert not [p for p in admitted if p["podSelector"]["matchLabels"].items() <= worker.items()]
    assert by_port["metrics"] == []  # health and metrics only, no data


def test_gateway_tls_ca_reaches_the_operator_and_verifies_the_gateway(tmp_path: Path) -> None:
    docs = manifests()
    gw_pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    tls_name = next(v for v in gw_pod["volumes"] if v["name"] == "gateway-tls")["secret"][
        "secretName"
    ]
    secret = next(s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == tls_name)
    # The operator mounts only the CA of that Secret and names it in its settings.
    op_pod = operator_deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in op_pod["volumes"] if v["name"] == "gateway-ca")
    assert volume["secret"]["secretName"] == tls_name
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    op_env = _env(op_pod["containers"][0])
    assert op_env["ETHA_OPERATOR_GATEWAY_CA_FILE"]["value"] == "/etc/etha/gateway-ca/ca.crt"
    # A real handshake: the gateway's pair, verified by that CA under the Service name the
    # operator hands to workers.
    server_ctx = _serving(secret, tmp_path)
    client_ctx = ssl.create_default_context(
        cadata=base64.b64decode(secret["data"]["ca.crt"]).decode()
    )
    endpoint = op_env["ETHA_OPERATOR_GATEWAY_ENDPOINTS"]["value"]
    assert endpoint.startswith("https://")
    hostname = endpoint.removeprefix("https://").rsplit(":", 1)[0]
    assert _tls_echo(server_ctx, client_ctx, hostname) == b"hello"
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_echo(server_ctx, client_ctx, "etcd.example.com")


def test_gateway_without_tls_gives_workers_plain_endpoints() -> None:
    docs = manifests(VALUE_SETS["gateway-plaintext"])
    op_env = _env(operator_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    assert op_env["ETHA_OPERATOR_GATEWAY_ENDPOINTS"]["value"].startswith("http://")
    assert "ETHA_OPERATOR_GATEWAY_CA_FILE" not in op_env
    gw_env = _env(gateway_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    assert "ETHA_GATEWAY_TLS_CERT_FILE" not in gw_env
    assert not [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("gateway-tls")]


def test_gateway_certificate_from_cert_manager() -> None:
    docs = manifests(PRODUCTION)
    certificate = component(docs, "Certificate", "gateway")
    service = component(docs, "Service", "gateway")
    assert f"{service['metadata']['name']}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    op_pod = operator_deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in op_pod["volumes"] if v["name"] == "gateway-ca")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert not [
        s
        for s in by_kind(docs, "Secret")
        if s["metadata"]["name"] == certificate["spec"]["secretName"]
    ]


def test_direct_mode_with_the_bundled_etcd_has_no_gateway_and_no_policy() -> None:
    docs = manifests({"mode": "direct", "operator": {"allowUnsafeDirect": True}})
    assert not [d for d in docs if "gateway" in d["metadata"]["name"]]
    assert not by_kind(docs, "NetworkPolicy") and not by_kind(docs, "PodDisruptionBudget")
    env = _env(operator_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    assert env["ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT"]["value"] == "true"
    assert (
        env["ETHA_OPERATOR_WORKER_ENDPOINTS"]["value"]
        == env["ETHA_OPERATOR_ETCD_ENDPOINTS"]["value"]
    )


def test_every_variable_the_chart_sets_is_read_by_the_gateway() -> None:
    from etha.gateway import settings as gateway_settings

    read = {
        value
        for name, value in vars(gateway_settings).items()
        if name.isupper() and isinstance(value, str) and value.startswith(gateway_settings.P)
    } | set(gateway_settings.QUOTA_VARIABLES.values())
    for name, values in VALUE_SETS.items():
        if values.get("mode") == "direct":
            continue
        container = gateway_deployment(manifests(values))["spec"]["template"]["spec"]["containers"][
            0
        ]
        assert set(_env(container)) <= read, (name, set(_env(container)) - read)


# --- agreement with the operator's code --------------------------------------------------


def test_webhook_path_is_the_operator_handler_path() -> None:
    """kopf serves a mutating handler at /<handler id>; the chart must call that path."""
    from etha_operator import handlers

    hook = _webhook(manifests())
    assert hook["clientConfig"]["service"]["path"] == f"/{handlers.WEBHOOK_ID}"


def test_every_variable_the_chart_sets_is_read_by_the_operator() -> None:
    from etha_operator import settings

    read = {
        value
        for name, value in vars(settings).items()
        if name.isupper() and isinstance(value, str) and value.startswith(settings.PREFIX)
    }
    for values in VALUE_SETS.values():
        container = operator_deployment(manifests(values))["spec"]["template"]["spec"][
            "containers"
        ][0]
        assert set(_env(container)) <= read, set(_env(container)) - read
    assert read >= CONTRACT_ENV, CONTRACT_ENV - read


# --- job kinds ---------------------------------------------------------------------------

CUSTOM_KIND = {
    "group": "ml.example.com",
    "version": "v1",
    "kind": "TrainingRun",
    "plural": "trainingruns",
    "podLabel": "ml.example.com/run",
    "ended": [
        {"field": "status.outcome", "values": ["Done"], "outcome": "Succeeded"},
        {"conditionType": "Crashed", "status": "True", "outcome": "Failed"},
    ],
}


def _job_ref_schema(crd: dict[str, Any]) -> dict[str, Any]:
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    job_ref: dict[str, Any] = spec["properties"]["jobRef"]
    return job_ref


def test_chart_ships_the_operators_job_kind_table() -> None:
    from etha_operator.jobkinds import SHIPPED

    shipped = json.loads((CHART / "files" / "jobkinds.json").read_text())
    assert shipped == [kind.to_json() for kind in SHIPPED]


def test_a_custom_job_kind_renders_into_rbac_crd_and_operator_settings() -> None:

    docs = manifests({"jobKinds": {"extra": [CUSTOM_KIND]}})
    granted = _rules(one(docs, "ClusterRole"))
    assert granted == {
        **CLUSTER_RULES,
        **NAMESPACED_RULES,
        ("ml.example.com", "trainingruns"): {"get", "list", "watch"},
    }
    job_ref = _job_ref_schema(one(docs, "CustomResourceDefinition"))
    assert "ml.example.com/v1" in job_ref["properties"]["apiVersion"]["enum"]
    assert "TrainingRun" in job_ref["properties"]["kind"]["enum"]
    [pair_rule] = [r for r in job_ref["x-kubernetes-validations"] if "self.kind" in r["rule"]]
    assert (
        "(self.apiVersion == 'ml.example.com/v1' && self.kind == 'TrainingRun')"
        in (pair_rule["rule"])
    )
    assert "(self.apiVersion == 'batch/v1' && self.kind == 'Job')" in pair_rule["rule"]

    # The operator, given the rendered environment, follows the new rule.
    kinds = _operator_job_kinds(docs)
    rule = kinds.get("ml.example.com/v1", "TrainingRun")
    assert rule is not None and rule.pod_label == "ml.example.com/run"
    assert rule.end({"status": {"outcome": "Done"}}) == ("Done", "Succeeded")
    assert rule.end({"status": {"conditions": [{"type": "Crashed", "status": "True"}]}}) == (
        "Crashed",
        "Failed",
    )
    assert rule.end({"status": {"outcome": "Running"}}) is None
    assert kinds.get("ray.io/v1", "RayJob") is not None  # the shipped ones stay


def test_default_rbac_grants_no_job_kind_beyond_the_shipped_table() -> None:
    granted = _rules(one(manifests(), "ClusterRole"))
    readonly = {key for key, verbs in granted.items() if verbs == {"get", "list", "watch"}}
    assert readonly == set(JOB_KIND_RULES)


def test_an_extra_kind_replacing_a_shipped_one_is_granted_once() -> None:
    volcano = {
        "group": "batch.volcano.sh",
        "version": "v1alpha1",
        "kind": "Job",
        "plural": "jobs",
        "ended": [{"field": "status.state.phase", "values": ["Completed"], "outcome": "Succeeded"}],
    }
    docs = manifests({"jobKinds": {"extra": [volcano]}})
    assert _rules(one(docs, "ClusterRole")) == {**CLUSTER_RULES, **NAMESPACED_RULES}
    job_ref = _job_ref_schema(one(docs, "CustomResourceDefinition"))
    assert job_ref["properties"]["kind"]["enum"].count("Job") == 1


@pytest.mark.parametrize(
    "bad",
    [
        {**CUSTOM_KIND, "plural": "Training Runs"},
        {**CUSTOM_KIND, "ended": []},
        {**CUSTOM_KIND, "surprise": 1},
    ],
)
def test_malformed_job_kinds_are_refused_by_the_schema(bad: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="jobKinds"):
        render({"jobKinds": {"extra": [bad]}})


def test_auto_webhooks_select_each_job_kinds_pod_label_and_never_block() -> None:
    def auto_hooks(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        config = one(manifests(values), "MutatingWebhookConfiguration")
        found = {}
        for hook in config["webhooks"][1:]:
            exprs = hook["objectSelector"]["matchExpressions"]
            assert exprs[1] == {"key": "etha.io/kvnamespace", "operator": "DoesNotExist"}
            assert exprs[0]["operator"] == "Exists"
            found[exprs[0]["key"]] = hook
        return found

    hooks = auto_hooks()
    from etha_operator.jobkinds import SHIPPED

    assert set(hooks) == {k.pod_label for k in SHIPPED if k.pod_label}
    assert {h["failurePolicy"] for h in hooks.values()} == {"Ignore"}
    assert {h["clientConfig"]["service"]["path"] for h in hooks.values()} == {"/mutate-pods"}
    custom = auto_hooks({"jobKinds": {"extra": [CUSTOM_KIND]}})
    assert set(custom) == set(hooks) | {"ml.example.com/run"}
    assert auto_hooks({"webhook": {"auto": {"enabled": False}}}) == {}


def _operator_job_kinds(docs: list[dict[str, Any]]) -> Any:
    """The job kinds the operator follows, given the rendered Deployment's environment."""
    from etha_operator.settings import load_settings

    container = operator_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    env = {
        e["name"]: e["value"]
        for e in container["env"]
        if "value" in e and not e["name"].endswith("_FILE")  # files live in the pod
    }
    env.setdefault("ETHA_OPERATOR_ETCD_PASSWORD", "x")
    env["ETHA_OPERATOR_GATEWAY_ENDPOINTS"] = "http://etha-gateway:2379"
    return load_settings(env).job_kinds


def test_shipped_kinds_default_to_all_of_them() -> None:
    from etha_operator.jobkinds import SHIPPED

    names = [k.resource for k in SHIPPED]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["jobKinds"]["shipped"] == names
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["jobKinds"]["properties"]["shipped"]["items"]["enum"] == names
    docs = manifests()
    env = _env(operator_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    assert "ETHA_OPERATOR_SHIPPED_JOB_KINDS" not in env  # the operator's default: all
    assert [k.key for k in _operator_job_kinds(docs)] == [k.key for k in SHIPPED]


@pytest.mark.parametrize("watch", [None, ["team-a"]])
def test_restricting_the_shipped_kinds_narrows_rbac_crd_webhook_and_operator(
    watch: list[str] | None,
) -> None:
    """Least privilege: jobs.batch and jobsets only. No grant on the other kinds (in any
    Role), the CRD refuses them, no auto webhook for their pod labels, and the operator
    follows exactly these two."""
    values: dict[str, Any] = {"jobKinds": {"shipped": ["jobsets.jobset.x-k8s.io", "jobs.batch"]}}
    if watch:
        values["watchNamespaces"] = watch
    docs = manifests(values)
    granted: dict[tuple[str, str], set[str]] = {}
    for role in [*by_kind(docs, "ClusterRole"), *by_kind(docs, "Role")]:
        for key, verbs in _rules(role).items():
            granted.setdefault(key, set()).update(verbs)
    others = set(JOB_KIND_RULES) - {("batch", "jobs"), ("jobset.x-k8s.io", "jobsets")}
    assert not others & set(granted), others & set(granted)
    assert granted[("batch", "jobs")] == granted[("jobset.x-k8s.io", "jobsets")]
    assert granted[("batch", "jobs")] == {"get", "list", "watch"}

    job_ref = _job_ref_schema(one(docs, "CustomResourceDefinition"))
    assert job_ref["properties"]["apiVersion"]["enum"] == ["batch/v1", "jobset.x-k8s.io/v1alpha2"]
    assert job_ref["properties"]["kind"]["enum"] == ["Job", "JobSet"]
    [pair_rule] = [r for r in job_ref["x-kubernetes-validations"] if "self.kind" in r["rule"]]
    assert pair_rule["rule"] == (
        "(self.apiVersion == 'batch/v1' && self.kind == 'Job') || "
        "(self.apiVersion == 'jobset.x-k8s.io/v1alpha2' && self.kind == 'JobSet')"
    )

    config = one(docs, "MutatingWebhookConfiguration")
    labels = {h["objectSelector"]["matchExpressions"][0]["key"] for h in config["webhooks"][1:]}
    assert labels == {"batch.kubernetes.io/job-name", "jobset.sigs.k8s.io/jobset-name"}

    kinds = _operator_job_kinds(docs)
    assert [k.key for k in kinds] == [("batch/v1", "Job"), ("jobset.x-k8s.io/v1alpha2", "JobSet")]


def test_no_shipped_kind_and_a_custom_one_grants_only_the_custom_one() -> None:
    docs = manifests({"jobKinds": {"shipped": [], "extra": [CUSTOM_KIND]}})
    readonly = {
        key
        for key, verbs in _rules(one(docs, "ClusterRole")).items()
        if verbs == {"get", "list", "watch"}
    }
    assert readonly == {("ml.example.com", "trainingruns")}
    assert [k.kind for k in _operator_job_kinds(docs)] == ["TrainingRun"]


@pytest.mark.parametrize(
    ("shipped", "message"),
    [
        (["rayjobs"], "jobKinds"),  # not a <plural>.<group> of a shipped kind
        (["jobs.batch", "jobs.batch"], "jobKinds"),  # twice
        ([], "no job kinds"),
    ],
)
def test_bad_shipped_kinds_are_refused(shipped: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        render({"jobKinds": {"shipped": shipped}})
