"""The KVNamespace custom resource: spec parsing, validation, naming and status.

The CRD's OpenAPI schema rejects bad specs at the API server; :func:`parse_spec` checks
the same rules again because the operator must not trust that the CRD in the cluster is
the current one (or that schema validation ran at all).

The status section holds the :class:`Phase` values, the :class:`KVNamespaceStatus` the
operator writes, and the one rule (:func:`next_steps`) that says which reconciler steps
are due in which situation; the kopf handlers and the reconciler both follow it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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


# -- status ------------------------------------------------------------------------------------


class Phase(str, enum.Enum):
    """``.status.phase``; the values are the CRD's enum, written exactly as they are."""

    PENDING = "Pending"
    READY = "Ready"
    JOB_ENDED = "JobEnded"
    CLEANED = "Cleaned"
    REVOKED = "Revoked"
    FAILED = "Failed"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, status: Mapping[str, Any] | None) -> Phase | None:
        """The phase recorded in ``status``; None when there is none (not provisioned yet)
        or it is not one of ours (a status edited by hand counts as not provisioned)."""
        raw = (status or {}).get("phase")
        try:
            return cls(raw) if isinstance(raw, str) else None
        except ValueError:
            return None


#: Phases after the job's end: provisioning never runs again for them.
ENDED_PHASES = frozenset({Phase.JOB_ENDED, Phase.CLEANED, Phase.REVOKED})


class Step(str, enum.Enum):
    """One of the reconciler's steps, in the order :func:`next_steps` lists them."""

    #: Credentials, Secret and status in line with the spec (Ready, Pending or Failed).
    PROVISION = "provision"
    #: Leave Ready (for Pending) while etcd holds a NOSPACE or CORRUPT alarm.
    CHECK_ALARMS = "check-alarms"
    #: Notice the job's end (JobEnded) and apply spec.onJobEnd once due (Cleaned, Revoked).
    CHECK_JOB = "check-job"


class Trigger(str, enum.Enum):
    """Why the operator looks at a KVNamespace."""

    #: Created, its spec changed, or seen again when the operator starts.
    CHANGE = "change"
    #: The periodic timer (failed provisioning, TTLs, missed job ends, alarms).
    RECHECK = "recheck"


@dataclass(frozen=True)
class Situation:
    """What :func:`next_steps` decides on: the recorded phase and the few facts next to it."""

    phase: Phase | None
    #: ``status.jobEndedAt`` is set (it is written together with JobEnded).
    job_ended: bool = False
    #: ``spec.onJobEnd`` is Keep: nothing happens after the job's end.
    keep: bool = False
    #: ``metadata.deletionTimestamp`` is set: only the finalizer acts.
    deleting: bool = False

    @classmethod
    def of(
        cls, status: Mapping[str, Any] | None, on_job_end: object = None, *, deleting: bool = False
    ) -> Situation:
        return cls(
            phase=Phase.of(status),
            job_ended=bool((status or {}).get("jobEndedAt")),
            keep=on_job_end == "Keep",
            deleting=deleting,
        )

    @classmethod
    def of_body(cls, body: Mapping[str, Any]) -> Situation:
        """The situation of a KVNamespace object as read from the API (or kopf's body)."""
        return cls.of(
            body.get("status"),
            (body.get("spec") or {}).get("onJobEnd"),
            deleting=bool((body.get("metadata") or {}).get("deletionTimestamp")),
        )

    @property
    def job_over(self) -> bool:
        """The job ended: credentials are never made (again), whatever the spec says."""
        return self.phase in ENDED_PHASES or self.job_ended

    @property
    def provisioned(self) -> bool:
        """Credentials were handed out at some point, so the job's end matters."""
        return self.phase is Phase.READY or self.job_over

    @property
    def settled(self) -> bool:
        """Nothing can happen to it any more but deletion."""
        return self.phase in (Phase.CLEANED, Phase.REVOKED) or (self.job_over and self.keep)


