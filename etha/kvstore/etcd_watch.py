"""The shared etcd watch stream (kept import path): see :mod:`etha.kvstore.etcdv3.watch`."""

from __future__ import annotations

from etha.kvstore.etcdv3.watch import (
    DELETE,
    PROBE_AFTER,
    PROBE_TIMEOUT,
    PUT,
    WatchCompacted,
    Watcher,
    WatchHub,
)

__all__ = ["DELETE", "PROBE_AFTER", "PROBE_TIMEOUT", "PUT", "WatchCompacted", "WatchHub", "Watcher"]
