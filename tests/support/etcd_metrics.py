"""What etcd itself says it did: counters read from a member's ``/metrics``."""

from __future__ import annotations

import re
import urllib.request

from tests.support.etcd_server import EtcdCluster

_HANDLED = re.compile(r"^grpc_server_handled_total\{([^}]*)\} (\S+)$", re.M)


def handled_calls(cluster: EtcdCluster, method: str, member: int = 0) -> float:
    """gRPC calls of ``method`` (``"Txn"``, ``"Put"``...) that member ``member`` handled,
    every result code included (etcd's own ``grpc_server_handled_total``)."""
    url = f"{cluster.urls[member]}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 (http://)
    label = f'grpc_method="{method}"'
    return sum(float(m.group(2)) for m in _HANDLED.finditer(text) if label in m.group(1))
