"""A stateful Kubernetes API emulator for operator tests, built on kmock.

kmock 0.8 serves discovery and parses requests well, but its object store has gaps that
break kopf and the official client (see platform-findings.md): no resourceVersion, uid,
creationTimestamp or generation; namespace not taken from the URL; watch snapshot taken
before subscribing; 200 instead of 201 on create; no PUT; no JSON patch ``test``; status
not separated from the main endpoint; ``/api/v1/namespaces`` answering 500; the core
groupVersion reported as ``/v1``. This module keeps kmock's server, request parsing and
discovery, and replaces the object store with :class:`_Store`, which fixes all of them.

What it still does not do, on purpose: call admission webhooks, validate objects against
schemas, or run controllers (no Job controller). Tests play those parts: they post
AdmissionReviews to the webhook, validate specs with jsonschema, and patch Job status.
It does run a minimal garbage collector: deleting an owner deletes objects whose
ownerReferences name its uid (background propagation).

The server runs in a thread with its own event loop on 127.0.0.1 and a free port; the
synchronous helpers (:meth:`KubeEmulator.create` ...) are for test code.
"""

from __future__ import annotations

import asyncio
import builtins
import copy
import datetime
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

from tests.support.ports import free_port, wait_port

T = TypeVar("T")

Obj = dict[str, Any]

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "kvnamespace.yaml"


@dataclass(frozen=True)
class ResourceKind:
    """What the store needs to know about one resource type."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


class ApiError(Exception):
    """An error answered as a Kubernetes ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
        }


