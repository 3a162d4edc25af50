"""The etcd v3 backend of :class:`~etha.kvstore.base.KVStore` (kept import path).

The backend lives in :mod:`etha.kvstore.etcdv3`, whose modules import one way:
``transport`` (channels, failover, log-in) < ``watch`` (the shared watch stream) <
``client`` (calls, size check, error mapping, compare-and-swap) < ``wait`` (the one
read-then-watch loop) < ``store`` (:class:`EtcdKVStore`). See ``docs/etcd-backend.md``.
"""

from __future__ import annotations

from etha.kvstore.etcdv3.client import MAX_TXN_OPS
from etha.kvstore.etcdv3.store import (
    EtcdKVStore,
    coordination_supported,
    gateway_add,
    note_no_coordination,
)

__all__ = [
    "MAX_TXN_OPS",
    "EtcdKVStore",
    "coordination_supported",
    "gateway_add",
    "note_no_coordination",
]
