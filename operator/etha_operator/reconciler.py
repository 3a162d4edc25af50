"""What the operator does, as plain synchronous code (kopf only calls into it).

* :meth:`Reconciler.provision`: the credentials (a gateway tenant record, or in direct
  mode an etcd role and user), the Secret and the status, idempotently and crash-safely
  (every step can be repeated; a lost secret is replaced).
* :meth:`Reconciler.check_job`: detect the job's end and apply ``onJobEnd``.
* :meth:`Reconciler.cleanup`: the deletion finalizer, best effort within a deadline.
* :meth:`Reconciler.audit`: remove tenant records, etcd users and roles whose
  KVNamespace is gone.

The secret lives only in the Secret and, hashed, in etcd (the tenant record's SHA-256,
or etcd's bcrypt of a direct-mode password): it is never logged, never in an event,
never in status. A KVNamespace is not reported Ready while etcd holds a NOSPACE or
CORRUPT alarm.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import urllib3
from kubernetes.client import ApiException

from etha.gateway.tenancy import TenantRecord, hash_secret, new_secret, secret_matches
from etha.kvstore.config import PASSWORD, EtcdConfig
from etha.kvstore.errors import KVStoreError, PermissionDeniedError
from etha_operator import k8s, metrics, model
from etha_operator.etcd_admin import EtcdAdmin, prefix_grant
from etha_operator.jobkinds import JobKind
from etha_operator.model import KVNamespaceStatus, Phase, Situation, Step, Trigger
from etha_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

Obj = dict[str, Any]

#: API failures worth retrying soon (conflicts, timeouts, API server restarts).
TRANSIENT_API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
#: How long one answer to "does etcd hold an alarm?" is reused: a storm of provisioning
#: runs costs one Alarm call per interval, and a new alarm is seen within it.
ALARM_CACHE_SECONDS = 1.0
#: What to do about each blocking alarm (shown in the status and the Event).
ALARM_FIXES = {
    "NOSPACE": (
        "etcd is out of space (NOSPACE alarm) and accepts no writes: compact and defragment"
        " it (etcdctl compact, etcdctl defrag), raise --quota-backend-bytes if the volume"
        " allows, then clear the alarm with `etcdctl alarm disarm`"
    ),
    "CORRUPT": (
        "an etcd member reports corrupted data (CORRUPT alarm): replace or restore that"
        " member from a snapshot, then clear the alarm with `etcdctl alarm disarm`"
    ),
}


class EventSink(Protocol):
    """Posts a Kubernetes Event about ``body`` (kopf.event in the operator)."""

    def __call__(
        self, body: Mapping[str, Any], *, type: str, reason: str, message: str
    ) -> None: ...


class TemporaryFailure(Exception):
    """Retry later (etcd unreachable, API conflict); kopf turns it into a delayed retry."""


class JobKindNotServed(TemporaryFailure):
    """The jobRef's kind is configured but the cluster does not serve it (no CRD yet)."""


class EtcdAlarmActive(TemporaryFailure):
    """etcd holds a blocking alarm; the KVNamespace waits (not Ready) until it is cleared."""

    def __init__(self, alarms: list[str]) -> None:
        super().__init__(f"etcd holds alarm(s) {', '.join(alarms)}")
        self.alarms = alarms


@dataclass
class CleanupReport:
    """What the finalizer removed and what it had to leave behind (with the reason)."""

    keys_deleted: int | None = None
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class AuditReport:
    orphans: list[str] = field(default_factory=list)
    keys_deleted: int = 0
    skipped: str | None = None


@contextmanager
def _retry_on_outage() -> Iterator[None]:
    """Turn etcd and Kubernetes API failures into :class:`TemporaryFailure` (kopf retries)."""
    try:
        yield
    except KVStoreError as exc:
        raise TemporaryFailure(f"etcd: {exc}") from exc
    except TRANSIENT_API_ERRORS as exc:
        raise TemporaryFailure(f"Kubernetes API: {exc}") from exc


