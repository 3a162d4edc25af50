"""Entry point: ``etha-operator`` / ``python -m etha_operator``.

Runs kopf standalone (no peering: the Deployment has one replica with the Recreate
strategy), cluster-wide or in ETHA_OPERATOR_NAMESPACES, with the liveness endpoint on
ETHA_OPERATOR_HEALTH_PORT and the admission webhook when its certificate is configured.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import kopf

from etha.kvstore.errors import ConfigurationError
from etha_operator.handlers import register
from etha_operator.settings import OperatorSettings, load_settings


def build_registry(cfg: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register(registry, cfg)
    return registry


async def run(cfg: OperatorSettings) -> None:
    """Run the operator until it is stopped (SIGTERM/SIGINT)."""
    await kopf.operator(
        registry=build_registry(cfg),
        standalone=True,
        clusterwide=cfg.clusterwide,
        namespaces=list(cfg.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{cfg.health_port}/healthz",
    )


def main() -> None:
    try:
        cfg = load_settings()
    except ConfigurationError as exc:
        print(f"etha-operator: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=cfg.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf's own DEBUG output includes whole request payloads; keep it at INFO or above
    # unless explicitly debugging, and never log the kubernetes client's bodies.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    asyncio.run(run(cfg))


if __name__ == "__main__":
    main()
