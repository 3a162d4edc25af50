"""Former home of the etcd test utilities; they live in tests/support now.

Kept as re-exports for the modules that still import from here.
"""

from __future__ import annotations

from tests.support.etcd_users import grant_prefix_user, root_client
from tests.support.threads import wait_threads_gone

__all__ = ["grant_prefix_user", "root_client", "wait_threads_gone"]
