"""etha.kvstore: a key-value store for coordinating the workers of a distributed job.

Open a store from the environment that the etha operator injects::

    import etha.kvstore

    with etha.kvstore.from_env() as store:
        store.set(f"rank:{rank}/ready", "1")
        store.wait_for_keys("rank:*/ready", expected_count=world_size)

Backends: :class:`~etha.kvstore.etcd.EtcdKVStore` (etcd v3) and
:class:`~etha.kvstore.tcpstore.TCPStoreKVStore` (``torch.distributed.TCPStore``, needs the
``etha[tcpstore]`` extra). Both are imported lazily, so importing this package needs
neither grpc nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from etha.kvstore import errors as _errors
from etha.kvstore.base import KVStore
from etha.kvstore.config import EtcdConfig, TCPStoreConfig, parse_env

# Every error type of the hierarchy, listed once (in etha.kvstore.errors).
from etha.kvstore.errors import *  # noqa: F403


def open_store(config: EtcdConfig | TCPStoreConfig) -> KVStore:
    """Open the backend that ``config`` describes."""
    if isinstance(config, EtcdConfig):
        from etha.kvstore.etcd import EtcdKVStore

        return EtcdKVStore.from_config(config)
    from etha.kvstore.tcpstore import TCPStoreKVStore

    return TCPStoreKVStore.from_config(config)


def from_env(environ: Mapping[str, str] | None = None) -> KVStore:
    """Open the store that the ``ETHA_KV_*`` variables describe (see docs/configuration.md).

    :param environ: the variables to read; ``os.environ`` when None
    :raises ConfigurationError: naming the missing or contradictory variable
    """
    return open_store(parse_env(environ))


__all__ = [
    "EtcdConfig",
    "KVStore",
    "TCPStoreConfig",
    "from_env",
    "open_store",
    "parse_env",
]
__all__ += _errors.__all__