def next_steps(situation: Situation, trigger: Trigger) -> tuple[Step, ...]:
    """The reconciler's steps due for a KVNamespace in ``situation``, in order.

    ====================================  ============================  =========================
    situation                             CHANGE                        RECHECK
    ====================================  ============================  =========================
    being deleted, or settled             (none)                        (none)
    job over (not settled)                CHECK_JOB                     CHECK_JOB
    Ready                                 PROVISION, CHECK_JOB          CHECK_ALARMS, CHECK_JOB
    no phase, Pending, Failed             PROVISION, CHECK_JOB          PROVISION, CHECK_JOB
    ====================================  ============================  =========================

    A Ready KVNamespace is provisioned again only on a change (a spec edit, a restart);
    the timer just watches etcd's alarms for it. CHECK_JOB follows PROVISION because
    provisioning may have made it Ready. Each step checks the object again as it is then
    (the situation is one read of it, maybe an old one).
    """
    if situation.deleting or situation.settled:
        return ()
    if situation.job_over:
        return (Step.CHECK_JOB,)  # the onJobEnd policy may still be due (after its TTL)
    if situation.phase is Phase.READY and trigger is Trigger.RECHECK:
        return (Step.CHECK_ALARMS, Step.CHECK_JOB)
    return (Step.PROVISION, Step.CHECK_JOB)


class Removal(enum.Enum):
    """The value of a :class:`KVNamespaceStatus` field that deletes the stored field."""

    REMOVE = "remove"


REMOVE = Removal.REMOVE


@dataclass(frozen=True)
class KVNamespaceStatus:
    """What the operator writes into ``.status`` (the CRD's status schema, field by field).

    It is written as a JSON merge patch: a field left None is not written (the stored value
    stays), :data:`REMOVE` deletes it. Never holds a secret.
    """

    phase: Phase | None = None
    message: str | None = None
    observed_generation: int | None = None
    key_prefix: str | None = None
    etcd_user: str | None = None
    #: Direct mode only; REMOVE drops a direct-mode role name left from before a switch.
    etcd_role: str | Removal | None = None
    secret_name: str | None = None
    job_uid: str | None = None
    job_ended_at: str | None = None
    job_end_reason: str | None = None
    keys_cleaned_at: str | None = None
    keys_deleted: int | None = None
    credentials_revoked_at: str | None = None
    conditions: list[dict[str, Any]] | None = None

    def to_patch(self) -> dict[str, Any]:
        """The merge patch of ``.status``: the fields set, a removed one as null."""
        patch: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is REMOVE:
                patch[STATUS_KEYS[f.name]] = None
            elif isinstance(value, Phase):
                patch[STATUS_KEYS[f.name]] = value.value  # a plain string on the wire
            elif value is not None:
                patch[STATUS_KEYS[f.name]] = value
        return patch

    def as_dict(self) -> dict[str, Any]:
        """The fields this status sets, as they read once written (no removals)."""
        return {key: value for key, value in self.to_patch().items() if value is not None}

    def differs_from(self, current: Mapping[str, Any] | None) -> bool:
        """Whether writing this status would change ``current`` (the stored status)."""
        stored = current or {}
        return any(stored.get(key) != value for key, value in self.to_patch().items())


#: :class:`KVNamespaceStatus` field -> its key in ``.status``.
STATUS_KEYS = {
    "phase": "phase",
    "message": "message",
    "observed_generation": "observedGeneration",
    "key_prefix": "keyPrefix",
    "etcd_user": "etcdUser",
    "etcd_role": "etcdRole",
    "secret_name": "secretName",
    "job_uid": "jobUID",
    "job_ended_at": "jobEndedAt",
    "job_end_reason": "jobEndReason",
    "keys_cleaned_at": "keysCleanedAt",
    "keys_deleted": "keysDeleted",
    "credentials_revoked_at": "credentialsRevokedAt",
    "conditions": "conditions",
}
