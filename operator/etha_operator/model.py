"""The KVNamespace custom resource: spec parsing, validation and naming.

The CRD's OpenAPI schema rejects bad specs at the API server; :func:`parse_spec` checks
the same rules again because the operator must not trust that the CRD in the cluster is
the current one (or that schema validation ran at all).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from etha.kvstore.errors import ConfigurationError, InvalidKeyError
from etha.kvstore.keys import validate_name
from etha_operator.jobkinds import JobKind, JobKinds

GROUP = "etha.io"
VERSION = "v1alpha1"
PLURAL = "kvnamespaces"
KIND = "KVNamespace"
API_VERSION = f"{GROUP}/{VERSION}"

#: Pods with this label get the KVNamespace's Secret injected by the webhook.
POD_LABEL = "etha.io/kvnamespace"
#: A job annotated ``etha.io/kvnamespace: auto`` gets a KVNamespace made for it.
AUTO_ANNOTATION = POD_LABEL
AUTO_VALUE = "auto"
#: Set on a KVNamespace the operator made for an annotated job: its pods are recognised
#: by their kind's pod label (see :attr:`JobKind.pod_label`), no label needed.
CREATED_FOR_ANNOTATION = "etha.io/created-for-job"
FINALIZER = "etha.io/cleanup"
#: etcd users and roles created by the operator are named ``etha-<KVNamespace uid>``.
ETCD_NAME_PREFIX = "etha-"
SECRET_SUFFIX = "-etha-kv"  # noqa: S105 - a name suffix, not a password

OnJobEnd = Literal["Delete", "Keep", "Revoke"]
ON_JOB_END: tuple[OnJobEnd, ...] = ("Delete", "Keep", "Revoke")
#: The shipped job kinds (see :mod:`etha_operator.jobkinds`; the operator's setting adds).
DEFAULT_JOB_KINDS = JobKinds()

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_TTL = 31536000
MAX_SECRET_NAME = 253
#: ``spec.quotas`` field -> the tenant record's quota name (etha.gateway.tenancy.QUOTA_NAMES).
QUOTA_FIELDS = {
    "bytes": "bytes",
    "keys": "keys",
    "valueBytes": "value_bytes",
    "watches": "watches",
    "requestsPerSecond": "requests_per_second",
}
#: Upper bound of a quota value (the CRD's int64 maximum).
MAX_QUOTA = 2**63 - 1


class SpecError(ConfigurationError):
    """The KVNamespace spec is invalid; the message says which field and why."""


@dataclass(frozen=True)
class JobRef:
    api_version: str
    kind: str
    name: str
    #: The kind's rule (where it is served, how it ends).
    rule: JobKind

    @property
    def plural(self) -> str:
        return self.rule.plural


@dataclass(frozen=True)
class KVNamespaceSpec:
    """A validated spec (``key_prefix`` None means: derive it from the object)."""

    job: JobRef
    key_prefix: str | None = None
    on_job_end: OnJobEnd = "Delete"
    ttl_seconds_after_job_end: int = 0
    component: str = "default"
    #: Quota overrides for the gateway, by record name (``value_bytes``...); 0 = unlimited.
    quotas: Mapping[str, int] = field(default_factory=dict)


def _name_field(value: object, path: str) -> str:
    try:
        return validate_name(value, path)
    except InvalidKeyError as exc:
        raise SpecError(str(exc)) from None


def parse_spec(
    spec: Mapping[str, Any] | None, kinds: JobKinds = DEFAULT_JOB_KINDS
) -> KVNamespaceSpec:
    """Validate a KVNamespace ``spec`` (``jobRef`` must name one of ``kinds``).

    :raises SpecError: naming the field (``spec.jobRef.name`` ...) and the rule it breaks
    """
    if not isinstance(spec, Mapping):
        raise SpecError("spec is missing: a KVNamespace needs at least spec.jobRef")
    known = {"keyPrefix", "jobRef", "onJobEnd", "ttlSecondsAfterJobEnd", "component", "quotas"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SpecError(f"spec has unknown fields {unknown}; known fields: {sorted(known)}")
    prefix = spec.get("keyPrefix")
    if prefix is not None:
        prefix = _name_field(prefix, "spec.keyPrefix")
    job = spec.get("jobRef")
    if not isinstance(job, Mapping):
        raise SpecError(
            "spec.jobRef is required: {apiVersion: batch/v1, kind: Job, name: <job name>}"
        )
    extra = sorted(set(job) - {"apiVersion", "kind", "name"})
    if extra:
        raise SpecError(f"spec.jobRef has unknown fields {extra}")
    api_version, kind, name = job.get("apiVersion"), job.get("kind"), job.get("name")
    rule = kinds.get(api_version, kind)
    if rule is None:
        raise SpecError(
            f"spec.jobRef {api_version!r} {kind!r} is not a supported job kind;"
            f" supported: {kinds.supported()} (more through the operator's"
            " ETHA_OPERATOR_JOB_KINDS, chart value jobKinds.extra)"
        )
    if not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise SpecError(
            f"spec.jobRef.name {name!r} is not a valid Job name (lowercase letters, digits"
            " and '-', at most 63 characters)"
        )
    on_end = spec.get("onJobEnd", "Delete")
    if on_end not in ON_JOB_END:
        raise SpecError(f"spec.onJobEnd {on_end!r} must be one of {', '.join(ON_JOB_END)}")
    ttl = spec.get("ttlSecondsAfterJobEnd", 0)
    if ttl is None:
        ttl = 0
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL:
        raise SpecError(
            f"spec.ttlSecondsAfterJobEnd {ttl!r} must be an integer between 0 and {MAX_TTL}"
        )
    component = _name_field(spec.get("component", "default"), "spec.component")
    quotas = parse_quotas(spec.get("quotas"))
    return KVNamespaceSpec(
        job=JobRef(str(api_version), str(kind), name, rule),
        key_prefix=prefix,
        on_job_end=on_end,
        ttl_seconds_after_job_end=ttl,
        component=component,
        quotas=quotas,
    )


def parse_quotas(raw: object) -> dict[str, int]:
    """``spec.quotas`` -> the tenant record's quota overrides (missing: the gateway's default).

    :raises SpecError: an unknown field, or a value that is not an integer >= 0
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"spec.quotas must be a mapping of {', '.join(QUOTA_FIELDS)} to integers")
    unknown = sorted(set(raw) - set(QUOTA_FIELDS))
    if unknown:
        raise SpecError(f"spec.quotas has unknown fields {unknown}; known: {list(QUOTA_FIELDS)}")
    quotas: dict[str, int] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUOTA:
            raise SpecError(f"spec.quotas.{key} {value!r} must be an integer >= 0 (0 = unlimited)")
        quotas[QUOTA_FIELDS[key]] = value
    return quotas


