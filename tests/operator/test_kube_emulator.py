"""The emulator fixes the kmock gaps that break kopf and the official client.

Each test is one gap from platform-findings.md, exercised over HTTP like a client would.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support.kube_emulator import EmulatorServer

pytestmark = pytest.mark.timeout(60)

SECRETS = "/api/v1/namespaces/ns1/secrets"
KVNS = "/apis/etha.io/v1alpha1/namespaces/ns1/kvnamespaces"


def call(
    kube: EmulatorServer,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - the emulator's http:// URL
        kube.url + path, data=data, method=method, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_create_answers_201_with_server_fields_and_the_url_namespace(kube: EmulatorServer) -> None:
    code, obj = call(kube, "POST", SECRETS, {"metadata": {"name": "s1"}, "data": {}})
    assert code == 201
    meta = obj["metadata"]
    assert meta["namespace"] == "ns1"
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    code, _ = call(kube, "POST", SECRETS, {"metadata": {"name": "s1"}})
    assert code == 409


def test_generate_name_works_repeatedly(kube: EmulatorServer) -> None:
    names = {
        call(kube, "POST", SECRETS, {"metadata": {"generateName": "gen-"}})[1]["metadata"]["name"]
        for _ in range(3)
    }
    assert len(names) == 3 and all(n.startswith("gen-") for n in names)


def test_json_patch_test_op_guards_the_resource_version(kube: EmulatorServer) -> None:
    _, obj = call(kube, "POST", SECRETS, {"metadata": {"name": "s2"}})
    rv = obj["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    code, patched = call(kube, "PATCH", f"{SECRETS}/s2", ops, "application/json-patch+json")
    assert code == 200 and patched["metadata"]["finalizers"] == ["x"]
    assert int(patched["metadata"]["resourceVersion"]) > int(rv)
    code, _ = call(kube, "PATCH", f"{SECRETS}/s2", ops, "application/json-patch+json")
    assert code == 422  # stale resourceVersion


def test_status_subresource_is_separate_and_generation_follows_the_spec(
    kube: EmulatorServer,
) -> None:
    body = {
        "apiVersion": "etha.io/v1alpha1",
        "kind": "KVNamespace",
        "metadata": {"name": "k1"},
        "spec": {"jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": "j"}},
        "status": {"phase": "Ready"},
    }
    _, obj = call(kube, "POST", KVNS, body)
    assert "status" not in obj  # status is ignored on create
    merge = "application/merge-patch+json"
    _, obj = call(kube, "PATCH", f"{KVNS}/k1", {"status": {"phase": "Ready"}}, merge)
    assert "status" not in obj and obj["metadata"]["generation"] == 1
    _, obj = call(kube, "PATCH", f"{KVNS}/k1/status", {"status": {"phase": "Ready"}}, merge)
    assert obj["status"] == {"phase": "Ready"} and obj["metadata"]["generation"] == 1
    _, obj = call(kube, "PATCH", f"{KVNS}/k1", {"spec": {"onJobEnd": "Keep"}}, merge)
    assert obj["metadata"]["generation"] == 2 and obj["status"] == {"phase": "Ready"}


def test_watch_from_a_list_resource_version_misses_nothing(kube: EmulatorServer) -> None:
    _, listing = call(kube, "GET", "/api/v1/namespaces/ns2/configmaps")
    rv = listing["metadata"]["resourceVersion"]
    # Created between the list and the watch: must be replayed by the watch.
    call(kube, "POST", "/api/v1/namespaces/ns2/configmaps", {"metadata": {"name": "c1"}})
    lines: list[dict[str, Any]] = []

    def watch() -> None:
        url = (
            f"{kube.url}/api/v1/namespaces/ns2/configmaps"
            f"?watch=true&resourceVersion={rv}&timeoutSeconds=2"
        )
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
            lines.extend(json.loads(line) for line in response if line.strip())

    thread = threading.Thread(target=watch)
    thread.start()
    call(kube, "DELETE", "/api/v1/namespaces/ns2/configmaps/c1")
    thread.join(15)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [
        ("ADDED", "c1"),
        ("DELETED", "c1"),
    ]


def test_finalizers_defer_deletion_and_owners_collect_their_children(kube: EmulatorServer) -> None:
    body = {
        "apiVersion": "etha.io/v1alpha1",
        "kind": "KVNamespace",
        "metadata": {"name": "owner", "finalizers": ["etha.io/cleanup"]},
        "spec": {"jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": "j"}},
    }
    _, owner = call(kube, "POST", KVNS, body)
    ref = {"apiVersion": "etha.io/v1alpha1", "kind": "KVNamespace", "name": "owner"}
    ref["uid"] = owner["metadata"]["uid"]
    call(kube, "POST", SECRETS, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    code, deleting = call(kube, "DELETE", f"{KVNS}/owner")
    assert code == 200 and deleting["metadata"]["deletionTimestamp"]
    assert call(kube, "GET", f"{KVNS}/owner")[0] == 200
    call(
        kube,
        "PATCH",
        f"{KVNS}/owner",
        {"metadata": {"finalizers": None}},
        "application/merge-patch+json",
    )
    assert call(kube, "GET", f"{KVNS}/owner")[0] == 404
    assert call(kube, "GET", f"{SECRETS}/child")[0] == 404


def test_discovery_reports_core_v1_and_the_crd(kube: EmulatorServer) -> None:
    _, core = call(kube, "GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    _, crd = call(kube, "GET", "/apis/etha.io/v1alpha1")
    [resource] = [r for r in crd["resources"] if r["name"] == "kvnamespaces"]
    assert resource["shortNames"] == ["kvns"] and resource["namespaced"] is True
    assert any(r["name"] == "kvnamespaces/status" for r in crd["resources"])
    assert call(kube, "GET", "/api/v1/namespaces")[0] == 200


def test_garbage_collection_removes_objects_whose_owners_are_all_gone(
    kube: EmulatorServer,
) -> None:
    """collect_garbage(): an object created after its owner was deleted (the cascade on
    delete cannot see it) is collected; one with a live owner stays."""
    owner = kube.create("v1", "configmaps", {"metadata": {"name": "owner"}}, "gc")
    gone = {"apiVersion": "v1", "kind": "ConfigMap", "name": "old", "uid": "0" * 36}
    live = {**gone, "name": "owner", "uid": owner["metadata"]["uid"]}
    kube.create(
        "v1", "configmaps", {"metadata": {"name": "orphan", "ownerReferences": [gone]}}, "gc"
    )
    kube.create(
        "v1", "configmaps", {"metadata": {"name": "child", "ownerReferences": [live]}}, "gc"
    )
    kube.create(
        "v1", "configmaps", {"metadata": {"name": "both", "ownerReferences": [gone, live]}}, "gc"
    )
    assert kube.collect_garbage() == [("configmaps", "gc", "orphan")]
    names = {c["metadata"]["name"] for c in kube.list("v1", "configmaps", "gc")}
    assert names == {"owner", "child", "both"}


def test_a_crd_installed_while_running_is_served(kube: EmulatorServer) -> None:
    from tests.support.kube_emulator import job_crd

    path = "/apis/ml.example.com/v1/namespaces/ns1/widgets"
    assert call(kube, "GET", path)[0] == 404
    kube.add_crd(job_crd("ml.example.com", "v1", "Widget", "widgets"))
    status, _ = call(kube, "POST", path, {"metadata": {"name": "w"}})
    assert status == 201
    status, found = call(kube, "GET", "/apis/ml.example.com/v1")
    assert status == 200 and "widgets" in {r["name"] for r in found["resources"]}
