"""The etcd v3 client (kept import path): see :mod:`etha.kvstore.etcdv3.client`.

The transport (channels, failover, log-in) is :mod:`etha.kvstore.etcdv3.transport`.
"""

from __future__ import annotations

from etha.kvstore.etcdv3.client import (
    DEFAULT_MAX_REQUEST_BYTES,
    QUOTA_METADATA_KEY,
    RAFT_OVERHEAD_BYTES,
    CasResult,
    EtcdClient,
)
from etha.kvstore.etcdv3.transport import (
    UNARY_SERVICES,
    Connection,
    normalize_endpoints,
    prefix_range_end,
)

_Connection = Connection

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "QUOTA_METADATA_KEY",
    "RAFT_OVERHEAD_BYTES",
    "UNARY_SERVICES",
    "CasResult",
    "Connection",
    "EtcdClient",
    "normalize_endpoints",
    "prefix_range_end",
]
