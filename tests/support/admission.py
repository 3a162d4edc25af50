"""Pod admission as the Kubernetes API server does it, against the operator's webhook server.

:func:`review` POSTs an ``AdmissionReview`` for one object over HTTPS (verified with the
test CA) and returns the webhook's ``response``; :func:`worker_pod` is a pod as a job's
controller makes it; :func:`webhook_settings` are the operator settings that turn its
webhook server on with the test certificates. :class:`Webhook` holds both ends.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from etha_operator.handlers import WEBHOOK_PATH

from tests.support.tls import TLSFiles


def webhook_settings(tls: TLSFiles, port: int) -> dict[str, str]:
    """The ETHA_OPERATOR_WEBHOOK_* settings that serve the webhook on ``port`` with ``tls``."""
    return {
        "ETHA_OPERATOR_WEBHOOK_PORT": str(port),
        "ETHA_OPERATOR_WEBHOOK_CERT_FILE": str(tls.server_cert),
        "ETHA_OPERATOR_WEBHOOK_KEY_FILE": str(tls.server_key),
    }


def worker_pod(labels: dict[str, str], **metadata: str) -> dict[str, Any]:
    """A pod with ``labels`` (and more ``metadata``, e.g. a name) and one worker container."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "worker-", **metadata, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "python:3.11-slim"}]},
    }


def review(
    tls: TLSFiles, port: int, obj: dict[str, Any], namespace: str, timeout: float = 30.0
) -> dict[str, Any]:
    """POST an AdmissionReview for creating ``obj`` the way the API server does.

    Returns the review's ``response``, after checking that the answer is an
    AdmissionReview for this very request (its uid).
    """
    uid = str(uuid.uuid4())
    request = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:job-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    http = urllib.request.Request(
        f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(http, context=context, timeout=timeout) as answer:  # noqa: S310
        body = json.loads(answer.read())
    assert body["kind"] == "AdmissionReview"
    assert body["response"]["uid"] == uid
    result: dict[str, Any] = body["response"]
    return result


@dataclass(frozen=True)
class Webhook:
    """The operator's webhook server: its port and the TLS files it serves and is checked with."""

    tls: TLSFiles
    port: int

    def settings(self) -> dict[str, str]:
        """The operator settings that serve it (see :func:`webhook_settings`)."""
        return webhook_settings(self.tls, self.port)

    def review(self, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
        """The webhook's answer to creating ``obj`` in ``namespace`` (see :func:`review`)."""
        return review(self.tls, self.port, obj, namespace)
