"""Job kinds as data: how to tell that a job of each kind has ended.

A :class:`JobKind` says where the kind is served (group, version, plural), which label its
controller puts on the job's pods (``podLabel``, value: the job's name) and its end rules.
An end rule is either a status condition (``conditionType`` with ``status``, "True" by
default) or a status field with terminal values (``field``, a dotted path such as
``status.state.phase``, and ``values``). Each rule says whether it is a success or a
failure (``outcome``). The job's deletion is always an end, whatever the kind.

:data:`SHIPPED` is the built-in table; docs/operator.md quotes each rule's source (the
controller's API types). ``ETHA_OPERATOR_JOB_KINDS`` (JSON, a list of objects in the same
shape) adds kinds or replaces a shipped kind of the same apiVersion and kind, so a cluster
can follow a new kind without a release. ``ETHA_OPERATOR_SHIPPED_JOB_KINDS`` (JSON, a list
of resource names ``<plural>.<group>``) keeps only the named shipped kinds, so a cluster
without, say, Ray or Volcano grants and watches nothing of theirs. This module is plain
Python: no kopf, no client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from etha.kvstore.errors import ConfigurationError

Outcome = Literal["Succeeded", "Failed"]
OUTCOMES: tuple[Outcome, ...] = ("Succeeded", "Failed")
JOB_KINDS_ENV = "ETHA_OPERATOR_JOB_KINDS"
SHIPPED_JOB_KINDS_ENV = "ETHA_OPERATOR_SHIPPED_JOB_KINDS"

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_VERSION = re.compile(r"v[0-9]+((alpha|beta)[0-9]+)?")
_KIND = re.compile(r"[A-Z][A-Za-z0-9]*")
_PLURAL = re.compile(r"[a-z][a-z0-9]*")
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_FIELD = re.compile(r"status(\.[A-Za-z][A-Za-z0-9]*)+")


@dataclass(frozen=True)
class EndRule:
    """One way a job ends: a condition with a status, or a status field with values."""

    outcome: Outcome
    condition_type: str | None = None
    status: str = "True"
    field: str | None = None
    values: tuple[str, ...] = ()

    def match(self, job: Mapping[str, Any]) -> str | None:
        """The reason this rule gives for ``job`` (condition type or field value), or None."""
        if self.condition_type is not None:
            for cond in (job.get("status") or {}).get("conditions") or []:
                if (
                    isinstance(cond, Mapping)
                    and cond.get("type") == self.condition_type
                    and cond.get("status") == self.status
                ):
                    return self.condition_type
            return None
        value: Any = job
        for part in (self.field or "").split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value if isinstance(value, str) and value in self.values else None

    def describe(self) -> str:
        if self.condition_type is not None:
            return f'condition {self.condition_type}="{self.status}"'
        return f"{self.field} in {'/'.join(self.values)}"

    def to_json(self) -> dict[str, Any]:
        if self.condition_type is not None:
            return {
                "conditionType": self.condition_type,
                "status": self.status,
                "outcome": self.outcome,
            }
        return {"field": self.field, "values": list(self.values), "outcome": self.outcome}


@dataclass(frozen=True)
class JobKind:
    """A job kind the operator follows (see the module docstring)."""

    group: str
    version: str
    kind: str
    plural: str
    ended: tuple[EndRule, ...]
    #: The label the kind's controller puts on every pod of the job, valued with the job's
    #: name (how pods of an ``etha.io/kvnamespace: auto`` job are recognised); None: none.
    pod_label: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return self.api_version, self.kind

    @property
    def resource(self) -> str:
        """``<plural>.<group>`` (the name of its CRD), how the shipped kinds are chosen."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def end(self, job: Mapping[str, Any]) -> tuple[str, Outcome] | None:
        """(reason, outcome) if ``job``'s status says it ended, else None (first rule wins)."""
        for rule in self.ended:
            reason = rule.match(job)
            if reason is not None:
                return reason, rule.outcome
        return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "group": self.group,
            "version": self.version,
            "kind": self.kind,
            "plural": self.plural,
            "ended": [rule.to_json() for rule in self.ended],
        }
        if self.pod_label:
            data["podLabel"] = self.pod_label
        return data


def _cond(type_: str, outcome: Outcome) -> EndRule:
    return EndRule(outcome=outcome, condition_type=type_)


def _field(path: str, outcome: Outcome, *values: str) -> EndRule:
    return EndRule(outcome=outcome, field=path, values=values)