def _meta(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return meta["namespace"], meta["name"], meta["uid"]


class Reconciler:
    """One per operator process; safe to call from several threads at once."""

    def __init__(
        self,
        settings: OperatorSettings,
        admin: EtcdAdmin,
        kube: k8s.KubeApi,
        emit: EventSink,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.admin = admin
        self.kube = kube
        self.emit = emit
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Serialises the prefix-uniqueness check with the role grant that claims the prefix.
        self._claim_lock = threading.Lock()
        # Orphan candidates of the previous audit round: removal needs two sightings.
        self._suspects: set[str] = set()
        self._alarms: tuple[float, list[str]] | None = None
        self._alarms_lock = threading.Lock()

    def lock(self, uid: str) -> threading.Lock:
        """A per-KVNamespace lock: the job watcher, the timer and handlers never overlap."""
        with self._locks_guard:
            return self._locks.setdefault(uid, threading.Lock())

    def forget(self, uid: str) -> None:
        with self._locks_guard:
            self._locks.pop(uid, None)

    def _now_iso(self) -> str:
        return k8s.iso(self.clock())

    def _fresh(self, body: Mapping[str, Any]) -> Obj | None:
        namespace, name, uid = _meta(body)
        obj = self.kube.get_kvnamespace(namespace, name)
        if obj is None or obj["metadata"].get("uid") != uid:
            return None
        return obj

    def _write_status(self, body: Mapping[str, Any], status: KVNamespaceStatus) -> None:
        namespace, name, _ = _meta(body)
        self.kube.patch_kvnamespace_status(namespace, name, status)

    def _ready_condition(
        self, body: Mapping[str, Any], ready: bool, reason: str, message: str
    ) -> list[Obj]:
        """``body``'s conditions with its Ready condition set; a transition is timed by
        :attr:`clock`."""
        previous = (body.get("status") or {}).get("conditions")
        generation = body["metadata"].get("generation")
        new = k8s.condition("Ready", ready, reason, message, generation, previous, now=self.clock())
        return k8s.with_condition(previous, new)

    def _fail(self, body: Mapping[str, Any], reason: str, message: str) -> Obj:
        status = KVNamespaceStatus(
            phase=Phase.FAILED,
            message=message,
            observed_generation=body["metadata"].get("generation"),
            conditions=self._ready_condition(body, False, reason, message),
        )
        current = body.get("status") or {}
        if Phase.of(current) is not Phase.FAILED or current.get("message") != message:
            self.emit(body, type="Warning", reason=reason, message=message)
            logger.warning("KVNamespace %s/%s: %s", *_meta(body)[:2], message)
        if status.differs_from(current):
            self._write_status(body, status)
        return status.as_dict()

    # -- provisioning ----------------------------------------------------------------------

    def worker_env(self, prefix: str, component: str, user: str, password: str) -> dict[str, str]:
        """The ``ETHA_KV_*`` variables of the Secret (what ``etha.kvstore.from_env`` reads).

        The endpoints are the gateway's in gateway mode, the workers' etcd endpoints in
        direct mode; the CA comes along when they serve TLS.
        """
        endpoints, tls = self.settings.workers_reach()
        config = EtcdConfig(
            namespace=prefix,
            endpoints=endpoints,
            component=component,
            username=user,
            password=password,
            tls=tls,
            ca_pem=self.settings.ca_pem() if tls else None,
        )
        return config.to_env()

    # -- etcd alarms -----------------------------------------------------------------------

    def blocking_alarms(self) -> list[str]:
        """etcd's NOSPACE/CORRUPT alarms, asked at most once per ALARM_CACHE_SECONDS."""
        with self._alarms_lock:
            now = time.monotonic()
            if self._alarms is None or now - self._alarms[0] > ALARM_CACHE_SECONDS:
                self._alarms = (now, self.admin.blocking_alarms())
            return list(self._alarms[1])

    def _hold(self, body: Mapping[str, Any], reason: str, message: str) -> Obj:
        """Status Pending + Ready=False (``reason``) and a Warning Event, once per change;
        returns the status as it now reads."""
        current: Obj = body.get("status") or {}
        status = KVNamespaceStatus(
            phase=Phase.PENDING,
            message=message,
            conditions=self._ready_condition(body, False, reason, message),
        )
        if Phase.of(current) is not Phase.PENDING or current.get("message") != message:
            self._write_status(body, status)
            self.emit(body, type="Warning", reason=reason, message=message)
            logger.warning("KVNamespace %s/%s: %s", *_meta(body)[:2], message)
        return {**current, **status.as_dict()}

    def _hold_for_alarm(self, body: Mapping[str, Any], alarms: list[str]) -> Obj:
        """Pending while etcd holds ``alarms`` (EtcdAlarm), with what to do about them."""
        fixes = "; ".join(ALARM_FIXES[a] for a in alarms)
        message = (
            f"not Ready: etcd holds alarm(s) {', '.join(alarms)}. {fixes}. The KVNamespace"
            " becomes Ready by itself once the alarm is cleared."
        )
        return self._hold(body, "EtcdAlarm", message)

    def _hold_for_job_kind(self, body: Mapping[str, Any], spec: model.KVNamespaceSpec) -> None:
        """Pending while the cluster does not serve the job's kind (JobKindNotServed)."""
        rule = spec.job.rule
        message = (
            f"not Ready: the cluster does not serve {rule.api_version} {rule.kind}"
            f" ({rule.plural}.{rule.group}): install its controller and CRD. The"
            " KVNamespace becomes Ready by itself once the CRD is installed (the operator"
            " re-checks discovery, no restart needed)."
        )
        self._hold(body, "JobKindNotServed", message)

    def reconcile(self, body: Mapping[str, Any], trigger: Trigger) -> None:
        """Run the steps :func:`~etha_operator.model.next_steps` finds due for ``body``.

        ``body`` is the object as last seen (kopf's copy, maybe an old one): each step reads
        it again before acting.

        :raises EtcdAlarmActive: etcd holds a NOSPACE/CORRUPT alarm (status says so)
        :raises TemporaryFailure: etcd or the API failed; retry later
        """
        for step in model.next_steps(Situation.of_body(body), trigger):
            if step is Step.PROVISION:
                self.provision(body)
            elif step is Step.CHECK_ALARMS:
                self.check_alarms(body)
            else:
                self.check_job(body)

    def check_alarms(self, body: Mapping[str, Any]) -> Obj | None:
        """For a Ready KVNamespace: leave Ready (Pending, EtcdAlarm) while etcd holds an alarm.

        :raises EtcdAlarmActive: an alarm is active (after the status was written)
        :raises TemporaryFailure: etcd or the API failed; retry later
        """
        _, _, uid = _meta(body)
        with self.lock(uid), _retry_on_outage():
            alarms = self.blocking_alarms()
            if not alarms:
                return None
            fresh = self._fresh(body)
            if fresh is None or Situation.of_body(fresh).job_over:
                return None
            self._hold_for_alarm(fresh, alarms)
        raise EtcdAlarmActive(alarms)

    def provision(self, body: Mapping[str, Any]) -> Obj | None:
        """Bring etcd, the Secret and the status in line with the spec; returns the status.

        Safe to re-run after a crash at any point: existing records, roles and users are
        reused, a Secret whose secret does not match the record (or does not log in, in
        direct mode), or is missing, gets a new one.

        :raises EtcdAlarmActive: etcd holds a NOSPACE/CORRUPT alarm (status says so)
        :raises TemporaryFailure: etcd or the API failed; retry later
        """
        _, _, uid = _meta(body)
        with self.lock(uid), _retry_on_outage():
            fresh = self._fresh(body)
            if fresh is None:
                return None
            with metrics.timed(metrics.PROVISION_SECONDS):
                return self._provision(fresh)

    def _provision(self, body: Obj) -> Obj:
        namespace, name, uid = _meta(body)
        status: Obj = body.get("status") or {}
        if Situation.of_body(body).job_over:
            return status  # never re-create revoked credentials
        try:
            spec = model.parse_spec(body.get("spec"), self.settings.job_kinds)
        except model.SpecError as exc:
            return self._fail(body, "InvalidSpec", str(exc))
        rule = spec.job.rule
        if not self.kube.served(rule.group, rule.version, rule.plural):
            self._hold_for_job_kind(body, spec)
            raise JobKindNotServed(
                f"{rule.plural}.{rule.group}/{rule.version} is not served by the cluster"
            )
        if len(model.secret_name(name)) > model.MAX_SECRET_NAME:
            return self._fail(
                body,
                "InvalidSpec",
                f"metadata.name is {len(name)} characters; at most"
                f" {model.MAX_SECRET_NAME - len(model.SECRET_SUFFIX)} fit the Secret name"
                f" <name>{model.SECRET_SUFFIX}",
            )
        # Before any write: under NOSPACE etcd refuses them, and a store that cannot be
        # written (or trusted, CORRUPT) must not be reported Ready.
        alarms = self.blocking_alarms()
        if alarms:
            self._hold_for_alarm(body, alarms)
            raise EtcdAlarmActive(alarms)
        generation = body["metadata"].get("generation")
        prefix = status.get("keyPrefix") or model.effective_prefix(spec, namespace, name, uid)
        user = model.etcd_name(uid)
        secret_name = model.secret_name(name)
        secret = self.kube.get_secret(namespace, secret_name)
        if secret is not None and not k8s.owned_by(secret, uid):
            return self._fail(
                body,
                "SecretConflict",
                f"Secret {secret_name!r} exists and is not owned by this KVNamespace; the"
                " operator will not overwrite it: delete or rename that Secret",
            )
        if self.settings.gateway_mode:
            claimed = self._claim_tenant(body, spec, prefix, user, secret)
        else:
            claimed = self._claim_role(body, prefix, user, secret)
        if isinstance(claimed, dict):
            return claimed  # Failed (a prefix conflict)
        password, rotated = claimed
        env = self.worker_env(prefix, spec.component, user, password)
        data = k8s.encode_data(env)
        if secret is None:
            self.kube.create_secret(k8s.build_secret(body, env))
        elif rotated or (secret.get("data") or {}) != data:
            self.kube.replace_secret_data(namespace, secret_name, data)

        if self.settings.gateway_mode:
            message = (
                f"tenant {user} may read and write only keys under {prefix + '/'!r}, through"
                f" the etha gateway; pods labelled {model.POD_LABEL}={name} get Secret"
                f" {secret_name}"
            )
        else:
            message = (
                f"etcd user {user} may read and write only keys under {prefix + '/'!r};"
                f" pods labelled {model.POD_LABEL}={name} get Secret {secret_name}"
            )
        job_uid = None
        if not status.get("jobUID"):
            # The Job's uid when first seen, in the same write as Ready: recording it later
            # (in the job check) would cost one more status write, and one more watch
            # event for kopf, per new KVNamespace.
            job = self.kube.get_job(namespace, spec.job)
            job_uid = (job or {}).get("metadata", {}).get("uid") or None
        new_status = KVNamespaceStatus(
            phase=Phase.READY,
            message=message,
            observed_generation=generation,
            key_prefix=prefix,
            etcd_user=user,
            # A direct-mode role name left from before a switch goes.
            etcd_role=model.REMOVE if self.settings.gateway_mode else user,
            secret_name=secret_name,
            job_uid=job_uid,
            conditions=self._ready_condition(body, True, "Provisioned", message),
        )
        if new_status.differs_from(status):
            self._write_status(body, new_status)
        if Phase.of(status) is not Phase.READY:
            self.emit(body, type="Normal", reason="Provisioned", message=message)
            logger.info("KVNamespace %s/%s is Ready: %s", namespace, name, message)
        return new_status.as_dict()

    def _conflict(self, body: Obj, prefix: str, owner: str) -> Obj:
        return self._fail(
            body,
            "PrefixConflict",
            f"keyPrefix {prefix!r} is already owned by another KVNamespace ({owner}); two"
            " KVNamespaces may not share a prefix: set a different spec.keyPrefix or delete"
            " the other KVNamespace",
        )

    def _claim_tenant(
        self, body: Obj, spec: model.KVNamespaceSpec, prefix: str, user: str, secret: Obj | None
    ) -> tuple[str, bool] | Obj:
        """Gateway mode: write the tenant record; returns (secret, rotated) or a Failed status.

        The record is written before the Secret, so a crash in between leaves a Secret
        whose secret does not match the record's hash: the next run replaces it.
        """
        namespace, name, _ = _meta(body)
        password = k8s.decode_data(secret).get(PASSWORD) if secret is not None else None
        with self._claim_lock:
            record = self.admin.get_record(user)
            owned = record is not None and record.prefix == prefix
            owner = None if owned else self.admin.prefix_owner(prefix, exclude=user)
            if owner is not None:
                return self._conflict(body, prefix, f"tenant {owner}")
            if password and record is not None and secret_matches(password, record.secret_sha256):
                rotated = False
            else:
                rotated, password = True, new_secret()
            wanted = TenantRecord(
                username=user,
                prefix=prefix,
                secret_sha256=hash_secret(password),
                quotas=dict(spec.quotas),
                owner=f"{namespace}/{name}",
            )
            if record != wanted:
                self.admin.put_record(wanted)
                logger.info(
                    "KVNamespace %s/%s: tenant record %s %s",
                    namespace,
                    name,
                    user,
                    "written with a new secret" if rotated else "updated",
                )
        if (body.get("status") or {}).get("etcdRole"):
            # Provisioned in direct mode before: its etcd user must not keep working.
            self.admin.delete_user(user)
            self.admin.delete_role(user)
        return password, rotated

    def _claim_role(
        self, body: Obj, prefix: str, user: str, secret: Obj | None
    ) -> tuple[str, bool] | Obj:
        """Direct mode: etcd role and user; returns (password, rotated) or a Failed status."""
        namespace, name, _ = _meta(body)
        role = user
        with self._claim_lock:
            # A role that already grants exactly this prefix means the claim was made
            # earlier: skip the scan of every role (restarts would otherwise be O(n^2)).
            owned = self.admin.role_grants(role) == [prefix_grant(prefix)]
            owner = None if owned else self.admin.prefix_owner(prefix, exclude=role)
            if owner is not None:
                return self._conflict(body, prefix, f"etcd role {owner}")
            if not owned:
                self.admin.ensure_role(role, prefix)
        password = self._usable_password(body, secret, user)
        rotated = password is None
        if password is None:
            # No Secret, or its password does not log in (crash between steps): new password,
            # set in etcd first, then written to the Secret.
            password = secrets.token_urlsafe(32)
            created = self.admin.set_user(user, password, role)
            logger.info(
                "KVNamespace %s/%s: etcd user %s %s",
                namespace,
                name,
                user,
                "created" if created else "given a new password",
            )
        else:
            self.admin.ensure_user_role(user, role)
        status = body.get("status") or {}
        if status.get("etcdUser") and not status.get("etcdRole"):
            # Provisioned in gateway mode before: its tenant record must not keep working.
            self.admin.delete_record(user)
        return password, rotated

    def _usable_password(self, body: Obj, secret: Obj | None, user: str) -> str | None:
        """The Secret's password if the user exists and it is current, else None."""
        if secret is None:
            return None
        password = k8s.decode_data(secret).get(PASSWORD)
        if not password or self.admin.user_roles(user) is None:
            return None
        status = body.get("status") or {}
        if Phase.of(status) is Phase.READY and status.get("observedGeneration") == body[
            "metadata"
        ].get("generation"):
            # Ready is written only after the Secret, so the password is known to be current;
            # skipping the check avoids one bcrypt login per object at every restart.
            return password
        try:
            self.admin.authenticate(user, password)
        except PermissionDeniedError:
            return None
        return password

    # -- job end ---------------------------------------------------------------------------

    def check_job(self, body: Mapping[str, Any]) -> Obj | None:
        """Detect the end of the referenced job and apply ``onJobEnd`` once it is due.

        :raises TemporaryFailure: etcd or the API failed; retry later
        """
        _, _, uid = _meta(body)
        with self.lock(uid), _retry_on_outage():
            fresh = self._fresh(body)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return None
            return self._check_job(fresh)

    def _job_end(
        self, status: Obj, job: Obj | None, rule: JobKind
    ) -> tuple[str | None, str | None, str | None]:
        """(reason, time, uid seen): reason is what ``rule`` matched (a condition type or a
        status value), or Deleted, when the job ended."""
        known_uid = status.get("jobUID")
        if job is None:
            return ("Deleted", self._now_iso(), None) if known_uid else (None, None, None)
        job_uid = job.get("metadata", {}).get("uid")
        if known_uid and job_uid != known_uid:
            return "Deleted", self._now_iso(), None  # deleted and re-created under the name
        ended = rule.end(job)
        if ended is None:
            return None, None, job_uid
        reason = ended[0]
        when = None
        for cond in (job.get("status") or {}).get("conditions") or []:
            if isinstance(cond, Mapping) and cond.get("type") == reason:
                when = cond.get("lastTransitionTime")
        return reason, when or self._now_iso(), job_uid

    def _check_job(self, body: Obj) -> Obj | None:
        namespace, name, _ = _meta(body)
        status: Obj = body.get("status") or {}
        if not Situation.of_body(body).provisioned:
            return None  # nothing provisioned (yet): nothing to clean
        try:
            spec = model.parse_spec(body.get("spec"), self.settings.job_kinds)
        except model.SpecError:
            return None
        if not status.get("jobEndedAt"):
            job = self.kube.get_job(namespace, spec.job)
            reason, ended_at, job_uid = self._job_end(status, job, spec.job.rule)
            new_uid = job_uid if job_uid and not status.get("jobUID") else None
            if reason is None:
                if new_uid:
                    self._write_status(body, KVNamespaceStatus(job_uid=new_uid))
                return status
            message = f"{spec.job.kind} {spec.job.name} ended ({reason})"
            update = KVNamespaceStatus(
                phase=Phase.JOB_ENDED,
                job_ended_at=ended_at,
                job_end_reason=reason,
                message=message,
                job_uid=new_uid,
            )
            self._write_status(body, update)
            status = {**status, **update.as_dict()}
            self.emit(body, type="Normal", reason="JobEnded", message=message)
            logger.info("KVNamespace %s/%s: %s", namespace, name, message)
        return self._apply_policy(body, spec, status)

    def policy_due_at(self, spec: model.KVNamespaceSpec, status: Obj) -> datetime.datetime | None:
        ended = k8s.parse_time(status.get("jobEndedAt"))
        if ended is None:
            return None
        return ended + datetime.timedelta(seconds=spec.ttl_seconds_after_job_end)

    def _apply_policy(self, body: Obj, spec: model.KVNamespaceSpec, status: Obj) -> Obj:
        namespace, name, uid = _meta(body)
        prefix = status.get("keyPrefix")
        if not prefix or Situation.of(status, spec.on_job_end).settled:
            return status
        due = self.policy_due_at(spec, status)
        if due is not None and self.clock() < due:
            return status  # the timer comes back after the TTL
        began = time.perf_counter()
        deleted = self.admin.delete_keys(prefix)
        metrics.KEYS_DELETED.labels(metrics.JOB_END).inc(deleted)
        cleaned_at = self._now_iso()
        what = f"deleted {deleted} keys under {prefix + '/'!r} (one range delete)"
        revoked_at = None
        if spec.on_job_end == "Revoke":
            user = model.etcd_name(uid)
            revoked = self._revoke(user)
            self.kube.delete_secret(namespace, model.secret_name(name))
            revoked_at = self._now_iso()
            what += f"; revoked {revoked} and deleted Secret {model.secret_name(name)}"
        message = f"job ended ({status.get('jobEndReason')}): {what}"
        update = KVNamespaceStatus(
            phase=Phase.REVOKED if spec.on_job_end == "Revoke" else Phase.CLEANED,
            message=message,
            keys_deleted=deleted,
            keys_cleaned_at=cleaned_at,
            credentials_revoked_at=revoked_at,
        )
        self._write_status(body, update)
        metrics.JOB_CLEANUP_SECONDS.observe(time.perf_counter() - began)
        self.emit(body, type="Normal", reason="KeysDeleted", message=message)
        logger.info("KVNamespace %s/%s: %s", namespace, name, message)
        return {**status, **update.as_dict()}

    def _revoke(self, user: str, timeout: float | None = None) -> str:
        """Remove every credential named ``user`` (record, etcd user, role); says what."""
        if self.settings.gateway_mode:
            self.admin.delete_record(user, timeout=timeout)
            # A KVNamespace provisioned in direct mode before a switch has these too.
            self.admin.delete_user(user, timeout=timeout)
            self.admin.delete_role(user, timeout=timeout)
            return f"tenant {user} (gateway record)"
        self.admin.delete_user(user, timeout=timeout)
        self.admin.delete_role(user, timeout=timeout)
        self.admin.delete_record(user, timeout=timeout)
        return f"etcd user/role {user}"

    # -- deletion --------------------------------------------------------------------------

    def cleanup(self, body: Mapping[str, Any], deadline: float | None = None) -> CleanupReport:
        """The finalizer: delete keys, user, role and Secret, trying until the deadline.

        Never raises for etcd failures: when the deadline passes, the report lists what
        was left behind (the periodic audit removes leftover users and roles later).
        """
        namespace, name, uid = _meta(body)
        limit = self.settings.cleanup_deadline if deadline is None else deadline
        stop = time.monotonic() + limit
        status: Obj = body.get("status") or {}
        user = role = model.etcd_name(uid)
        report = CleanupReport()

        def delete_keys(timeout: float) -> None:
            # Only a prefix this object provably owned: the one in its status, or the one
            # its own record or role grants. A spec prefix alone may belong to another
            # KVNamespace.
            prefix = status.get("keyPrefix") or self._owned_prefix(user, timeout)
            if prefix is not None:
                report.keys_deleted = self.admin.delete_keys(prefix, timeout=timeout)
                report.done.append(f"{report.keys_deleted} keys under {prefix + '/'!r}")

        # Keys first and the record/role last: they are what tells the audit which prefix
        # to clean if this run is cut short. Both kinds of credential are removed in both
        # modes, so a KVNamespace provisioned before a mode switch leaves nothing behind.
        user_step = (f"etcd user {user}", lambda t: self.admin.delete_user(user, timeout=t))
        role_step = (f"etcd role {role}", lambda t: self.admin.delete_role(role, timeout=t))
        record_step = (f"tenant {user}", lambda t: self.admin.delete_record(user, timeout=t))
        steps: list[tuple[str, Callable[[float], object]]] = [("the keys", delete_keys)]
        if self.settings.gateway_mode:
            steps += [record_step, user_step, role_step]
        else:
            steps += [user_step, role_step, record_step]
        pending = list(steps)
        delay = 0.2
        while pending:
            what, step = pending[0]
            remaining = stop - time.monotonic()
            if remaining <= 0:
                break
            try:
                step(min(remaining, self.settings.etcd_timeout))
            except KVStoreError as exc:
                report.failed[what] = str(exc)
                time.sleep(max(0.0, min(delay, stop - time.monotonic())))
                delay = min(delay * 2, 2.0)
                continue
            report.failed.pop(what, None)
            if what != "the keys":
                report.done.append(what)
            pending.pop(0)
        for what, _ in pending:
            report.failed.setdefault(what, f"not attempted within the {limit:g}s deadline")
        secret = model.secret_name(name)
        try:
            self.kube.delete_secret(namespace, secret)
            report.done.append(f"Secret {secret}")
        except Exception as exc:  # the ownerReference lets Kubernetes collect it anyway
            report.failed[f"Secret {secret}"] = str(exc)
        if report.failed:
            lost = "; ".join(f"{what}: {why}" for what, why in report.failed.items())
            message = (
                f"clean-up gave up after {limit:g}s (ETHA_OPERATOR_CLEANUP_DEADLINE) and"
                f" left behind: {lost}. The operator's audit removes leftover tenant records,"
                " etcd users and roles once etcd is reachable again."
            )
            self.emit(body, type="Warning", reason="CleanupIncomplete", message=message)
            logger.warning("KVNamespace %s/%s: %s", namespace, name, message)
        else:
            message = f"removed {', '.join(report.done)}"
            self.emit(body, type="Normal", reason="CleanedUp", message=message)
            logger.info("KVNamespace %s/%s deleted: %s", namespace, name, message)
        self.forget(uid)
        return report

    # -- audit -----------------------------------------------------------------------------

    def _owned_prefix(self, user: str, timeout: float | None = None) -> str | None:
        """The prefix that ``user``'s own tenant record or etcd role grants, or None."""
        record = self.admin.get_record(user, timeout=timeout)
        if record is not None:
            return record.prefix
        return self.admin.prefix_of_role(user, timeout=timeout)

    def audit(self) -> AuditReport:
        """Delete operator-made tenant records, etcd users and roles (and their keys) whose
        KVNamespace is gone.

        etcd is listed BEFORE Kubernetes: a record or user created after the etcd listing
        cannot be mistaken for an orphan, and one listed by etcd whose object is still in
        the API list is kept. A candidate is removed only when two consecutive rounds saw
        it, so credentials that someone is setting up right now are left alone for a round.
        """
        report = AuditReport()
        # Resync the prefix index with etcd, in case roles or records changed behind our back.
        self.admin.forget_owners()
        users = self.admin.list_users()
        roles = self.admin.list_roles()
        records = self.admin.list_record_names()
        try:
            # Cluster-wide even when only some namespaces are watched: a uid missing from a
            # partial list would look like an orphan.
            live = {obj["metadata"]["uid"] for obj in self.kube.list_kvnamespaces()}
        except Exception as exc:
            report.skipped = (
                f"cannot list KVNamespaces cluster-wide ({exc}); the audit needs list"
                " permission on kvnamespaces in all namespaces and is skipped"
            )
            logger.warning("audit skipped: %s", report.skipped)
            return report
        candidates = {
            uid
            for n in (*users, *roles, *records)
            if (uid := model.uid_of_etcd_name(n)) is not None
        }
        orphaned = candidates - live
        confirmed, self._suspects = orphaned & self._suspects, orphaned
        for uid in sorted(confirmed):
            name = model.etcd_name(uid)
            record = self.admin.get_record(name) if name in records else None
            if record is not None:
                prefix: str | None = record.prefix
            else:
                prefix = self.admin.prefix_of_role(name) if name in roles else None
            deleted = self.admin.delete_keys(prefix) if prefix is not None else 0
            kinds = []
            if name in records:
                self.admin.delete_record(name)
                kinds.append("tenant record")
            if name in users:
                self.admin.delete_user(name)
                kinds.append("etcd user")
            if name in roles:
                self.admin.delete_role(name)
                kinds.append("etcd role")
            report.orphans.append(name)
            report.keys_deleted += deleted
            logger.warning(
                "audit: removed orphaned %s %s (no KVNamespace with uid %s);"
                " deleted %d keys under %r",
                "/".join(kinds),
                name,
                uid,
                deleted,
                (prefix + "/") if prefix else None,
            )
        return report


def auto_kvnamespace(job: Mapping[str, Any], rule: JobKind) -> Obj:
    """The KVNamespace made for a job annotated ``etha.io/kvnamespace: auto``.

    Named after the job, in its namespace, with ``jobRef`` filled in and an ownerReference
    to the job, so Kubernetes' garbage collector deletes it (and through the finalizer its
    keys and credentials) with the job. ``blockOwnerDeletion`` stays false: the job's
    deletion never waits for the store's clean-up, and no extra permission is needed.
    """
    meta = job["metadata"]
    return {
        "apiVersion": model.API_VERSION,
        "kind": model.KIND,
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": {"app.kubernetes.io/managed-by": k8s.MANAGED_BY},
            "annotations": {
                model.CREATED_FOR_ANNOTATION: f"{rule.api_version}/{rule.kind}/{meta['name']}"
            },
            "ownerReferences": [
                {
                    "apiVersion": rule.api_version,
                    "kind": rule.kind,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": False,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "jobRef": {"apiVersion": rule.api_version, "kind": rule.kind, "name": meta["name"]}
        },
    }


def wants_auto(job: Mapping[str, Any]) -> bool:
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    return bool(annotations.get(model.AUTO_ANNOTATION) == model.AUTO_VALUE)


def ensure_auto(kube: k8s.KubeApi, job: Mapping[str, Any], rule: JobKind) -> str | None:
    """Create the auto KVNamespace of ``job`` unless it exists; returns a problem or None.

    A KVNamespace of that name that is not this job's (another kind's, or a hand-made one)
    is left alone: the returned message says so (the caller posts it as an Event).
    """
    meta = job.get("metadata") or {}
    if meta.get("deletionTimestamp") or not wants_auto(job):
        return None
    body = auto_kvnamespace(job, rule)
    with _retry_on_outage():
        if kube.create_kvnamespace(body) is not None:
            logger.info(
                "%s %s/%s: created KVNamespace %s (etha.io/kvnamespace: auto)",
                rule.kind,
                meta["namespace"],
                meta["name"],
                meta["name"],
            )
            return None
        existing = kube.get_kvnamespace(meta["namespace"], meta["name"]) or {}
    wanted = body["metadata"]["annotations"][model.CREATED_FOR_ANNOTATION]
    found = ((existing.get("metadata") or {}).get("annotations") or {}).get(
        model.CREATED_FOR_ANNOTATION
    )
    if not existing or found == wanted:
        return None
    return (
        f"KVNamespace {meta['name']!r} already exists and is not the one made for this"
        f" {rule.kind} (etha.io/kvnamespace: auto): rename the job, or delete that"
        " KVNamespace"
    )
