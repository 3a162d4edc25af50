"""Pod injection: the pure decision behind the mutating admission webhook.

A pod labelled ``etha.io/kvnamespace: <name>`` gets ``envFrom: [{secretRef: <name>-etha-kv}]``
appended to every container and init container. Decisions (see docs/operator.md):

* unlabelled pods: untouched (the webhook's objectSelector should not even send them);
* the named KVNamespace does not exist, Failed, or its credentials were revoked: rejected,
  with a message saying what to do (a Job controller retries pod creation, so a pod
  created a moment before its KVNamespace is admitted on a later try);
* the KVNamespace exists but is not Ready yet: injected, with a warning; the kubelet
  holds the containers until the Secret exists;
* a container that sets an ``ETHA_KV_*`` variable itself: rejected, because it would
  silently override (env wins over envFrom) or be overridden by the injected contract;
* the Secret is already referenced: nothing added (idempotent under reinvocation);
* an unlabelled pod carrying a job kind's pod label (``jobset.sigs.k8s.io/jobset-name``,
  ...) whose job has a KVNamespace made from ``etha.io/kvnamespace: auto``: treated as
  labelled with that KVNamespace's name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from etha.kvstore.config import PREFIX as RESERVED_PREFIX
from etha_operator import model

Obj = dict[str, Any]
CONTAINER_LISTS = ("initContainers", "containers")


@dataclass(frozen=True)
class KVNamespaceInfo:
    """What the webhook needs to know about a KVNamespace (from the operator's index)."""

    name: str
    phase: str | None
    secret_name: str
    message: str | None = None
    #: ``<apiVersion>/<kind>/<name>`` of the job it was made for (auto mode), else None.
    created_for: str | None = None


@dataclass
class Mutation:
    """The JSON patch (RFC 6902) to apply, and warnings for the user."""

    ops: list[Obj] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class AdmissionDenied(Exception):
    """The pod must be rejected; the message is shown to the user (kubectl, Job events)."""


Lookup = Callable[[str], KVNamespaceInfo | None]
#: (pod label key, its value) -> (KVNamespace name, whether that KVNamespace already
#: exists as the one made for the job) when the pod belongs to an ``auto`` job, else None.
AutoLookup = Callable[[str, str], tuple[str, bool] | None]


def auto_key(body: Mapping[str, Any], pod_label: str | None) -> tuple[str, str] | None:
    """(pod label key, job name) under which pods of an auto KVNamespace's job are found."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    job = ((body.get("spec") or {}).get("jobRef") or {}).get("name")
    if not annotations.get(model.CREATED_FOR_ANNOTATION) or not pod_label or not job:
        return None
    return pod_label, str(job)


def info_from_body(body: Mapping[str, Any]) -> KVNamespaceInfo:
    status = body.get("status") or {}
    name = body["metadata"]["name"]
    return KVNamespaceInfo(
        name=name,
        phase=status.get("phase"),
        secret_name=status.get("secretName") or model.secret_name(name),
        message=status.get("message"),
        created_for=((body.get("metadata") or {}).get("annotations") or {}).get(
            model.CREATED_FOR_ANNOTATION
        ),
    )


def mutate_pod(
    pod: Mapping[str, Any],
    namespace: str | None,
    lookup: Lookup,
    auto: AutoLookup | None = None,
    pod_labels: tuple[str, ...] = (),
) -> Mutation:
    """Decide what to do with ``pod`` (being created in ``namespace``).

    :param lookup: the KVNamespace of that name in the pod's namespace, or None
    :param auto: finds the auto KVNamespace of a job by one of ``pod_labels``
    :raises AdmissionDenied: the pod must be rejected (the message says why and what to do)
    """
    labels = (pod.get("metadata") or {}).get("labels") or {}
    name = labels.get(model.POD_LABEL)
    automatic: tuple[str, bool] | None = None
    if name is None and auto is not None:
        for key in pod_labels:
            value = labels.get(key)
            if isinstance(value, str) and (automatic := auto(key, value)) is not None:
                name = automatic[0]
                break
    if name is None:
        return Mutation()
    where = f"namespace {namespace!r}" if namespace else "the pod's namespace"
    info = lookup(name)
    if automatic is not None and not automatic[1]:
        if info is not None:
            raise AdmissionDenied(
                f"the pod belongs to job {name!r} (etha.io/kvnamespace: auto), but KVNamespace"
                f" {name!r} in {where} is not the one made for that job: rename the job, or"
                " delete that KVNamespace"
            )
        # The job's KVNamespace is being created: the Secret's name is known already, and
        # the kubelet holds the containers (CreateContainerConfigError) until it exists.
        info = KVNamespaceInfo(name=name, phase=None, secret_name=model.secret_name(name))
    if info is None:
        raise AdmissionDenied(
            f"the pod is labelled {model.POD_LABEL}={name} but there is no KVNamespace"
            f" {name!r} in {where}: create the KVNamespace first, or remove the label"
        )
    if info.phase == model.Phase.FAILED:
        raise AdmissionDenied(
            f"KVNamespace {name!r} is Failed ({info.message or 'see its status'}); fix or"
            " re-create it before starting pods that use it"
        )
    if info.phase == model.Phase.REVOKED:
        raise AdmissionDenied(
            f"KVNamespace {name!r} belongs to a job that has ended and its credentials were"
            " revoked (onJobEnd: Revoke); create a new KVNamespace for a new job"
        )
    spec = pod.get("spec") or {}
    offending = [
        f"{container.get('name', '?')}: {env['name']}"
        for kind in CONTAINER_LISTS
        for container in spec.get(kind) or []
        for env in container.get("env") or []
        if str(env.get("name", "")).startswith(RESERVED_PREFIX)
    ]
    if offending:
        raise AdmissionDenied(
            f"the pod sets reserved variables ({', '.join(offending)}); pods labelled"
            f" {model.POD_LABEL}={name} get every {RESERVED_PREFIX}* variable from Secret"
            f" {info.secret_name!r}: remove them from env, or remove the label and configure"
            " the store by hand"
        )
    mutation = Mutation()
    if info.phase != model.Phase.READY:
        mutation.warnings.append(
            f"KVNamespace {name!r} is {info.phase or 'not provisioned'} yet; the containers"
            f" start once Secret {info.secret_name!r} exists"
        )
    if info.phase in (model.Phase.JOB_ENDED, model.Phase.CLEANED):
        mutation.warnings.append(
            f"the job of KVNamespace {name!r} has already ended; its keys may have been deleted"
        )
    ref = {"secretRef": {"name": info.secret_name}}
    for kind in CONTAINER_LISTS:
        for index, container in enumerate(spec.get(kind) or []):
            env_from = container.get("envFrom")
            if env_from is None:
                mutation.ops.append(
                    {"op": "add", "path": f"/spec/{kind}/{index}/envFrom", "value": [ref]}
                )
            elif not any(
                (item.get("secretRef") or {}).get("name") == info.secret_name for item in env_from
            ):
                # Appended last: for keys in several sources the last one wins.
                mutation.ops.append(
                    {"op": "add", "path": f"/spec/{kind}/{index}/envFrom/-", "value": ref}
                )
    return mutation


def apply_ops(pod: Obj, ops: list[Obj]) -> None:
    """Apply ``mutate_pod``'s ops to ``pod`` in place (only the ops it produces)."""
    for op in ops:
        _, _, kind, index, *rest = op["path"].split("/")
        container = pod["spec"][kind][int(index)]
        if rest == ["envFrom"]:
            container["envFrom"] = copy.deepcopy(op["value"])
        else:
            container.setdefault("envFrom", []).append(copy.deepcopy(op["value"]))
