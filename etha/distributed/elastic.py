"""``torchrun --rdzv-backend=etha``: torch elastic's dynamic rendezvous on etcd.

The rendezvous state (torch's pickled ``_RendezvousState``) lives in ONE etcd key,
``{namespace}/{component}/{run_id}/state``, and every update is a compare-and-swap: an
etcd transaction that puts the new state only if the key's ``mod_revision`` is still
the fencing token the caller read (or, for the first write, only if the key does not
exist). The agents' c10d store is an :class:`~etha.distributed.store.EthaStore` under
``{namespace}/{component}/{run_id}/store/``. Everything stays inside the namespace.

torch discovers this backend through the ``torchrun.handlers`` entry point
(``etha = "etha.distributed.elastic:torchrun_handler"``).

``--rdzv-endpoint`` is optional: empty means the ``ETHA_KV_ENDPOINTS`` of the
environment; ``host:port[,host:port]`` overrides them. ``--rdzv-conf`` keys:
``read_timeout`` (store timeout in seconds, default 60; it also bounds every etcd
request of the rendezvous, and creating the handler fails with
``RendezvousConnectionError`` when etcd does not answer within it) and ``component`` (default
``torchelastic``), plus the usual ones of the dynamic rendezvous (``join_timeout``,
``last_call_timeout``, ``close_timeout``, ``heartbeat``...).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousParameters,
)
from torch.distributed.elastic.rendezvous.api import RendezvousInfo, RendezvousStoreInfo
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousBackend,
    RendezvousTimeout,
    Token,
)

from etha.distributed.store import EthaStore
from etha.kvstore.config import EtcdConfig, parse_endpoints, parse_env
from etha.kvstore.errors import (
    ConfigurationError,
    InvalidKeyError,
    KVStoreError,
    PermissionDeniedError,
)
from etha.kvstore.etcdv3.client import EtcdClient
from etha.kvstore.keys import validate_name

BACKEND_NAME = "etha"
#: The component of torchrun's rendezvous state and agents' store (``--rdzv-conf component``).
ELASTIC_COMPONENT = "torchelastic"
#: The former name of :data:`ELASTIC_COMPONENT` (kept for imports).
DEFAULT_COMPONENT = ELASTIC_COMPONENT
DEFAULT_READ_TIMEOUT = 60


def _backend_error(action: str, exc: KVStoreError) -> RendezvousError:
    if isinstance(exc, PermissionDeniedError):
        return RendezvousError(f"etha rendezvous: {action} was refused by etcd: {exc}")
    return RendezvousConnectionError(f"etha rendezvous: {action} failed: {exc}")


class EthaRendezvousBackend(RendezvousBackend):
    """The dynamic rendezvous state in one etcd key, updated by compare-and-swap.

    The fencing token is the key's ``mod_revision`` (an int).

    :param client: the etcd client (its credentials must grant the key's prefix)
    :param key: the full etcd key of the state
    :param timeout: the deadline of one etcd request, if shorter than the client's
        (``--rdzv-conf read_timeout``)
    """

    def __init__(self, client: EtcdClient, key: str, timeout: float | None = None) -> None:
        if not key:
            raise ValueError("the rendezvous state key must not be empty")
        self._client = client
        self.key = key
        self._key = key.encode("utf-8")
        self._timeout = None if timeout is None else min(timeout, client.timeout)

    @property
    def name(self) -> str:
        return BACKEND_NAME

    def get_state(self) -> tuple[bytes, Token] | None:
        """The state and its token, or None when no state was written yet."""
        try:
            response = self._client.range(self._key, timeout=self._timeout)
        except KVStoreError as exc:
            raise _backend_error(f"reading {self.key!r}", exc) from exc
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return bytes(kv.value), int(kv.mod_revision)

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        """Put ``state`` if ``token`` is still current (None: if no state exists).

        :returns: ``(state, token, True)`` when written; else the current state, its
            token and False (None if the key vanished meanwhile)
        """
        revision: int | None = None
        if token is not None:
            try:
                revision = int(token)
            except (TypeError, ValueError):
                # Not a token of this backend: it cannot match the current state.
                current = self.get_state()
                return None if current is None else (*current, False)
        try:
            outcome = self._client.compare_and_put(
                self._key, state, revision, timeout=self._timeout
            )
        except KVStoreError as exc:
            raise _backend_error(f"updating {self.key!r}", exc) from exc
        if outcome.succeeded:
            # The put of a successful transaction is at the transaction's revision.
            return state, outcome.revision, True
        kv = outcome.current
        if kv is None:
            return None
        return bytes(kv.value), int(kv.mod_revision), False


def _config(params: RendezvousParameters) -> EtcdConfig:
    config = parse_env()
    if not isinstance(config, EtcdConfig):
        raise ConfigurationError(
            f"ETHA_KV_BACKEND is {config.backend!r}; --rdzv-backend=etha needs the etcd"
            " backend (ETHA_KV_BACKEND=etcd)"
        )
    endpoint = (params.endpoint or "").strip()
    if endpoint:
        endpoints, tls = parse_endpoints(endpoint, "--rdzv-endpoint")
        config = dataclasses.replace(
            config, endpoints=endpoints, tls=config.tls if tls is None else tls
        )
    return config


def _name(value: str, what: str) -> str:
    try:
        return validate_name(value, what)
    except InvalidKeyError as exc:
        raise ConfigurationError(f"--rdzv-backend=etha: {exc}") from None


def create_backend(params: RendezvousParameters) -> tuple[EthaRendezvousBackend, EthaStore]:
    """The state backend and the agents' store for ``params`` (torchrun's arguments)."""
    config = _config(params)
    run_id = _name(params.run_id, "run id (--rdzv-id)")
    component = _name(params.get("component", ELASTIC_COMPONENT), "component")
    read_timeout = params.get_as_int("read_timeout", DEFAULT_READ_TIMEOUT)
    if read_timeout is None or read_timeout <= 0:
        raise ConfigurationError("--rdzv-conf read_timeout must be a positive number of seconds")
    store = EthaStore(config, component=component, scope=f"{run_id}/store", timeout=read_timeout)
    try:
        # Like torch's c10d backend connecting its TCPStore: fail within read_timeout.
        store.connect()
    except dist.DistNetworkError as exc:
        store.close()
        raise RendezvousConnectionError(
            f"etha rendezvous: etcd did not answer within read_timeout={read_timeout}s: {exc}"
        ) from exc
    except RuntimeError as exc:  # DistStoreError: refused (credentials, permissions)
        store.close()
        raise RendezvousError(f"etha rendezvous: etcd refused the connection: {exc}") from exc
    key = f"{config.namespace}/{component}/{run_id}/state"
    return EthaRendezvousBackend(store.client, key, timeout=read_timeout), store


class EthaRendezvousHandler(DynamicRendezvousHandler):
    """torch's dynamic rendezvous, fixed for rounds after the first.

    With the agent-hosted TCPStore (torch's default), torch 2.13 caches the store
    address after a node's first round and never publishes or reads it again, and
    reuses rank 0's TCPStore server for every round. Seen here, on a node that is
    killed and restarted:

    * the restarted node waits for ``MASTER_ADDR`` under the new round's prefix,
      which the cached rank 0 never writes, while rank 0 waits for the newcomer's
      ranks: both hang until the store timeout;
    * the new round's workers read the previous round's keys (gloo addresses of dead
      workers) from the reused server and fail with "connection refused";
    * a node whose rank changed keeps pointing its workers at the old address.

    So here, every round, rank 0 hosts a fresh TCPStore server and publishes its
    address under the round's prefix, and every other rank reads it.
    """

    def next_rendezvous(self) -> RendezvousInfo:
        previous = getattr(self, "_shared_tcp_store_server", None)
        info: RendezvousInfo = super().next_rendezvous()
        if not self.use_agent_store or not hasattr(self, "_shared_tcp_store_server"):
            # Fresh store info every round (or a torch without the shared agent store).
            return info
        store = info.store
        addr = self._this_node.addr or socket.getfqdn()
        if info.rank == 0:
            server = self._shared_tcp_store_server
            if server is None or server is previous:
                server = self._create_tcp_store_server(addr, 0)
                self._shared_tcp_store_server = server
            bootstrap = RendezvousStoreInfo(master_addr=addr, master_port=int(server.port))
            store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, bootstrap.master_addr)
            store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(bootstrap.master_port))
        else:
            # Another node hosts this round's store; stop ours (if any) with its stale keys.
            self._shared_tcp_store_server = None
            bootstrap = RendezvousStoreInfo.build(info.rank, store, local_addr=addr)
        self._bootstrap_store_info = bootstrap
        return RendezvousInfo(store, info.rank, info.world_size, bootstrap)


def _timeout(params: RendezvousParameters, name: str) -> timedelta | None:
    seconds = params.get_as_int(f"{name}_timeout")
    return None if seconds is None else timedelta(seconds=seconds)


def create_rdzv_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's dynamic rendezvous (with the fix above) on the etha backend.

    Accepts the ``--rdzv-conf`` keys of torch's ``create_handler``: ``join_timeout``,
    ``last_call_timeout``, ``close_timeout``, ``heartbeat_timeout``,
    ``keep_alive_interval``, ``keep_alive_max_attempt``.
    """
    backend, store = create_backend(params)
    timeout = RendezvousTimeout(
        _timeout(params, "join"),
        _timeout(params, "last_call"),
        _timeout(params, "close"),
        _timeout(params, "heartbeat"),
    )
    handler: RendezvousHandler = EthaRendezvousHandler.from_backend(
        params.run_id,
        store,
        backend,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        timeout,
        keep_alive_interval=params.get_as_int("keep_alive_interval", 5) or 5,
        keep_alive_max_attempt=params.get_as_int("keep_alive_max_attempt", 3) or 3,
    )
    return handler


def torchrun_handler() -> Callable[[RendezvousParameters], Any]:
    """The ``torchrun.handlers`` entry point: torch calls it, then registers the result."""
    return create_rdzv_handler


__all__ = [
    "BACKEND_NAME",
    "ELASTIC_COMPONENT",
    "EthaRendezvousBackend",
    "EthaRendezvousHandler",
    "create_backend",
    "create_rdzv_handler",
    "torchrun_handler",
]