def default_prefix(namespace: str, name: str, uid: str) -> str:
    """``<namespace>.<name>.<uid[:8]>``: readable, and unique per object.

    Kubernetes names use only ``[a-z0-9.-]``, so the result passes
    :func:`~etha.kvstore.keys.validate_name`; it is cut to the 128-character limit while
    keeping the uid part that makes it unique.
    """
    tail = f".{uid[:8]}"
    head = f"{namespace}.{name}"[: 128 - len(tail)]
    return head + tail


def effective_prefix(spec: KVNamespaceSpec, namespace: str, name: str, uid: str) -> str:
    return spec.key_prefix or default_prefix(namespace, name, uid)


def etcd_name(uid: str) -> str:
    """The log-in name of the KVNamespace with this uid: its etcd user and role (direct
    mode), or its tenant username at the gateway (gateway mode)."""
    return f"{ETCD_NAME_PREFIX}{uid}"


def uid_of_etcd_name(name: str) -> str | None:
    """The KVNamespace uid encoded in an operator-made etcd user/role name, else None."""
    if not name.startswith(ETCD_NAME_PREFIX):
        return None
    uid = name[len(ETCD_NAME_PREFIX) :]
    return uid if _UID.fullmatch(uid) else None


def secret_name(name: str) -> str:
    return f"{name}{SECRET_SUFFIX}"