#: The built-in table; every rule's source is quoted in docs/operator.md ("Job kinds").
SHIPPED: tuple[JobKind, ...] = (
    JobKind(
        "batch",
        "v1",
        "Job",
        "jobs",
        (_cond("Complete", "Succeeded"), _cond("Failed", "Failed")),
        "batch.kubernetes.io/job-name",
    ),
    JobKind(
        "jobset.x-k8s.io",
        "v1alpha2",
        "JobSet",
        "jobsets",
        (_cond("Completed", "Succeeded"), _cond("Failed", "Failed")),
        "jobset.sigs.k8s.io/jobset-name",
    ),
    JobKind(
        "trainer.kubeflow.org",
        "v1alpha1",
        "TrainJob",
        "trainjobs",
        (_cond("Complete", "Succeeded"), _cond("Failed", "Failed")),
        # The TrainJob's pods come from a JobSet of the same name.
        "jobset.sigs.k8s.io/jobset-name",
    ),
    JobKind(
        "kubeflow.org",
        "v1",
        "PyTorchJob",
        "pytorchjobs",
        (_cond("Succeeded", "Succeeded"), _cond("Failed", "Failed")),
        "training.kubeflow.org/job-name",
    ),
    JobKind(
        "kubeflow.org",
        "v2beta1",
        "MPIJob",
        "mpijobs",
        (_cond("Succeeded", "Succeeded"), _cond("Failed", "Failed")),
        "training.kubeflow.org/job-name",
    ),
    JobKind(
        "ray.io",
        "v1",
        "RayJob",
        "rayjobs",
        (
            _field("status.jobDeploymentStatus", "Succeeded", "Complete"),
            _field("status.jobDeploymentStatus", "Failed", "Failed"),
        ),
        "ray.io/originated-from-cr-name",
    ),
    JobKind(
        "batch.volcano.sh",
        "v1alpha1",
        "Job",
        "jobs",
        (
            _field("status.state.phase", "Succeeded", "Completed"),
            _field("status.state.phase", "Failed", "Failed", "Terminated", "Aborted"),
        ),
        "volcano.sh/job-name",
    ),
)


class JobKindError(ConfigurationError):
    """A job kind rule is malformed; the message names the entry, the field and the fix."""


def _text(entry: Mapping[str, Any], name: str, pattern: re.Pattern[str], where: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise JobKindError(f"{where}: {name} {value!r} must match {pattern.pattern}")
    return value


def _rule(raw: object, where: str) -> EndRule:
    if not isinstance(raw, Mapping):
        raise JobKindError(f"{where}: must be an object")
    outcome = raw.get("outcome")
    if outcome not in OUTCOMES:
        raise JobKindError(f"{where}: outcome {outcome!r} must be Succeeded or Failed")
    has_cond, has_field = "conditionType" in raw, "field" in raw
    if has_cond == has_field:
        raise JobKindError(f"{where}: give either conditionType (+ status) or field + values")
    if has_cond:
        extra = sorted(set(raw) - {"conditionType", "status", "outcome"})
        cond, status = raw.get("conditionType"), raw.get("status", "True")
        if extra or not isinstance(cond, str) or not cond or not isinstance(status, str):
            raise JobKindError(
                f"{where}: a condition rule is {{conditionType: <type>, status: True|False,"
                f" outcome}} (unknown fields: {extra})"
            )
        return EndRule(outcome=outcome, condition_type=cond, status=status)
    extra = sorted(set(raw) - {"field", "values", "outcome"})
    path, values = raw.get("field"), raw.get("values")
    if extra or not isinstance(path, str) or not _FIELD.fullmatch(path):
        raise JobKindError(
            f"{where}: field {path!r} must be a dotted path under status (status.state.phase)"
            f" (unknown fields: {extra})"
        )
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v for v in values)
    ):
        raise JobKindError(f"{where}: values must be a non-empty list of strings")
    return EndRule(outcome=outcome, field=path, values=tuple(values))


