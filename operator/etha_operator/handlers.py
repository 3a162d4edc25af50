"""kopf wiring: thin handlers that call :class:`~etha_operator.reconciler.Reconciler`.

The handlers are module-level functions; :func:`register` puts each of them into a given
registry explicitly, so that the entry point and tests can each use a fresh
:class:`kopf.OperatorRegistry`. What a handler needs besides kopf's own arguments comes
through kopf: the :class:`Reconciler` as ``memo.reconciler`` (made by :func:`startup`),
settings and job-kind rules as the ``param`` given at registration. Resource handlers are
synchronous: kopf runs them in its thread pool, where the blocking etcd and Kubernetes
clients belong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from etha_operator import metrics, model, webhook
from etha_operator.etcd_admin import EtcdAdmin
from etha_operator.jobkinds import JobKind, JobKinds
from etha_operator.k8s import KubeApi
from etha_operator.model import Trigger
from etha_operator.reconciler import Reconciler, TemporaryFailure, ensure_auto, wants_auto
from etha_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

RETRY_DELAY = 5.0
WEBHOOK_ID = "mutate-pods"
WEBHOOK_PATH = f"/{WEBHOOK_ID}"


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """kopf bodies are read-only views; the reconciler wants plain dicts."""
    return {key: body[key] for key in body}


def _post_event(body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
    kopf.event(dict(body), type=type, reason=reason, message=message)  # type: ignore[arg-type]


def fill_request_namespace(review: Any) -> None:
    """Copy ``request.namespace`` into the object when the API server left it empty.

    Pods created by controllers (generateName) may reach admission without
    ``metadata.namespace``; the handler needs it to find the KVNamespace.
    """
    request = review.get("request") if isinstance(review, dict) else None
    if not isinstance(request, dict) or not request.get("namespace"):
        return
    obj = request.get("object")
    if isinstance(obj, dict):
        meta = obj.setdefault("metadata", {})
        if isinstance(meta, dict) and not meta.get("namespace"):
            meta["namespace"] = request["namespace"]


class PodWebhookServer(kopf.WebhookServer):
    """kopf's webhook server, plus :func:`fill_request_namespace` on every review."""

    @staticmethod
    async def _serve(fn: Any, request: Any) -> Any:
        async def with_namespace(data: Any, **kwargs: Any) -> Any:
            fill_request_namespace(data)
            return await fn(data, **kwargs)

        serve: Any = kopf.WebhookServer._serve
        return await serve(with_namespace, request)


def configure_kopf(settings: kopf.OperatorSettings, cfg: OperatorSettings) -> None:
    """kopf settings the operator depends on (see docs/operator.md)."""
    settings.persistence.finalizer = model.FINALIZER
    # Progress and last-handled state live in annotations, so the CRD's status schema
    # stays exactly the documented one.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="etha.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="etha.io", key="last-handled-configuration"
    )
    # Without both timeouts a watch stream can freeze silently (kopf issue tracker).
    settings.watching.server_timeout = cfg.watch_server_timeout
    settings.watching.client_timeout = cfg.watch_server_timeout + 30
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.enabled = True
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "etha-operator"
    settings.peering.standalone = True
    settings.peering.clusterwide = cfg.clusterwide
    if cfg.webhook_enabled:
        settings.admission.server = PodWebhookServer(
            addr="0.0.0.0",
            port=cfg.webhook_port,
            certfile=cfg.webhook_cert_file,
            pkeyfile=cfg.webhook_key_file,
        )
        settings.admission.managed = None  # the Helm chart owns the webhook configuration


@dataclass(frozen=True)
class WebhookContext:
    """What the pod webhook needs from the settings (its kopf ``param``)."""

    #: Pod labels that name a job (one per job kind that has one).
    pod_labels: tuple[str, ...]
    #: Ids of the indices of jobs annotated auto (kopf passes each under its id).
    auto_job_indices: tuple[str, ...]


def _reconciler(memo: Any) -> Reconciler:
    reconciler: Reconciler = memo.reconciler
    return reconciler


# -- operator activities -------------------------------------------------------------------


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # Explicit, so the in-cluster service account always wins over a stray kubeconfig.
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    return info or kopf.login_with_kubeconfig(**kwargs)


async def startup(settings: kopf.OperatorSettings, memo: Any, param: Any = None, **_: Any) -> None:
    """Configure kopf, make the :class:`Reconciler` (``memo.reconciler``), start the audit.

    ``param``: the operator's :class:`OperatorSettings`.
    """
    cfg: OperatorSettings = param
    configure_kopf(settings, cfg)
    admin = EtcdAdmin.from_settings(cfg)
    kube = KubeApi.from_environment(cfg.discovery_interval)
    memo.reconciler = Reconciler(cfg, admin, kube, _post_event)
    if cfg.audit_interval > 0:
        memo.audit_task = asyncio.create_task(_audit_loop(memo.reconciler, cfg))
    logger.info(
        "etha operator started: %s mode%s, etcd %s, %s, webhook %s",
        cfg.mode,
        f" (workers use gateway {','.join(str(e) for e in cfg.gateway_endpoints)})"
        if cfg.gateway_mode
        else "",
        ",".join(str(e) for e in cfg.etcd_endpoints),
        "cluster-wide" if cfg.clusterwide else f"namespaces {','.join(cfg.namespaces)}",
        f"on port {cfg.webhook_port}" if cfg.webhook_enabled else "disabled (no certificate)",
    )


