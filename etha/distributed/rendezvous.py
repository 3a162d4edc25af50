"""``init_process_group(init_method="etha://...")``: rendezvous through an :class:`EthaStore`.

URL form::

    etha://[RUN_ID][?rank=R&world_size=N&component=C]
    etha:///RUN_ID[?...]

* ``RUN_ID`` scopes the keys (``{namespace}/{component}/{RUN_ID}/...``) so that two runs
  in one namespace never read each other's keys. Without it: under torchrun,
  ``TORCHELASTIC_RUN_ID`` plus a hash of ``MASTER_ADDR:MASTER_PORT`` (the same for all
  workers of one round), else ``default``. Give every attempt of a job its own run id:
  keys of an earlier attempt with the same id are still there until the operator deletes
  the namespace.
* ``rank`` and ``world_size`` come from the URL (torch adds them when they are passed
  to ``init_process_group``), else from ``RANK`` and ``WORLD_SIZE``, else (a Kubeflow
  TrainJob's pod, one process per pod) from ``PET_NODE_RANK`` and ``PET_NNODES``.
* ``component`` defaults to ``c10d``.
* The etcd connection comes from :func:`etha.kvstore.parse_env` (the ``ETHA_KV_*``
  variables), so it works unchanged in a pod the operator injected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from torch._C._distributed_c10d import Store
from torch.distributed.constants import default_pg_timeout

from etha.kvstore.config import EtcdConfig, parse_env
from etha.kvstore.errors import ConfigurationError, InvalidKeyError
from etha.kvstore.keys import validate_name

SCHEME = "etha"
#: The component of an ``etha://`` rendezvous (``?component=`` overrides it).
RENDEZVOUS_COMPONENT = "c10d"
#: The former name of :data:`RENDEZVOUS_COMPONENT` (kept for imports).
DEFAULT_COMPONENT = RENDEZVOUS_COMPONENT
DEFAULT_RUN_ID = "default"
_QUERY_KEYS = frozenset({"rank", "world_size", "component"})


def _error(message: str) -> ConfigurationError:
    # torch's own handlers raise ValueError("Error initializing torch.distributed using ...").
    return ConfigurationError(
        f"Error initializing torch.distributed using etha:// rendezvous: {message}"
    )


@dataclass(frozen=True)
class RendezvousSpec:
    """What an ``etha://`` URL (plus the environment) asks for."""

    rank: int
    world_size: int
    run_id: str
    component: str = RENDEZVOUS_COMPONENT