def job_crd(group: str, version: str, kind: str, plural: str) -> Obj:
    """A minimal namespaced CRD with a status subresource (what a job controller installs)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge: lists are replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _parse_selector(raw: str | None) -> list[tuple[str, str, set[str]]]:
    """Equality/existence label selectors: ``a=b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``."""
    if not raw:
        return []
    terms: list[tuple[str, str, set[str]]] = []
    parts, depth, current = [], 0, ""
    for ch in raw:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for part in (p.strip() for p in parts if p.strip()):
        if " notin " in part:
            key, values = part.split(" notin ", 1)
            terms.append((key.strip(), "notin", set(values.strip(" ()").split(","))))
        elif " in " in part:
            key, values = part.split(" in ", 1)
            terms.append((key.strip(), "in", {v.strip() for v in values.strip(" ()").split(",")}))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            terms.append((key.strip(), "!=", {value.strip()}))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            terms.append((key.strip(), "=", {value.strip()}))
        elif part.startswith("!"):
            terms.append((part[1:].strip(), "!", set()))
        else:
            terms.append((part, "exists", set()))
    return terms


def _selected(obj: Obj, terms: list[tuple[str, str, set[str]]]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, op, values in terms:
        present, value = key in labels, labels.get(key)
        ok = {
            "=": present and value in values,
            "in": present and value in values,
            "!=": not present or value not in values,
            "notin": not present or value not in values,
            "!": not present,
            "exists": present,
        }[op]
        if not ok:
            return False
    return True


@dataclass
class _Watch:
    kind: ResourceKind
    namespace: str | None
    name: str | None
    selector: list[tuple[str, str, set[str]]]
    queue: asyncio.Queue[Obj] = field(default_factory=asyncio.Queue)

    def wants(self, obj: Obj) -> bool:
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return _selected(obj, self.selector)


class _Store:
    """Objects of every resource, a global resourceVersion, watch fan-out and history.

    Every method runs on the emulator's event loop; no locking is needed beyond that.
    """

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, str], ResourceKind] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str | None, str], Obj]] = {}
        self.history: dict[tuple[str, str], list[tuple[int, Obj]]] = {}
        self.watches: list[_Watch] = []
        self.revision = itertools.count(1000)
        self.last_rv = 999

    def register(self, kind: ResourceKind) -> None:
        key = (kind.group, kind.plural)
        self.kinds[key] = kind
        self.objects.setdefault(key, {})
        self.history.setdefault(key, [])

    def kind(self, group: str, plural: str) -> ResourceKind:
        try:
            return self.kinds[(group, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", f"the server could not find {plural}.{group}") from None

    def _bump(self, obj: Obj) -> None:
        self.last_rv = next(self.revision)
        obj["metadata"]["resourceVersion"] = str(self.last_rv)

    def _emit(self, kind: ResourceKind, event_type: str, obj: Obj) -> None:
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        self.history[(kind.group, kind.plural)].append((self.last_rv, event))
        for watch in self.watches:
            if watch.kind == kind and watch.wants(obj):
                watch.queue.put_nowait(event)

    def _key(self, kind: ResourceKind, namespace: str | None, name: str) -> tuple[str | None, str]:
        return (namespace if kind.namespaced else None, name)

    def get(self, kind: ResourceKind, namespace: str | None, name: str) -> Obj:
        obj = self.objects[(kind.group, kind.plural)].get(self._key(kind, namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind.plural}.{kind.group} "{name}" not found')
        return obj

    def list(
        self, kind: ResourceKind, namespace: str | None, selector: str | None = None
    ) -> list[Obj]:
        terms = _parse_selector(selector)
        return [
            copy.deepcopy(obj)
            for (ns, _), obj in sorted(
                self.objects[(kind.group, kind.plural)].items(), key=lambda kv: str(kv[0])
            )
            if (namespace is None or ns == namespace) and _selected(obj, terms)
        ]

    def create(self, kind: ResourceKind, namespace: str | None, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            if namespace is None:
                namespace = meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise ApiError(422, "Invalid", "metadata.name: Required value")
        key = self._key(kind, namespace, meta["name"])
        if key in self.objects[(kind.group, kind.plural)]:
            raise ApiError(
                409, "AlreadyExists", f'{kind.plural}.{kind.group} "{meta["name"]}" already exists'
            )
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        if kind.status_subresource:
            obj.pop("status", None)
        self._bump(obj)
        self.objects[(kind.group, kind.plural)][key] = obj
        self._emit(kind, "ADDED", obj)
        return copy.deepcopy(obj)

    def update(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str,
        change: Callable[[Obj], Obj],
        subresource: str | None,
    ) -> Obj:
        """Apply ``change`` (a pure function of the current object) under the API's rules."""
        current = self.get(kind, namespace, name)
        new = change(copy.deepcopy(current))
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patched object is not an object")
        meta = new.setdefault("metadata", {})
        # Identity and server-owned fields cannot be changed by clients.
        for fixed in ("uid", "name", "namespace", "creationTimestamp", "generation"):
            if fixed in current["metadata"]:
                meta[fixed] = current["metadata"][fixed]
            else:
                meta.pop(fixed, None)
        if "deletionTimestamp" in current["metadata"]:
            meta["deletionTimestamp"] = current["metadata"]["deletionTimestamp"]
        else:
            meta.pop("deletionTimestamp", None)
        new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
        if subresource == "status":
            # Only the status changes through /status.
            new = {**current, "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        elif kind.status_subresource:
            if "status" in current:
                new["status"] = current["status"]
            else:
                new.pop("status", None)
        elif subresource:
            raise ApiError(404, "NotFound", f"subresource {subresource} is not served")
        if new == current:
            return copy.deepcopy(current)
        spec_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in current.items() if k not in ("metadata", "status")
        }
        if spec_changed:
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        self._bump(new)
        self.objects[(kind.group, kind.plural)][self._key(kind, namespace, name)] = new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(kind, namespace, name)
        else:
            self._emit(kind, "MODIFIED", new)
        return copy.deepcopy(new)

    def delete(self, kind: ResourceKind, namespace: str | None, name: str) -> Obj:
        current = self.get(kind, namespace, name)
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(current)
                new["metadata"]["deletionTimestamp"] = _now()
                self._bump(new)
                self.objects[(kind.group, kind.plural)][self._key(kind, namespace, name)] = new
                self._emit(kind, "MODIFIED", new)
                return copy.deepcopy(new)
            return copy.deepcopy(current)
        return self._remove(kind, namespace, name)

    def _remove(self, kind: ResourceKind, namespace: str | None, name: str) -> Obj:
        obj = self.objects[(kind.group, kind.plural)].pop(self._key(kind, namespace, name))
        self._bump(obj)
        self._emit(kind, "DELETED", obj)
        self._collect_garbage(obj["metadata"]["uid"])
        return copy.deepcopy(obj)

    def _collect_garbage(self, owner_uid: str) -> None:
        for (group, plural), objects in list(self.objects.items()):
            kind = self.kinds[(group, plural)]
            for (ns, name), obj in list(objects.items()):
                refs = obj.get("metadata", {}).get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    with suppress(ApiError):
                        self.delete(kind, ns, name)

    def subscribe(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str | None,
        selector: str | None,
        since: int | None,
    ) -> _Watch:
        """A watch that first replays history after ``since`` (or every object as ADDED)."""
        watch = _Watch(kind, namespace, name, _parse_selector(selector))
        if since is None:
            for obj in self.list(kind, namespace, selector):
                if watch.wants(obj):
                    watch.queue.put_nowait({"type": "ADDED", "object": obj})
        else:
            for rv, event in self.history[(kind.group, kind.plural)]:
                if rv > since and watch.wants(event["object"]):
                    watch.queue.put_nowait(copy.deepcopy(event))
        self.watches.append(watch)
        return watch