def parse_kind(raw: object, where: str) -> JobKind:
    """One table entry (the JSON shape of :meth:`JobKind.to_json`).

    :raises JobKindError: naming the entry and the field
    """
    if not isinstance(raw, Mapping):
        raise JobKindError(f"{where} must be an object {{group, version, kind, plural, ended}}")
    known = {"group", "version", "kind", "plural", "ended", "podLabel"}
    extra = sorted(set(raw) - known)
    if extra:
        raise JobKindError(f"{where} has unknown fields {extra}; known: {sorted(known)}")
    group = raw.get("group", "")
    if group != "":
        group = _text(raw, "group", _DNS_SUBDOMAIN, where)
    version = _text(raw, "version", _VERSION, where)
    kind = _text(raw, "kind", _KIND, where)
    plural = _text(raw, "plural", _PLURAL, where)
    ended = raw.get("ended")
    if not isinstance(ended, list) or not ended:
        raise JobKindError(f"{where}: ended must be a non-empty list of end rules")
    rules = tuple(_rule(r, f"{where}.ended[{i}]") for i, r in enumerate(ended))
    if not any(r.outcome == "Succeeded" for r in rules):
        raise JobKindError(f"{where}: ended has no rule with outcome Succeeded")
    pod_label = raw.get("podLabel")
    if pod_label is not None:
        pod_label = _text(raw, "podLabel", _LABEL_KEY, where)
    return JobKind(group, version, kind, plural, rules, pod_label)


def parse_extra(text: str | None, name: str = JOB_KINDS_ENV) -> tuple[JobKind, ...]:
    """Kinds from the setting ``name`` (JSON list); empty or unset: none.

    :raises JobKindError: the text is not a JSON list of valid entries
    """
    if text is None or not text.strip():
        return ()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise JobKindError(f"{name} is not valid JSON ({exc}); give a JSON list") from None
    if not isinstance(data, list):
        raise JobKindError(f"{name} must be a JSON list of job kinds")
    return tuple(parse_kind(entry, f"{name}[{i}]") for i, entry in enumerate(data))


def select_shipped(text: str | None, name: str = SHIPPED_JOB_KINDS_ENV) -> tuple[JobKind, ...]:
    """The shipped kinds named in the setting ``name`` (a JSON list of resource names,
    ``["jobs.batch", "jobsets.jobset.x-k8s.io"]``), in the shipped order; unset or empty:
    all of them; ``[]``: none.

    :raises JobKindError: not a JSON list of strings, or a name no shipped kind has
    """
    if text is None or not text.strip():
        return SHIPPED
    known = [k.resource for k in SHIPPED]
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise JobKindError(
            f"{name} is not valid JSON ({exc}); give a JSON list of {', '.join(known)}"
        ) from None
    if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
        raise JobKindError(f"{name} must be a JSON list of names among {', '.join(known)}")
    unknown = [n for n in data if n not in known]
    if unknown:
        raise JobKindError(
            f"{name} names {unknown}, which no shipped job kind is; shipped:"
            f" {', '.join(known)} (add other kinds through {JOB_KINDS_ENV})"
        )
    return tuple(k for k in SHIPPED if k.resource in data)


def merge(base: Iterable[JobKind], extra: Iterable[JobKind]) -> tuple[JobKind, ...]:
    """``base`` with ``extra`` added; an extra kind replaces a base one of the same key."""
    table: dict[tuple[str, str], JobKind] = {k.key: k for k in base}
    for kind in extra:
        table[kind.key] = kind
    return tuple(table.values())


class JobKinds:
    """The configured table, looked up by (apiVersion, kind)."""

    def __init__(self, kinds: Iterable[JobKind] = SHIPPED) -> None:
        self.kinds: tuple[JobKind, ...] = tuple(kinds)
        self._by_key = {k.key: k for k in self.kinds}

    @classmethod
    def from_setting(cls, text: str | None, shipped: str | None = None) -> JobKinds:
        """The shipped kinds chosen by ``shipped`` (:func:`select_shipped`) with the kinds
        of ``text`` (:func:`parse_extra`) added.

        :raises JobKindError: either setting is malformed, or together they leave no kind
        """
        kinds = merge(select_shipped(shipped), parse_extra(text))
        if not kinds:
            raise JobKindError(
                f"no job kinds: {SHIPPED_JOB_KINDS_ENV} is [] and {JOB_KINDS_ENV} adds none;"
                " enable a shipped kind or add one"
            )
        return cls(kinds)

    def get(self, api_version: object, kind: object) -> JobKind | None:
        return self._by_key.get((api_version, kind))  # type: ignore[arg-type]

    def __iter__(self) -> Any:
        return iter(self.kinds)

    def __len__(self) -> int:
        return len(self.kinds)

    def supported(self) -> str:
        return ", ".join(f"{k.api_version} {k.kind}" for k in self.kinds)

    def to_json(self) -> str:
        return json.dumps([k.to_json() for k in self.kinds])
