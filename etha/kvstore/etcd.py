"""The etcd v3 backend of :class:`~etha.kvstore.base.KVStore` (kept import path).

The backend lives in :mod:`etha.kvstore.etcdv3`, whose modules import one way:
``transport`` (channels, failover, log-in) < ``watch`` (the shared watch stream) <
``client`` (calls, size check, error mapping, compare-and-swap) < ``wait`` (the one
read-then-watch loop) < ``store`` (:class:`EtcdKVStore`). See ``docs/etcd-backend.md``.
"""

from __future__ import annotations

from etha.kvstore.etcdv3 import store as _store

# The backend's public names, listed once (in etha.kvstore.etcdv3.store).
from etha.kvstore.etcdv3.store import *  # noqa: F403

__all__ = _store.__all__
