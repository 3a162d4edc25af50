"""Kubernetes objects the operator builds (Secret, ownerReference, status) and the API calls.

The builders are pure functions. :class:`KubeApi` wraps the official client's blocking
calls (the kopf handlers that use it are synchronous and run in kopf's thread pool) and
returns plain dicts.
"""

from __future__ import annotations

import base64
import datetime
import threading
import time
from collections.abc import Mapping
from typing import Any

import kubernetes

from etha_operator import model

Obj = dict[str, Any]
MANAGED_BY = "etha-operator"


def iso(moment: datetime.datetime) -> str:
    """``moment`` as the API's timestamps are written (UTC, whole seconds, ``Z``).

    The operator never reads the wall clock here: callers pass their clock's ``now``, so
    one injected clock drives every timestamp the operator writes. A naive ``moment`` is
    taken as UTC.
    """
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def owner_reference(body: Mapping[str, Any]) -> Obj:
    """A controller ownerReference to the KVNamespace ``body`` (the Secret is its child)."""
    meta = body["metadata"]
    return {
        "apiVersion": model.API_VERSION,
        "kind": model.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def encode_data(env: Mapping[str, str]) -> dict[str, str]:
    return {key: base64.b64encode(value.encode()).decode("ascii") for key, value in env.items()}


def decode_data(secret: Mapping[str, Any]) -> dict[str, str]:
    data = secret.get("data") or {}
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def build_secret(body: Mapping[str, Any], env: Mapping[str, str]) -> Obj:
    """The Secret holding exactly ``env`` (the ``ETHA_KV_*`` variables), owned by ``body``."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": model.secret_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                model.POD_LABEL: meta["name"],
            },
            "ownerReferences": [owner_reference(body)],
        },
        "data": encode_data(env),
    }


def condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    previous: list[Obj] | None = None,
    *,
    now: datetime.datetime,
) -> Obj:
    """A status condition; ``lastTransitionTime`` only moves (to ``now``) when ``status``
    changes from the one of the same type in ``previous``."""
    value = "True" if status else "False"
    transition = iso(now)
    for old in previous or []:
        if (
            old.get("type") == type_
            and old.get("status") == value
            and old.get("lastTransitionTime")
        ):
            transition = old["lastTransitionTime"]
    cond: Obj = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def with_condition(conditions: list[Obj] | None, new: Obj) -> list[Obj]:
    """``conditions`` with ``new`` replacing the one of the same type."""
    kept = [c for c in conditions or [] if c.get("type") != new["type"]]
    return [*kept, new]


class KubeApi:
    """The few API calls the operator makes; every method returns plain dicts."""

    def __init__(self, client: Any, discovery_interval: float = 10.0) -> None:
        # The client's generated stubs are typed loosely; Any keeps mypy honest elsewhere.
        self.client: Any = client
        self.core: Any = kubernetes.client.CoreV1Api(client)
        self.custom: Any = kubernetes.client.CustomObjectsApi(client)
        self.discovery_interval = discovery_interval
        self._served: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        self._served_lock = threading.Lock()

    @classmethod
    def from_environment(cls, discovery_interval: float = 10.0) -> KubeApi:
        """In-cluster service account, else the kubeconfig (``KUBECONFIG``)."""
        config: Any = kubernetes.config
        try:
            config.load_incluster_config()
            return cls(kubernetes.client.ApiClient(), discovery_interval)
        except config.ConfigException:
            return cls(config.new_client_from_config(), discovery_interval)

    def close(self) -> None:
        self.client.close()

    def _plain(self, obj: Any) -> Obj:
        result: Obj = self.client.sanitize_for_serialization(obj)
        return result

    @staticmethod
    def _not_found(exc: kubernetes.client.ApiException) -> bool:
        return bool(exc.status == 404)

    # -- KVNamespaces ----------------------------------------------------------------------

    def get_kvnamespace(self, namespace: str, name: str) -> Obj | None:
        try:
            obj: Obj = self.custom.get_namespaced_custom_object(
                model.GROUP, model.VERSION, namespace, model.PLURAL, name
            )
        except kubernetes.client.ApiException as exc:
            if self._not_found(exc):
                return None
            raise
        return obj

    def list_kvnamespaces(self, namespaces: tuple[str, ...] = ()) -> list[Obj]:
        """Every KVNamespace (cluster-wide when ``namespaces`` is empty)."""
        if not namespaces:
            result = self.custom.list_cluster_custom_object(
                model.GROUP, model.VERSION, model.PLURAL
            )
            return list(result.get("items", []))
        items: list[Obj] = []
        for namespace in namespaces:
            result = self.custom.list_namespaced_custom_object(
                model.GROUP, model.VERSION, namespace, model.PLURAL
            )
            items.extend(result.get("items", []))
        return items

    def patch_kvnamespace_status(
        self, namespace: str, name: str, status: model.KVNamespaceStatus
    ) -> Obj | None:
        """Merge-patch ``status`` into ``.status``; None if the object is gone."""
        try:
            obj: Obj = self.custom.patch_namespaced_custom_object_status(
                model.GROUP,
                model.VERSION,
                namespace,
                model.PLURAL,
                name,
                {"status": status.to_patch()},
                _content_type="application/merge-patch+json",
            )
        except kubernetes.client.ApiException as exc:
            if self._not_found(exc):
                return None
            raise
        return obj

    # -- Secrets ---------------------------------------------------------------------------

    def get_secret(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._plain(self.core.read_namespaced_secret(name, namespace))
        except kubernetes.client.ApiException as exc:
            if self._not_found(exc):
                return None
            raise

    def create_secret(self, secret: Obj) -> Obj:
        namespace = secret["metadata"]["namespace"]
        return self._plain(self.core.create_namespaced_secret(namespace, secret))

    def replace_secret_data(self, namespace: str, name: str, data: Mapping[str, str]) -> Obj:
        """Set the Secret's data to exactly ``data`` (a JSON patch replaces the whole map)."""
        ops = [{"op": "replace", "path": "/data", "value": dict(data)}]
        return self._plain(self.core.patch_namespaced_secret(name, namespace, ops))

    def delete_secret(self, namespace: str, name: str) -> bool:
        """Delete the Secret; False if it was already gone."""
        try:
            self.core.delete_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as exc:
            if self._not_found(exc):
                return False
            raise
        return True

    def create_kvnamespace(self, body: Obj) -> Obj | None:
        """Create a KVNamespace; None if one of that name exists already (409)."""
        namespace = body["metadata"]["namespace"]
        try:
            obj: Obj = self.custom.create_namespaced_custom_object(
                model.GROUP, model.VERSION, namespace, model.PLURAL, body
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                return None
            raise
        return obj

    # -- Jobs ------------------------------------------------------------------------------

    def served(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``group/version`` (discovery).

        Answers are reused for ``discovery_interval`` seconds, so a CRD installed later
        is seen within that time without a restart.
        """
        key = (group, version)
        with self._served_lock:
            cached = self._served.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.discovery_interval:
            return plural in cached[1]
        try:
            found = self._plain(self.custom.get_api_resources(group, version))
            names = frozenset(r.get("name", "") for r in found.get("resources") or [])
        except kubernetes.client.ApiException as exc:
            if not self._not_found(exc):
                raise
            names = frozenset()
        with self._served_lock:
            self._served[key] = (time.monotonic(), names)
        return plural in names

    def get_job(self, namespace: str, job: model.JobRef) -> Obj | None:
        rule = job.rule
        try:
            obj: Obj = self.custom.get_namespaced_custom_object(
                rule.group, rule.version, namespace, job.plural, job.name
            )
        except kubernetes.client.ApiException as exc:
            if self._not_found(exc):
                return None
            raise
        return obj
