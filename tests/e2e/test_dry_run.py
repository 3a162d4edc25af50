"""Everything of the end-to-end suite that can run without a cluster, run here.

* the manifests it applies validate (Kubernetes schemas strictly; the KVNamespace against
  the CRD's own schema);
* its helm install line renders with the official helm, with the image it names;
* its kubectl commands work: against the Kubernetes emulator with the real operator the
  control-plane steps run for real (apply, wait for Ready, read the Secret, delete and
  wait for the finalizer), the workloads with ``--dry-run=server``;
* the worker script compiles; the image build context holds what the Dockerfile copies;
* ``make e2e-kind`` runs the documented steps in order.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.e2e.conftest import Tools
from tests.e2e.plan import ROOT, WORKER_SCRIPT, Image, Plan
from tests.operator.helpers import etcd_users
from tests.support import binaries
from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operated import operated_kube

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

IMAGE = "registry.example.com/etha/etha-operator:e2e"
PLAN = Plan(Image(IMAGE), "dryrun")


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / "kvnamespace.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_image_references_split_as_the_chart_wants() -> None:
    assert Image("etha-operator:e2e").values == {
        "repository": "etha-operator",
        "tag": "e2e",
        "digest": "",
    }
    assert Image("localhost:5000/etha").values["repository"] == "localhost:5000/etha"
    assert Image("r.io/etha@sha256:" + "a" * 64).values["digest"] == "sha256:" + "a" * 64


def test_manifests_validate() -> None:
    version = kubernetes_validate.latest_version()
    data = {"ETHA_KV_PASSWORD": "eA=="}
    for manifest in (
        PLAN.worker_job(),
        PLAN.probe_pod(),
        PLAN.revoked_doctor_pod(),
        PLAN.stale_secret(data),
    ):
        kubernetes_validate.validate(manifest, version, strict=True)
    jsonschema.validate(PLAN.kvnamespace(), _crd_schema())
    job = PLAN.worker_job()
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["etha.io/kvnamespace"] == PLAN.kvnamespace()["metadata"]["name"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4


def test_worker_script_compiles() -> None:
    compile(WORKER_SCRIPT, "<worker>", "exec")


@pytest.mark.skipif(binaries.helm() is None, reason=binaries.missing_reason(binaries.HELM))
def test_helm_install_line_renders_with_the_image() -> None:
    helm = binaries.helm()
    assert helm is not None
    install = PLAN.helm_install()
    assert install[:3] == ["install", PLAN.release, str(ROOT / "charts" / "etha-operator")]
    result = subprocess.run(
        [helm, *PLAN.helm_template()], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    images = {
        (d["metadata"]["name"], c["image"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    etha = {name for name, image in images if image == IMAGE}
    assert any(name.endswith("operator") for name in etha), images
    assert any("gateway" in name for name in etha), images


def test_image_build_context_has_what_the_dockerfile_copies() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert copies
    for line in copies:
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the build context"
            assert not any(fnmatch.fnmatch(source, p) for p in ignored), (
                f"COPY {source}: excluded by .dockerignore"
            )
    # What the image then installs: the package with the console scripts the suite runs.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'etha = "etha.cli:main"' in pyproject  # `etha doctor` in pods


def test_make_e2e_kind_runs_the_documented_steps() -> None:
    result = subprocess.run(
        ["make", "-n", "e2e-kind", "E2E_IMAGE=img:t", "KIND_CLUSTER=c1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()

    def index(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line)

    steps = [
        index("docker build -t img:t ."),
        index("kind create cluster --name 'c1'"),
        index("kind load docker-image 'img:t' --name 'c1'"),
        index("kind get kubeconfig --name 'c1'"),
        index("ETHA_E2E_IMAGE='img:t'"),
    ]
    assert steps == sorted(steps)
    assert "-m pytest tests/e2e" in lines[steps[-1]]


# -- the kubectl steps against the emulator and the real operator --------------------------------


@pytest.fixture(scope="module")
def emulated(
    etcd_auth: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Tools, EmulatorServer]]:
    kubectl, helm = binaries.kubectl(), binaries.helm()
    if kubectl is None or helm is None:
        pytest.skip(binaries.missing_reason(binaries.KUBECTL if kubectl is None else binaries.HELM))
    with operated_kube(etcd_auth, tmp_path_factory.mktemp("e2e-dry-run")) as k8s:
        yield Tools(kubectl, helm, k8s.env), k8s.kube


def test_kubectl_steps_run_against_the_emulator(
    emulated: tuple[Tools, EmulatorServer], etcd_auth: EtcdCluster
) -> None:
    tools, kube = emulated
    ns = PLAN.tenant_namespace
    tools.apply(PLAN.tenant_namespace_manifest())
    tools.apply(PLAN.kvnamespace())
    tools.ok("kubectl", PLAN.wait_phase("Ready", timeout="60s"))
    for manifest in (PLAN.probe_pod(), PLAN.worker_job()):
        out = tools.ok(
            "kubectl", ["apply", "--dry-run=server", "-f", "-"], stdin=yaml.safe_dump(manifest)
        )
        assert "(server dry run)" in out
    assert not kube.list("batch/v1", "jobs", ns)  # a dry run creates nothing
    secret = tools.get_json("secret", PLAN.secret, "-n", ns)
    assert "ETHA_KV_PASSWORD" in secret["data"]
    stale = PLAN.stale_secret(secret["data"])
    out = tools.ok("kubectl", ["apply", "--dry-run=server", "-f", "-"], stdin=yaml.safe_dump(stale))
    assert "stale-credentials" in out
    user = tools.get_json("kvnamespace", PLAN.name, "-n", ns)["status"]["etcdUser"]
    assert user in etcd_users(etcd_auth)

    tools.ok("kubectl", PLAN.delete_kvnamespace())
    assert kube.find("etha.io/v1alpha1", "kvnamespaces", PLAN.name, ns) is None
    assert user not in etcd_users(etcd_auth)  # the finalizer ran before delete returned
    gone = tools.run("kubectl", ["get", "secret", PLAN.secret, "-n", ns])
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    # The log and exec commands are well-formed for kubectl (parsed, not run here).
    # (`--help` goes before the `--` that starts the command run in the pod.)
    for args in (PLAN.worker_logs(), PLAN.doctor_in_probe(), PLAN.wait_job_complete()):
        flags = args[: args.index("--")] if "--" in args else args
        assert tools.run("kubectl", [*flags, "--help"]).returncode == 0, args


def test_the_suite_skips_cleanly_without_a_cluster() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "ETHA_E2E_IMAGE")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/e2e/test_cluster.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "no cluster configured" in result.stdout