def _int(raw: str, what: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _error(f"{what}={raw!r} is not an integer") from None
    if value < minimum:
        raise _error(f"{what}={value} must be at least {minimum}")
    return value


def _name(raw: str, what: str) -> str:
    try:
        return validate_name(raw, what)
    except InvalidKeyError as exc:
        raise _error(str(exc)) from None


def _node_env(env: Mapping[str, str], name: str) -> str | None:
    """``PET_NODE_RANK``/``PET_NNODES`` (what a Kubeflow TrainJob gives its pods for
    torchrun) as the process rank/world size: only with one process per pod."""
    value = env.get(name)
    if not value:
        return None
    per_node = env.get("PET_NPROC_PER_NODE") or "1"
    if per_node != "1":
        raise _error(
            f"RANK is not set and {name} counts pods of {per_node} processes"
            f" (PET_NPROC_PER_NODE={per_node}): start the processes with torchrun, which"
            " sets RANK and WORLD_SIZE for each"
        )
    return value


def parse_url(url: str, environ: Mapping[str, str] | None = None) -> RendezvousSpec:
    """Parse an ``etha://`` URL; missing rank/world size/run id come from ``environ``.

    :raises ConfigurationError: (a ValueError) naming what is missing or malformed
    """
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise _error(f"URL {url!r} does not start with etha://")
    query: dict[str, str] = {}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name not in _QUERY_KEYS:
            raise _error(f"unknown URL parameter {name!r}; use {', '.join(sorted(_QUERY_KEYS))}")
        if len(values) != 1:
            raise _error(f"URL parameter {name!r} is given {len(values)} times")
        query[name] = values[0]
    path = parts.path.strip("/")
    if parts.netloc and path:
        raise _error(f"URL {url!r} names the run twice; use etha://RUN_ID or etha:///RUN_ID")
    run_id = parts.netloc or path
    if not run_id and env.get("TORCHELASTIC_RUN_ID"):
        run_id = env["TORCHELASTIC_RUN_ID"]
        master = f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
        if master != ":":
            # The run id stays the same when torchrun restarts workers; the agent
            # store's address is what all workers of one round share.
            run_id += "." + hashlib.sha256(master.encode()).hexdigest()[:8]
    run_id = _name(run_id or DEFAULT_RUN_ID, "run id")

    # torch writes world_size=-1 into the URL when it does not know the size.
    raw_rank = query.get("rank")
    if raw_rank is None or raw_rank == "-1":
        raw_rank = env.get("RANK") or _node_env(env, "PET_NODE_RANK")
    raw_world = query.get("world_size")
    if raw_world is None or raw_world == "-1":
        raw_world = env.get("WORLD_SIZE") or _node_env(env, "PET_NNODES")
    if not raw_rank:
        raise _error("rank parameter missing: pass rank= to init_process_group or set RANK")
    if not raw_world:
        raise _error(
            "world size parameter missing: pass world_size= to init_process_group or set WORLD_SIZE"
        )
    rank = _int(raw_rank, "rank", 0)
    world_size = _int(raw_world, "world_size", 1)
    if rank >= world_size:
        raise _error(f"rank {rank} is not below world_size {world_size}")
    component = _name(query.get("component") or RENDEZVOUS_COMPONENT, "component")
    return RendezvousSpec(rank=rank, world_size=world_size, run_id=run_id, component=component)


def _etcd_config(environ: Mapping[str, str] | None = None) -> EtcdConfig:
    config = parse_env(environ)
    if not isinstance(config, EtcdConfig):
        raise _error(
            f"ETHA_KV_BACKEND is {config.backend!r}; etha:// needs the etcd backend"
            " (ETHA_KV_BACKEND=etcd)"
        )
    return config


def etha_rendezvous_handler(
    url: str, timeout: timedelta = default_pg_timeout, **kwargs: Any
) -> Iterator[tuple[Store, int, int]]:
    """The ``etha://`` handler: yields ``(EthaStore, rank, world_size)`` once.

    ``timeout`` (torch passes the process group's) becomes the store timeout, and
    bounds the first connection: like ``tcp://``, unreachable endpoints raise
    ``DistNetworkError`` within it; refused credentials raise ``DistStoreError``.
    """
    from etha.distributed.store import EthaStore

    spec = parse_url(url)
    store = EthaStore(_etcd_config(), component=spec.component, scope=spec.run_id, timeout=timeout)
    try:
        store.connect()
    except BaseException:
        store.close()
        raise
    yield (store, spec.rank, spec.world_size)
    # Like torch's tcp:// and env:// handlers: the triple cannot be renewed.
    raise RuntimeError("Unable to perform re-rendezvous using etha:// method")


def register() -> None:
    """Register the ``etha://`` handler with torch.distributed (idempotent)."""
    import torch.distributed as dist

    # RuntimeError: already registered (this module was imported before).
    with contextlib.suppress(RuntimeError):
        dist.register_rendezvous_handler(SCHEME, etha_rendezvous_handler)  # type: ignore[attr-defined,no-untyped-call]


__all__ = [
    "DEFAULT_RUN_ID",
    "RENDEZVOUS_COMPONENT",
    "SCHEME",
    "RendezvousSpec",
    "etha_rendezvous_handler",
    "parse_url",
    "register",
]
