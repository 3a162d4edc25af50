"""etha inside ``torch.distributed``: a c10d Store, ``etha://`` rendezvous, torchrun backend.

Importing this package imports torch and registers the ``etha://`` ``init_method``
handler with :func:`torch.distributed.register_rendezvous_handler`::

    import etha.distributed  # registers etha://
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="etha:///my-run")

``torchrun --rdzv-backend=etha`` needs no import: torch finds the backend through the
``torchrun.handlers`` entry point of this package. See ``docs/torch.md``.

The rest of :mod:`etha` never imports torch; only this package does.
"""

from __future__ import annotations

from etha.distributed.rendezvous import (
    RendezvousSpec,
    etha_rendezvous_handler,
    parse_url,
    register,
)
from etha.distributed.store import EthaStore

register()

__all__ = [
    "EthaStore",
    "RendezvousSpec",
    "etha_rendezvous_handler",
    "parse_url",
    "register",
]