@dataclass
class _Path:
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def _parse_path(path: str) -> _Path | None:
    """Resource URLs only: /api/v1/... and /apis/g/v/...; None for discovery paths."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return _Path(group, version, plural, namespace, name, subresource)


def _json_path(obj: Any, path: str) -> Any:
    """A simple JSON path (``.status.phase``); None where a step is missing."""
    value = obj
    for step in path.strip().lstrip(".").split("."):
        if not isinstance(value, dict) or step not in value:
            return None
        value = value[step]
    return value


def _age(timestamp: str) -> str:
    """The API server's rendering of a ``date`` column: ``42s``, ``5m12s``, ``3h``, ``2d``."""
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
    except ValueError:
        return timestamp
    seconds = max(0, int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    return f"{hours}h" if hours < 48 else f"{hours // 24}d"


def _fields_selected(obj: Obj, selector: str | None) -> bool:
    """Field selectors: ``a.b=v``, ``a.b==v``, ``a.b!=v``, comma-separated (all must hold)."""
    for term in (t.strip() for t in (selector or "").split(",") if t.strip()):
        negate = "!=" in term
        path, _, want = term.replace("!=", "=").replace("==", "=").partition("=")
        value = _json_path(obj, path)
        have = "" if value is None else str(value)
        if (have == want) == negate:
            return False
    return True


@dataclass
class Hold:
    """Requests matching (method, plural, subresource) wait until :meth:`release`.

    Test fault injection: with ``fail=True`` the held requests are answered 503 and
    change nothing, as if the API server never got them.
    """

    method: str
    plural: str
    subresource: str | None = None
    fail: bool = False
    name: str | None = None
    reached: threading.Event = field(default_factory=threading.Event)
    _released: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def matches(self, method: str, path: _Path, body: bytes) -> bool:
        if (self.method, self.plural, self.subresource) != (method, path.plural, path.subresource):
            return False
        if self.name is None or path.name == self.name:
            return True
        # A create names its object in the body, not in the URL.
        if path.name is not None:
            return False
        try:
            created = json.loads(body or b"{}")
        except ValueError:
            return False
        return (
            isinstance(created, dict) and (created.get("metadata") or {}).get("name") == self.name
        )

    def release(self, fail: bool | None = None) -> None:
        if fail is not None:
            self.fail = fail
        if self._loop is not None and self._released is not None:
            self._loop.call_soon_threadsafe(self._released.set)


class KubeEmulator(kmock.KubernetesScaffold):
    """kmock's scaffold (discovery, errors, server) with a correct stateful object store."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store = _Store()
        #: (group, plural) -> a CRD version's additionalPrinterColumns (Table output)
        self.printer_columns: dict[tuple[str, str], list[Obj]] = {}
        self.holds: list[Hold] = []
        self.request_log: list[tuple[str, str]] = []
        self.resources.load_bundled()
        for key, info in list(self.resources.items()):
            if not isinstance(key, kmock.resource) or not isinstance(info, kmock.ResourceInfo):
                continue  # the bundled list holds only these; the mapping's type allows more
            self.store.register(
                ResourceKind(
                    group=key.group or "",
                    version=key.version or "v1",
                    plural=key.plural or "",
                    kind=info.kind or "",
                    namespaced=bool(info.namespaced),
                    status_subresource="status" in info.subresources,
                )
            )
        self.add_crd(yaml.safe_load(CRD_PATH.read_text()))

    def add_crd(self, crd: Obj) -> None:
        """Serve a CustomResourceDefinition's resource (discovery + storage)."""
        spec = crd["spec"]
        for version in spec["versions"]:
            kind = ResourceKind(
                group=spec["group"],
                version=version["name"],
                plural=spec["names"]["plural"],
                kind=spec["names"]["kind"],
                namespaced=spec["scope"] == "Namespaced",
                status_subresource="status" in (version.get("subresources") or {}),
            )
            self.resources[f"{kind.group}/{kind.version}/{kind.plural}"] = kmock.ResourceInfo(
                kind=kind.kind,
                singular=spec["names"].get("singular"),
                namespaced=kind.namespaced,
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                shortnames=set(spec["names"].get("shortNames", [])),
                categories=set(spec["names"].get("categories", [])),
                subresources={"status"} if kind.status_subresource else set(),
            )
            self.store.register(kind)
            if version.get("additionalPrinterColumns"):
                self.printer_columns[(kind.group, kind.plural)] = version[
                    "additionalPrinterColumns"
                ]
        crds = self.store.kind("apiextensions.k8s.io", "customresourcedefinitions")
        with suppress(ApiError):
            self.store.create(crds, None, crd)

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        if isinstance(result, dict) and result.get("groupVersion", "").startswith("/"):
            result["groupVersion"] = result["groupVersion"][1:]  # kmock says "/v1" for core
        if isinstance(result, dict):
            # kmock gives subresources (kvnamespaces/status) their parent's short names and
            # categories; kubectl then warns that "kvns" is ambiguous. The API server does not.
            for resource in result.get("resources") or []:
                if "/" in resource.get("name", ""):
                    resource.pop("shortNames", None)
                    resource.pop("categories", None)
        return result

    async def _serve_api(self, request: kmock.Request) -> Any:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's URL parser raises on /api/v1/namespaces (its 500); build the request here.
        try:
            kmock_parsing.parse_path(raw_request.path)
        except ValueError:
            request = kmock.Request(
                method=raw_request.method,
                url=raw_request.url,
                params=dict(raw_request.query),
                headers=dict(raw_request.headers),
                body=await raw_request.read(),
                raw_request=raw_request,
            )
            return await self._handle(request)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        path = _parse_path(request.url.path)
        if raw is not None and request.url.path == "/apis/":  # the official client's spelling
            return self._json(await self._serve_apis(request))
        if raw is not None and request.url.path == "/api/":
            return self._json(await self._serve_api(request))
        if raw is not None and request.url.path.rstrip("/").startswith("/openapi/v3"):
            return self._openapi_v3(request.url.path.rstrip("/"))
        if raw is None or path is None:
            return await super()._handle(request)
        self.request_log.append((request.method.value, request.url.path))
        try:
            for hold in list(self.holds):
                if hold.matches(request.method.value, path, request.body):
                    hold.reached.set()
                    if hold._released is not None:
                        await hold._released.wait()
                    if hold.fail:
                        raise ApiError(503, "ServiceUnavailable", "dropped by a test hold")
            kind = self.store.kind(path.group, path.plural)
            method = request.method.value
            params = request.params
            if method == "GET" and params.get("watch") in ("true", "1"):
                return await self._watch(raw, kind, path, params)
            wants_table = "as=Table" in request.headers.get("Accept", "")
            if method == "GET" and path.name is None:
                items = self.store.list(kind, path.namespace, params.get("labelSelector"))
                items = [o for o in items if _fields_selected(o, params.get("fieldSelector"))]
                if wants_table:
                    return self._json(self._table(kind, items))
                return self._json(
                    {
                        "apiVersion": kind.api_version,
                        "kind": f"{kind.kind}List",
                        "metadata": {"resourceVersion": str(self.store.last_rv)},
                        "items": items,
                    }
                )
            if path.name is None:
                if method == "POST":
                    try:
                        body = json.loads(request.body or b"{}")
                    except ValueError:
                        # kubectl's typed commands (`kubectl create namespace`) send protobuf.
                        raise ApiError(
                            415, "UnsupportedMediaType", "the emulator accepts JSON bodies only"
                        ) from None
                    if params.get("dryRun"):
                        return self._json(body, 201)
                    return self._json(self.store.create(kind, path.namespace, body), 201)
                raise ApiError(405, "MethodNotAllowed", f"{method} on a collection")
            if method == "GET":
                obj = self.store.get(kind, path.namespace, path.name)
                if wants_table and path.subresource is None:
                    return self._json(self._table(kind, [obj]))
                return self._json(obj)
            if method == "DELETE":
                return self._json(self.store.delete(kind, path.namespace, path.name))
            if method in ("PATCH", "PUT"):
                change = self._change(method, request)
                return self._json(
                    self.store.update(kind, path.namespace, path.name, change, path.subresource)
                )
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        except ApiError as exc:
            return self._json(exc.status(), exc.code)

    def _table(self, kind: ResourceKind, objects: list[Obj]) -> Obj:
        """A ``meta.k8s.io/v1`` Table, as the API server answers ``kubectl get``.

        Columns: Name, then the CRD's additionalPrinterColumns (simple ``.a.b`` JSON
        paths; a ``date`` column shows the age), or Name and Age for other kinds.
        """
        columns = self.printer_columns.get(
            (kind.group, kind.plural),
            [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
        )
        definitions = [
            {"name": "Name", "type": "string", "format": "name", "priority": 0,
             "description": "Name must be unique within a namespace."}
        ] + [
            {"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
             "priority": c.get("priority", 0), "description": c.get("description", "")}
            for c in columns
        ]  # fmt: skip
        rows = []
        for obj in objects:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column in columns:
                value = _json_path(obj, column["jsonPath"])
                if column.get("type") == "date" and isinstance(value, str):
                    value = _age(value)
                cells.append(value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj["metadata"],
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.store.last_rv)},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    def _openapi_v3(self, path: str) -> aiohttp.web.Response:
        """Just enough OpenAPI v3 for kubectl's validation to choose server-side validation.

        kubectl (``--validate=strict``, its default) asks whether the server supports the
        ``fieldValidation`` parameter for the kind's PATCH; it does here, so kubectl skips
        client-side schema checks and sends ``fieldValidation=Strict``, which this emulator
        accepts without validating (see the module docstring).
        """
        by_gv: dict[str, list[ResourceKind]] = {}
        for kind in self.store.kinds.values():
            prefix = f"apis/{kind.group}/{kind.version}" if kind.group else f"api/{kind.version}"
            by_gv.setdefault(prefix, []).append(kind)
        if path == "/openapi/v3":
            return self._json(
                {
                    "paths": {
                        gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash=emulator"}
                        for gv in sorted(by_gv)
                    }
                }
            )
        kinds = by_gv.get(path.removeprefix("/openapi/v3/"))
        if kinds is None:
            return self._json(ApiError(404, "NotFound", f"no OpenAPI for {path}").status(), 404)
        paths: Obj = {}
        schemas: Obj = {}
        for kind in kinds:
            gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
            base = f"/{path.removeprefix('/openapi/v3/')}"
            collection = (
                f"{base}/namespaces/{{namespace}}/{kind.plural}"
                if kind.namespaced
                else f"{base}/{kind.plural}"
            )
            params = [
                {"name": name, "in": "query", "schema": {"type": "string"}}
                for name in ("dryRun", "fieldManager", "fieldValidation")
            ]
            # kubectl looks for the PATCH of a single object carrying the kind (an object,
            # not a list, in this extension) and the fieldValidation parameter.
            for where, verb, action in (
                (collection, "post", "post"),
                (f"{collection}/{{name}}", "patch", "patch"),
            ):
                paths[where] = {
                    verb: {
                        "operationId": f"{action}{kind.kind}",
                        "x-kubernetes-action": action,
                        "x-kubernetes-group-version-kind": gvk,
                        "parameters": params,
                        "responses": {"200": {"description": "OK"}},
                    }
                }
            schemas[f"{kind.group or 'core'}.{kind.version}.{kind.kind}"] = {
                "type": "object",
                "x-kubernetes-group-version-kind": [gvk],
            }
        return self._json(
            {
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes emulator", "version": "v1.37.0"},
                "paths": paths,
                "components": {"schemas": schemas},
            }
        )

    @staticmethod
    def _change(method: str, request: kmock.Request) -> Callable[[Obj], Obj]:
        try:
            payload = json.loads(request.body or b"null")
        except ValueError:
            raise ApiError(400, "BadRequest", "the body is not JSON") from None
        headers = {k.lower(): v for k, v in request.headers.items()}
        content_type = headers.get("content-type", "").split(";")[0].strip()

        if method == "PUT":

            def replace(current: Obj) -> Obj:
                want = payload.get("metadata", {}).get("resourceVersion")
                if want and want != current["metadata"]["resourceVersion"]:
                    raise ApiError(409, "Conflict", "the object has been modified")
                return dict(payload)

            return replace
        if content_type == "application/json-patch+json":

            def apply(current: Obj) -> Obj:
                try:
                    return dict(jsonpatch.apply_patch(current, payload))
                except jsonpatch.JsonPatchTestFailed as exc:
                    raise ApiError(422, "Invalid", f"the JSON patch test failed: {exc}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise ApiError(422, "Invalid", f"the JSON patch is invalid: {exc}") from None

            return apply
        if content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):

            def merge(current: Obj) -> Obj:
                want = (payload or {}).get("metadata", {}).get("resourceVersion")
                if want and want != current["metadata"]["resourceVersion"]:
                    raise ApiError(409, "Conflict", "the object has been modified")
                return dict(merge_patch(current, payload))

            return merge
        raise ApiError(415, "UnsupportedMediaType", f"patch type {content_type!r}")

    async def _watch(
        self,
        raw: aiohttp.web.BaseRequest,
        kind: ResourceKind,
        path: _Path,
        params: dict[str, str] | Any,
    ) -> aiohttp.web.StreamResponse:
        since_raw = params.get("resourceVersion")
        since = int(since_raw) if since_raw and since_raw != "0" else None
        timeout = float(params.get("timeoutSeconds") or 1800)
        name = path.name
        field_selector = params.get("fieldSelector") or ""
        if field_selector.startswith("metadata.name="):
            name = field_selector.split("=", 1)[1]
        initial = params.get("sendInitialEvents") in ("true", "1")
        if initial:
            since = None  # a watch list: every current object first, as ADDED
        watch = self.store.subscribe(kind, path.namespace, name, params.get("labelSelector"), since)
        if initial:
            # ... then the bookmark that says the initial list is complete (client-go's
            # WatchListClient, e.g. `kubectl delete` waiting for the object to go).
            watch.queue.put_nowait(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": kind.api_version,
                        "kind": kind.kind,
                        "metadata": {
                            "resourceVersion": str(self.store.last_rv),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }
            )
        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"}
        )
        await response.prepare(raw)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watch.queue.get(), timeout=remaining)
                except asyncio.TimeoutError:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.watches.remove(watch)
        with suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response

    @staticmethod
    def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(data, status=status)


