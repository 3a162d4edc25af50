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

from tests.support.etcd_server import EtcdCluster
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
}

# The Kubernetes API surface the operator uses (OPERATOR-CONTRACT "Kubernetes API surface"):
# (apiGroup, resource) -> verbs.
NAMESPACED_RULES = {
    ("etha.io", "kvnamespaces"): {"get", "list", "watch", "patch"},
    ("etha.io", "kvnamespaces/status"): {"patch"},
    ("", "secrets"): {"get", "create", "patch", "delete"},
    ("batch", "jobs"): {"get", "list", "watch"},
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
        "workerEndpoints": ["https://etcd.example.com:2379"],
        "rootCredentials": {"secretName": "etcd-root", "usernameKey": "user"},
        "tls": {"enabled": True, "secretName": "etcd-client-tls", "clientCert": True},
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
    "minimal": {
        "crds": {"install": False},
        "webhook": {"enabled": False},
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "rbac": {"create": False},
        "etcd": {
            "bundled": {"enabled": False},
            "endpoints": ["http://etcd.etcd.svc:2379"],
            "rootCredentials": {"secretName": "etcd-root"},
        },
        "operator": {"logLevel": "DEBUG", "nodeSelector": {"kubernetes.io/os": "linux"}},
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
    deployment = one(manifests(), "Deployment")
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
    deployment = one(docs, "Deployment")
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
    deployment = one(docs, "Deployment")
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


def test_production_values_reach_the_operator() -> None:
    docs = manifests(PRODUCTION)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert container["image"] == "registry.example.com/etha/etha-operator@sha256:" + "a" * 64
    assert env["ETHA_OPERATOR_ETCD_ENDPOINTS"]["value"] == (
        "https://etcd-0.etcd:2379,https://etcd-1.etcd:2379"
    )
    assert env["ETHA_OPERATOR_WORKER_ENDPOINTS"]["value"] == "https://etcd.example.com:2379"
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
    # No bundled etcd, no generated root Secret, no bootstrap step.
    assert not by_kind(docs, "StatefulSet")
    assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-root")]
    assert "initContainers" not in pod


def test_default_values_point_the_operator_at_the_bundled_etcd() -> None:
    docs = manifests()
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = _env(pod["containers"][0])
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-etcd"))
    url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:2379"
    assert env["ETHA_OPERATOR_ETCD_ENDPOINTS"]["value"] == url
    assert env["ETHA_OPERATOR_WORKER_ENDPOINTS"]["value"] == url
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
    pod = one(manifests(), "Deployment")["spec"]["template"]["spec"]
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
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
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
    """Each rule's reason is written next to it in the template (issue 4)."""
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
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing-sa"


# --- CRD ---------------------------------------------------------------------------------


def test_chart_crd_file_is_a_byte_copy_of_crds() -> None:
    source = ROOT / "crds" / "kvnamespace.yaml"
    assert source.exists(), "crds/kvnamespace.yaml is missing"
    assert (CHART / "files" / "crds" / "kvnamespace.yaml").read_bytes() == source.read_bytes(), (
        "re-copy: cp crds/kvnamespace.yaml charts/etha-operator/files/crds/kvnamespace.yaml"
    )


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


def _webhook(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config = one(docs, "MutatingWebhookConfiguration")
    hooks: list[dict[str, Any]] = config["webhooks"]
    assert len(hooks) == 1
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
    deployment = one(docs, "Deployment")
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
    secret = next(s for s in by_kind(docs, "Secret") if s["type"] == "kubernetes.io/tls")
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
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
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


def test_self_signed_pair_serves_tls_that_the_ca_bundle_verifies(tmp_path: Path) -> None:
    """A real TLS handshake: the server loads the Secret's pair the way kopf's webhook
    server does (ssl load_cert_chain); the client trusts only the webhook's caBundle and
    checks the Service's DNS name, as the API server does."""
    docs = manifests()
    hook = _webhook(docs)
    secret = next(s for s in by_kind(docs, "Secret") if s["type"] == "kubernetes.io/tls")
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
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
        assert len(installed) == 2  # the webhook pair and the bundled etcd's root password
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
    certificate = one(docs, "Certificate")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    )
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    # No chart-generated pair competes with cert-manager's Secret.
    assert not [s for s in by_kind(docs, "Secret") if s["type"] == "kubernetes.io/tls"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
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
        issuer = one(docs, "Issuer")
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
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert not statefulset["spec"]["template"]["spec"]["automountServiceAccountToken"]


def test_bundled_etcd_without_persistence_uses_an_empty_dir() -> None:
    docs = manifests({"etcd": {"bundled": {"persistence": {"enabled": False}}}})
    statefulset = one(docs, "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "data", "emptyDir": {}}]


def test_bundled_etcd_uses_an_existing_root_secret_when_named() -> None:
    docs = manifests({"etcd": {"rootCredentials": {"secretName": "my-root"}}})
    assert not [s for s in by_kind(docs, "Secret") if s["metadata"]["name"].endswith("-root")]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
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


def _run_bootstrap(script: Path, endpoint: str, password: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, ETCD_ENDPOINT=endpoint, ETCD_ROOT_PASSWORD=password, BOOTSTRAP_TIMEOUT="20"
    )
    env.pop("ETCD_ROOT_USER", None)
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=90
    )


def test_bootstrap_enables_auth_on_a_real_etcd_idempotently(tmp_path: Path) -> None:
    script = _bootstrap_script(tmp_path)
    password = "bootstrap-test-secret-9f3a"
    with EtcdCluster(tmp_path / "etcd") as cluster:
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
        assert "nothing to do" in again.stderr

        wrong = _run_bootstrap(script, endpoint, "not-the-password")
        assert wrong.returncode == 1
        assert "cannot log in" in wrong.stderr
        for result in (first, again, wrong):
            assert password not in result.stdout + result.stderr
            assert "not-the-password" not in result.stdout + result.stderr


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
        container = one(manifests(values), "Deployment")["spec"]["template"]["spec"]["containers"][
            0
        ]
        assert set(_env(container)) <= read, set(_env(container)) - read
    assert read >= CONTRACT_ENV, CONTRACT_ENV - read
