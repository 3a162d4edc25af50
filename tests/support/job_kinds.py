"""The shipped job kinds as their controllers run them, for the Kubernetes emulator.

Each :class:`Kind` says where its controller's CRD serves it, which label the controller
puts on the job's pods, and the status the controller writes when the job succeeds (each
quoted from the controller's own API types). :func:`install_job_crds` makes the emulator
serve every kind that is not built into Kubernetes, as installing the controllers would.
Tests that play a controller's part patch a job's status with ``kind.succeeded()``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.support.kube_emulator import EmulatorServer, job_crd

#: The annotation that asks the operator for a KVNamespace made for the job.
AUTO = {"etha.io/kvnamespace": "auto"}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(*triples: tuple[str, str, str]) -> dict[str, Any]:
    """A status with these (type, status, reason) conditions, as a controller writes them."""
    return {
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": r, "lastTransitionTime": now()}
            for t, s, r in triples
        ]
    }


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    #: The label its controller sets on the job's pods (value: the job's name).
    pod_label: str
    #: The status its controller writes when the job succeeds.
    succeeded: Callable[[], dict[str, Any]]

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.split("/")[1]

    @property
    def builtin(self) -> bool:
        """Served by Kubernetes itself (no CRD to install)."""
        return self.api_version == "batch/v1" and self.kind == "Job"


def _kubeflow(api_version: str, kind: str) -> Kind:
    """A kind run by a Kubeflow training controller (``<kind>Created``/``<kind>Succeeded``)."""
    return Kind(
        api_version,
        kind,
        f"{kind.lower()}s",
        "training.kubeflow.org/job-name",
        lambda: conditions(
            ("Created", "True", f"{kind}Created"),
            ("Running", "False", f"{kind}Succeeded"),
            ("Succeeded", "True", f"{kind}Succeeded"),
        ),
    )


KINDS = {
    # kubernetes pkg/controller/job/job_controller.go: condition Complete=True
    # (k8s.io/api batch/v1 JobComplete).
    "Job": Kind(
        "batch/v1",
        "Job",
        "jobs",
        "batch.kubernetes.io/job-name",
        lambda: {
            **conditions(
                ("SuccessCriteriaMet", "True", "CompletionsReached"),
                ("Complete", "True", "CompletionsReached"),
            ),
            "succeeded": 1,
        },
    ),
    # kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go: JobSetCompleted =
    # "Completed" (pkg/controllers/jobset_controller.go sets it, reason AllJobsCompleted,
    # with status.terminalState Completed).
    "JobSet": Kind(
        "jobset.x-k8s.io/v1alpha2",
        "JobSet",
        "jobsets",
        "jobset.sigs.k8s.io/jobset-name",
        lambda: {
            **conditions(("Completed", "True", "AllJobsCompleted")),
            "terminalState": "Completed",
        },
    ),
    # kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go: TrainJobComplete =
    # "Complete" (copied from the JobSet's Completed condition, reason JobsCompleted).
    "TrainJob": Kind(
        "trainer.kubeflow.org/v1alpha1",
        "TrainJob",
        "trainjobs",
        "jobset.sigs.k8s.io/jobset-name",
        lambda: conditions(("Complete", "True", "JobsCompleted")),
    ),
    # kubeflow/training-operator pkg/apis/kubeflow.org/v1/common_types.go: JobSucceeded =
    # "Succeeded"; the PyTorchJob controller writes Created, Running=False, Succeeded=True.
    "PyTorchJob": _kubeflow("kubeflow.org/v1", "PyTorchJob"),
    # kubeflow/mpi-operator pkg/apis/kubeflow/v2beta1/types.go: JobSucceeded = "Succeeded",
    # written the same way.
    "MPIJob": _kubeflow("kubeflow.org/v2beta1", "MPIJob"),
    # ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go:
    # JobDeploymentStatusComplete = "Complete" in status.jobDeploymentStatus (jobStatus is
    # Ray's own SUCCEEDED).
    "RayJob": Kind(
        "ray.io/v1",
        "RayJob",
        "rayjobs",
        "ray.io/originated-from-cr-name",
        lambda: {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
    ),
    # volcano-sh/apis pkg/apis/batch/v1alpha1/job.go: JobState.Phase, Completed.
    "VolcanoJob": Kind(
        "batch.volcano.sh/v1alpha1",
        "Job",
        "jobs",
        "volcano.sh/job-name",
        lambda: {"state": {"phase": "Completed", "lastTransitionTime": now()}, "succeeded": 2},
    ),
}


def install_job_crds(kube: EmulatorServer) -> None:
    """Serve every kind of :data:`KINDS` that Kubernetes does not serve itself."""
    for kind in KINDS.values():
        if not kind.builtin:
            kube.add_crd(job_crd(kind.group, kind.version, kind.kind, kind.plural))


def make_job(kind: Kind, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A job of ``kind`` as a user submits it (no spec: no controller runs it here)."""
    return {
        "apiVersion": kind.api_version,
        "kind": kind.kind,
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {},
    }


def create_job(
    kube: EmulatorServer,
    kind: Kind,
    name: str,
    namespace: str,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Submit a job of ``kind`` (see :func:`make_job`); returns it as created."""
    return kube.create(kind.api_version, kind.plural, make_job(kind, name, annotations), namespace)


def set_job_status(
    kube: EmulatorServer, kind: Kind, name: str, namespace: str, status: dict[str, Any]
) -> None:
    """Write the job's status the way its controller does (the status subresource)."""
    kube.patch(kind.api_version, kind.plural, name, {"status": status}, namespace, "status")


def kind_setting(
    api_version: str, kind: str, plural: str, *ended: dict[str, Any], **more: Any
) -> dict[str, Any]:
    """One entry of ETHA_OPERATOR_JOB_KINDS (the chart's ``jobKinds.extra``): the kind,
    its end rules, and ``more`` fields as given (e.g. ``podLabel``)."""
    group, version = api_version.split("/")
    return {
        "group": group,
        "version": version,
        "kind": kind,
        "plural": plural,
        **more,
        "ended": list(ended),
    }
