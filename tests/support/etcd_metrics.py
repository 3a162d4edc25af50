"""What etcd itself says it did: counters read from a member's ``/metrics``."""

from __future__ import annotations

import re
import urllib.request

from tests.support.etcd_server import EtcdCluster

_HANDLED = re.compile(r"^grpc_server_handled_total\{([^}]*)\} (\S+)$", re.M)


def handled(metrics_text: str, method: str) -> float:
    """gRPC calls of ``method`` (``"Txn"``, ``"Put"``...) in a member's ``/metrics`` page,
    every result code included (etcd's own ``grpc_server_handled_total``)."""
    label = f'grpc_method="{method}"'
    return sum(float(m.group(2)) for m in _HANDLED.finditer(metrics_text) if label in m.group(1))


def handled_calls(cluster: EtcdCluster, *methods: str, member: int = 0) -> dict[str, float]:
    """:func:`handled` for each of ``methods``, from one read of member ``member``'s page."""
    url = f"{cluster.urls[member]}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 (http://)
    return {method: handled(text, method) for method in methods}