class EmulatorServer:
    """Runs a :class:`KubeEmulator` in a thread; synchronous helpers for tests.

    ``with EmulatorServer() as kube: ...`` starts it on a free port and stops it (and
    its thread) on exit.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.emulator: KubeEmulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- lifetime ------------------------------------------------------------------------

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator failed to start: {self._error!r}")
        wait_port("127.0.0.1", self.port)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = KubeEmulator()
        self.emulator = emulator
        async with emulator, kmock.Server(emulator, host="127.0.0.1", port=self.port):
            self._started.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that points kopf and the kubernetes client at this emulator."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- synchronous helpers (run on the emulator's loop) ------------------------------------

    def _call(self, fn: Callable[[_Store], T]) -> T:
        assert self._loop is not None and self.emulator is not None
        store = self.emulator.store

        async def run() -> T:
            return fn(store)

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout=30)

    def _kind(self, store: _Store, api_version: str, plural: str) -> ResourceKind:
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        return store.kind(group, plural)

    def create(self, api_version: str, plural: str, body: Obj, namespace: str | None = None) -> Obj:
        return self._call(
            lambda s: s.create(
                self._kind(s, api_version, plural),
                namespace or body.get("metadata", {}).get("namespace"),
                body,
            )
        )

    def get(self, api_version: str, plural: str, name: str, namespace: str | None = None) -> Obj:
        return self._call(
            lambda s: copy.deepcopy(s.get(self._kind(s, api_version, plural), namespace, name))
        )

    def find(
        self, api_version: str, plural: str, name: str, namespace: str | None = None
    ) -> Obj | None:
        try:
            return self.get(api_version, plural, name, namespace)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None) -> list[Obj]:
        return self._call(lambda s: s.list(self._kind(s, api_version, plural), namespace))

    def patch(
        self,
        api_version: str,
        plural: str,
        name: str,
        patch: Obj,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Obj:
        return self._call(
            lambda s: s.update(
                self._kind(s, api_version, plural),
                namespace,
                name,
                lambda cur: dict(merge_patch(cur, patch)),
                subresource,
            )
        )

    def delete(self, api_version: str, plural: str, name: str, namespace: str | None = None) -> Obj:
        return self._call(lambda s: s.delete(self._kind(s, api_version, plural), namespace, name))

    def add_crd(self, crd: Obj) -> None:
        """Install a CustomResourceDefinition now: discovery serves it, a CRD watch sees it."""
        assert self.emulator is not None
        emulator = self.emulator
        self._call(lambda _: emulator.add_crd(crd))

    def collect_garbage(self) -> builtins.list[tuple[str, str | None, str]]:
        """One pass of Kubernetes' garbage collector: delete every object that has
        ownerReferences and none of whose owners exists any more (by uid).

        Deleting an object through this emulator already cascades to its dependents; this
        sweep covers owners that were gone before their dependents were created, as the
        real collector does. Returns (plural, namespace, name) of each object deleted.
        """

        def sweep(store: _Store) -> list[tuple[str, str | None, str]]:
            live = {
                obj["metadata"]["uid"]
                for objects in store.objects.values()
                for obj in objects.values()
            }
            deleted: list[tuple[str, str | None, str]] = []
            for (group, plural), objects in list(store.objects.items()):
                kind = store.kinds[(group, plural)]
                for (ns, name), obj in list(objects.items()):
                    refs = obj.get("metadata", {}).get("ownerReferences") or []
                    if refs and not any(ref.get("uid") in live for ref in refs):
                        with suppress(ApiError):
                            store.delete(kind, ns, name)
                            deleted.append((plural, ns, name))
            return deleted

        result: list[tuple[str, str | None, str]] = self._call(sweep)
        return result

    def events_for(self, name: str, namespace: str) -> builtins.list[Obj]:
        """Events whose involvedObject is ``name`` in ``namespace``, oldest first."""
        return [
            e
            for e in self.list("v1", "events", namespace)
            if e.get("involvedObject", {}).get("name") == name
        ]

    @contextmanager
    def hold(
        self,
        method: str,
        plural: str,
        subresource: str | None = None,
        fail: bool = False,
        name: str | None = None,
    ) -> Iterator[Hold]:
        """Make matching requests wait until the returned hold is released (or the block ends)."""
        assert self._loop is not None and self.emulator is not None
        emulator = self.emulator

        async def make() -> Hold:
            hold = Hold(
                method,
                plural,
                subresource,
                fail,
                name,
                _released=asyncio.Event(),
                _loop=asyncio.get_running_loop(),
            )
            emulator.holds.append(hold)
            return hold

        hold = asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout=10)
        try:
            yield hold
        finally:

            async def drop() -> None:
                if hold in emulator.holds:
                    emulator.holds.remove(hold)
                assert hold._released is not None
                hold._released.set()

            asyncio.run_coroutine_threadsafe(drop(), self._loop).result(timeout=10)
