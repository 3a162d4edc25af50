"""Former home of the etha.distributed test utilities; they live in tests/support now.

Kept as re-exports for the modules that still import from here.
"""

from __future__ import annotations

from tests.support.etcd_users import all_keys, namespace_config, read_key, root_client
from tests.support.workers import REPO, Procs, child_env, descendants, procs, tail

__all__ = [
    "REPO",
    "Procs",
    "all_keys",
    "child_env",
    "descendants",
    "namespace_config",
    "procs",
    "read_key",
    "root_client",
    "tail",
]