async def cleanup(memo: Any, **_: Any) -> None:
    task = getattr(memo, "audit_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    reconciler: Reconciler | None = getattr(memo, "reconciler", None)
    if reconciler is not None:
        reconciler.admin.close()
        reconciler.kube.close()


# -- indices (their ids are the kwarg names under which kopf passes them to handlers) ------


def index_kvnamespaces(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[Any, Any]:
    """(namespace, name) -> what the webhook needs."""
    return {(namespace, name): webhook.info_from_body(body)}


def index_kvnamespaces_by_job(
    spec: kopf.Spec, namespace: str | None, name: str, **_: Any
) -> dict[Any, Any]:
    """(namespace, (job apiVersion, job kind), job name) -> KVNamespace name."""
    job = spec.get("jobRef") or {}
    return {(namespace, (job.get("apiVersion"), job.get("kind")), job.get("name")): name}


def index_auto_kvnamespaces(
    body: kopf.Body, namespace: str | None, name: str, param: Any = None, **_: Any
) -> dict[Any, Any] | None:
    """(namespace, pod label key, job name) -> name, for KVNamespaces made by auto.

    ``param``: the operator's :class:`JobKinds`.
    """
    kinds: JobKinds = param
    job = (body.get("spec") or {}).get("jobRef") or {}
    rule = kinds.get(job.get("apiVersion"), job.get("kind"))
    key = webhook.auto_key(body, rule.pod_label if rule is not None else None)
    return None if key is None else {(namespace, *key): name}


def index_auto_jobs(
    namespace: str | None, name: str, param: Any = None, **_: Any
) -> dict[Any, Any]:
    """(namespace, pod label key, job name) of jobs annotated auto: their pods are
    injected even before the job's KVNamespace is seen. ``param``: the :class:`JobKind`."""
    rule: JobKind = param
    return {(namespace, rule.pod_label, name): True}


# -- KVNamespaces --------------------------------------------------------------------------


@metrics.counted("reconcile")
def reconcile(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Created, changed, or seen again at start-up: the steps due on a change."""
    try:
        _reconciler(memo).reconcile(_plain(body), Trigger.CHANGE)
    except TemporaryFailure as exc:
        raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY) from exc


@metrics.counted("recheck")
def recheck(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Level-triggered safety net: failed provisioning, TTLs, missed job ends, alarms."""
    try:
        _reconciler(memo).reconcile(_plain(body), Trigger.RECHECK)
    except TemporaryFailure as exc:
        metrics.mark_retry()
        logger.warning(
            "KVNamespace %s/%s: will retry: %s",
            body.metadata.namespace,
            body.metadata.name,
            exc,
        )


@metrics.counted("finalize")
def finalize(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Best effort within ETHA_OPERATOR_CLEANUP_DEADLINE; never blocks deletion forever."""
    with metrics.timed(metrics.FINALIZER_SECONDS):
        report = _reconciler(memo).cleanup(_plain(body))
    metrics.KEYS_DELETED.labels(metrics.FINALIZER).inc(report.keys_deleted or 0)
    if report.failed:
        metrics.FINALIZER_DEADLINES.inc()


# -- jobs ----------------------------------------------------------------------------------


@metrics.counted("job-event")
def job_event(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: Any,
    param: Any = None,
    **kwargs: Any,
) -> None:
    """A job changed or was deleted: make its auto KVNamespace, check the ones that
    reference it. ``param``: the job's :class:`JobKind`."""
    rule: JobKind = param
    kvnamespaces_by_job: kopf.Index[Any, str] = kwargs["kvnamespaces_by_job"]
    existing: kopf.Index[Any, Any] = kwargs["kvnamespaces"]
    reconciler = _reconciler(memo)
    if namespace is None:
        return
    job = _plain(body)
    event = kwargs.get("type")
    # From the index, no API call: is the KVNamespace of this name the one made for
    # this job? Then nothing to do; another one: report it once per appearance.
    infos = list(existing.get((namespace, name), []))
    made_for = f"{rule.api_version}/{rule.kind}/{name}"
    known = any(info.created_for == made_for for info in infos)
    appeared = event in (None, "ADDED")
    if event != "DELETED" and wants_auto(job) and not known and (appeared or not infos):
        try:
            problem = ensure_auto(reconciler.kube, job, rule)
        except TemporaryFailure as exc:
            logger.warning("%s %s/%s: auto KVNamespace: %s", rule.kind, namespace, name, exc)
            problem = None
        # Once per job appearance (not at every status change of a running job).
        if problem is not None and appeared:
            _post_event(job, type="Warning", reason="KVNamespaceConflict", message=problem)
    for kvns in kvnamespaces_by_job.get((namespace, rule.key, name), []):
        current = reconciler.kube.get_kvnamespace(namespace, kvns)
        if current is None:
            continue
        try:
            reconciler.check_job(current)
        except TemporaryFailure as exc:
            metrics.mark_retry()
            logger.warning("KVNamespace %s/%s: job check will be retried: %s", namespace, kvns, exc)


# -- pods ----------------------------------------------------------------------------------


@metrics.counted(WEBHOOK_ID)
def inject(
    body: kopf.Body,
    patch: kopf.Patch,
    warnings: list[str],
    param: Any = None,
    **kwargs: Any,
) -> None:
    """Admission of a new pod: inject its KVNamespace's Secret (see :mod:`.webhook`).

    ``param``: the :class:`WebhookContext`.
    """
    context: WebhookContext = param
    kvnamespaces: kopf.Index[Any, webhook.KVNamespaceInfo] = kwargs["kvnamespaces"]
    autos: kopf.Index[Any, str] = kwargs["auto_kvnamespaces"]
    pod = _plain(body)
    namespace = (pod.get("metadata") or {}).get("namespace")

    def lookup(name: str) -> webhook.KVNamespaceInfo | None:
        for info in kvnamespaces.get((namespace, name), []):
            return info
        return None

    def auto(label: str, job: str) -> tuple[str, bool] | None:
        key = (namespace, label, job)
        for found in autos.get(key, []):
            return found, True
        if any(key in kwargs[index] for index in context.auto_job_indices):
            return job, False
        return None

    try:
        mutation = webhook.mutate_pod(pod, namespace, lookup, auto, context.pod_labels)
    except webhook.AdmissionDenied as exc:
        raise kopf.AdmissionError(str(exc), code=403) from exc
    warnings.extend(mutation.warnings)
    if mutation.ops:
        ops = mutation.ops
        patch.fns.append(lambda raw: webhook.apply_ops(raw, ops))  # type: ignore[arg-type]


# -- registration --------------------------------------------------------------------------


def register(registry: kopf.OperatorRegistry, cfg: OperatorSettings) -> None:
    """Register every handler of the operator into ``registry`` (with ``cfg``'s timings,
    job kinds and webhook switch)."""
    resource = (model.GROUP, model.VERSION, model.PLURAL)
    on = kopf.on
    on.login(id="login", registry=registry)(login)
    on.startup(id="startup", registry=registry, param=cfg)(startup)
    on.cleanup(id="cleanup", registry=registry)(cleanup)

    kopf.index(*resource, id="kvnamespaces", registry=registry)(index_kvnamespaces)
    kopf.index(*resource, id="kvnamespaces_by_job", registry=registry)(index_kvnamespaces_by_job)
    kopf.index(*resource, id="auto_kvnamespaces", registry=registry, param=cfg.job_kinds)(
        index_auto_kvnamespaces
    )

    for on_reason in (on.update, on.create, on.resume):
        on_reason(*resource, id="reconcile", registry=registry)(reconcile)
    # initial_delay: kopf would otherwise run the timer as soon as it sees an object,
    # racing the create handler that is provisioning it (a second provisioning pass and
    # job check per object, a third more API calls in a storm of new KVNamespaces).
    kopf.timer(
        *resource,
        id="recheck",
        registry=registry,
        interval=cfg.job_check_interval,
        initial_delay=cfg.job_check_interval,
    )(recheck)

    auto_job_indices: list[str] = []
    for rule in cfg.job_kinds:
        kind = (rule.group, rule.version, rule.plural)
        if rule.pod_label:
            index_id = f"auto-jobs.{rule.plural}.{rule.group}"
            auto_job_indices.append(index_id)
            auto_only = {model.AUTO_ANNOTATION: model.AUTO_VALUE}
            kopf.index(*kind, id=index_id, annotations=auto_only, param=rule, registry=registry)(
                index_auto_jobs
            )
        # kopf watches CRDs: a kind whose CRD is installed later is watched from then on.
        event_id = f"{rule.plural}.{rule.group}-events"
        on.event(*kind, id=event_id, param=rule, registry=registry)(job_event)

    on.delete(*resource, id="finalize", registry=registry)(finalize)

    if cfg.webhook_enabled:
        context = WebhookContext(
            pod_labels=tuple(dict.fromkeys(k.pod_label for k in cfg.job_kinds if k.pod_label)),
            auto_job_indices=tuple(auto_job_indices),
        )
        on.mutate(
            "", "v1", "pods", id=WEBHOOK_ID, operations=["CREATE"], param=context, registry=registry
        )(inject)


async def _audit_loop(reconciler: Reconciler, cfg: OperatorSettings) -> None:
    while True:
        await asyncio.sleep(cfg.audit_interval)
        try:
            report = await asyncio.to_thread(reconciler.audit)
        except Exception as exc:  # the next round retries; never kill the operator for it
            metrics.AUDIT_RUNS.labels("error").inc()
            logger.warning("audit failed, will retry in %gs: %s", cfg.audit_interval, exc)
            continue
        metrics.AUDIT_RUNS.labels("skipped" if report.skipped else "success").inc()
        metrics.AUDIT_ORPHANS.inc(len(report.orphans))
        metrics.KEYS_DELETED.labels(metrics.AUDIT).inc(report.keys_deleted)
