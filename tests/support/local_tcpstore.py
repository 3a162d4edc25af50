"""A ``TCPStoreKVStore`` server inside the test process, on a port the OS picks.

For tests that only need a server to talk to; tests that kill the server use
:class:`tests.support.tcpstore_server.TCPStoreServer` (its own process) instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from etha.kvstore.tcpstore import TCPStoreKVStore


@contextmanager
def local_tcpstore_server(timeout: float) -> Iterator[TCPStoreKVStore]:
    """A serving store on 127.0.0.1 (its port: ``.port``), closed when the block is left."""
    server = TCPStoreKVStore("server", host="127.0.0.1", port=0, is_server=True, timeout=timeout)
    try:
        yield server
    finally:
        server.close()
