"""Guard rails: the private attributes of kopf and torch that etha relies on still exist.

etha overrides or reads a few private names of its dependencies (listed below, each
with the reason). constraints.txt pins the versions they were checked with, but a user
may install another: these tests fail loudly, naming the installed version, instead of
letting a rename break a webhook or a torchrun re-rendezvous silently.
"""

from __future__ import annotations

import inspect

import pytest


def test_kopf_webhook_server_serve() -> None:
    """etha_operator.handlers.PodWebhookServer wraps ``WebhookServer._serve(fn, request)``."""
    kopf = pytest.importorskip("kopf")
    from importlib.metadata import version

    serve = getattr(kopf.WebhookServer, "_serve", None)
    assert serve is not None, (
        f"kopf {version('kopf')} has no WebhookServer._serve; PodWebhookServer in"
        " operator/etha_operator/handlers.py must be ported to its replacement"
    )
    params = list(inspect.signature(serve).parameters)
    assert params == ["fn", "request"], (
        f"kopf {version('kopf')} changed WebhookServer._serve's signature to {params};"
        " port PodWebhookServer in operator/etha_operator/handlers.py"
    )


def test_torch_dynamic_rendezvous_internals() -> None:
    """etha.distributed.elastic.EthaRendezvousHandler re-hosts the agent store each round.

    It reads ``_this_node`` and ``_shared_tcp_store_server`` and calls
    ``_create_tcp_store_server(addr, port)`` of torch's DynamicRendezvousHandler.
    """
    pytest.importorskip("torch")
    from importlib.metadata import version

    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    handler = dr.DynamicRendezvousHandler
    torch_version = version("torch")
    create = getattr(handler, "_create_tcp_store_server", None)
    assert create is not None, (
        f"torch {torch_version}: DynamicRendezvousHandler._create_tcp_store_server is gone;"
        " port EthaRendezvousHandler.next_rendezvous in etha/distributed/elastic.py"
    )
    assert list(inspect.signature(create).parameters)[1:] == ["master_addr", "master_port"], (
        f"torch {torch_version} changed _create_tcp_store_server's signature;"
        " port EthaRendezvousHandler.next_rendezvous in etha/distributed/elastic.py"
    )
    source = inspect.getsource(handler.__init__)
    for attribute in ("self._this_node", "self._shared_tcp_store_server"):
        assert attribute in source, (
            f"torch {torch_version}: DynamicRendezvousHandler.__init__ no longer sets"
            f" {attribute}; port EthaRendezvousHandler in etha/distributed/elastic.py"
        )
