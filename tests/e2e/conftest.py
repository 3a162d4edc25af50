"""The end-to-end suite runs only against a real cluster someone configured on purpose.

Both must be set, or every test that needs the cluster skips (CI here sets neither):

* ``KUBECONFIG``: the cluster (``make e2e-kind`` points it at a kind cluster);
* ``ETHA_E2E_IMAGE``: the etha image the cluster can run (``make e2e-kind`` builds it and
  loads it into kind), e.g. ``etha-operator:e2e``.

kubectl and helm are the ones ``make install`` put into ``.venv/bin``.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.e2e.plan import ROOT, Image, Plan
from tests.support import binaries

IMAGE_VARIABLE = "ETHA_E2E_IMAGE"


@dataclass
class Tools:
    kubectl: str
    helm: str
    env: dict[str, str]

    def run(
        self, tool: str, args: list[str], *, stdin: str | None = None, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        binary = self.kubectl if tool == "kubectl" else self.helm
        return subprocess.run(
            [binary, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )

    def ok(self, tool: str, args: list[str], **kwargs: Any) -> str:
        result = self.run(tool, args, **kwargs)
        command = f"{tool} {' '.join(args)}"
        assert result.returncode == 0, (
            f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
        return result.stdout

    def apply(self, manifest: dict[str, Any]) -> str:
        return self.ok("kubectl", ["apply", "-f", "-"], stdin=yaml.safe_dump(manifest))

    def get_json(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.ok("kubectl", ["get", *args, "-o", "json"]))
        return data


def skip_reason() -> str | None:
    if not os.environ.get("KUBECONFIG"):
        return "no cluster configured: set KUBECONFIG (and ETHA_E2E_IMAGE), or run `make e2e-kind`"
    if not os.environ.get(IMAGE_VARIABLE):
        return f"{IMAGE_VARIABLE} is not set: name the etha image the cluster can run"
    if binaries.kubectl() is None:
        return binaries.missing_reason(binaries.KUBECTL)
    if binaries.helm() is None:
        return binaries.missing_reason(binaries.HELM)
    return None


@pytest.fixture(scope="session")
def tools() -> Tools:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    kubectl, helm = binaries.kubectl(), binaries.helm()
    assert kubectl is not None and helm is not None
    env = {**os.environ, "HOME": os.environ.get("HOME", str(ROOT))}
    probe = subprocess.run(
        [kubectl, "version", "-o", "json"], capture_output=True, text=True, env=env, timeout=30
    )
    if probe.returncode != 0:
        pytest.fail(f"KUBECONFIG is set but the cluster does not answer:\n{probe.stderr}")
    return Tools(kubectl, helm, env)


@pytest.fixture(scope="session")
def plan() -> Plan:
    return Plan(Image(os.environ.get(IMAGE_VARIABLE, "etha-operator:e2e")), uuid.uuid4().hex[:6])


@pytest.fixture(scope="session")
def installed(tools: Tools, plan: Plan) -> Iterator[Plan]:
    """The chart installed for this run; uninstalled (and namespaces deleted) afterwards."""
    tools.ok("helm", plan.helm_install())
    tools.apply(plan.tenant_namespace_manifest())
    try:
        yield plan
    finally:
        tools.run("kubectl", ["delete", "namespace", plan.tenant_namespace, "--wait=true"])
        tools.run("helm", plan.helm_uninstall())
        tools.run("kubectl", ["delete", "namespace", plan.system_namespace, "--wait=true"])
