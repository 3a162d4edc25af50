"""Entry point: ``etha-operator`` / ``python -m etha_operator``.

Runs kopf standalone (no peering: the Deployment has one replica with the Recreate
strategy), cluster-wide or in ETHA_OPERATOR_NAMESPACES, with the liveness endpoint on
ETHA_OPERATOR_HEALTH_PORT and the admission webhook when its certificate is configured.
In direct mode it first asks etcd its version and refuses to start on a version with
known permission bypasses (unless ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT=true).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import kopf

from etha.kvstore.errors import ConfigurationError, KVStoreError
from etha_operator import etcd_version, metrics, model
from etha_operator.etcd_admin import EtcdAdmin
from etha_operator.handlers import register
from etha_operator.settings import OperatorSettings, load_settings

logger = logging.getLogger("etha_operator")


def build_registry(cfg: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register(registry, cfg)
    metrics.register(registry, (model.GROUP, model.VERSION, model.PLURAL))
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


def check_direct_mode(cfg: OperatorSettings, admin: EtcdAdmin) -> list[str]:
    """Direct mode only: etcd's version on every listed endpoint must be free of known
    permission bypasses, or the override must be set.

    :returns: the problems found and overridden (logged as warnings by the caller)
    :raises UnsafeEtcdError: a member runs an affected version and there is no override
    :raises KVStoreError: no endpoint answered
    """
    if cfg.gateway_mode:
        return []
    problems = []
    for endpoint, version in sorted(admin.versions(timeout=cfg.etcd_timeout).items()):
        reason = etcd_version.refusal(endpoint, version)
        if reason is None:
            continue
        if not cfg.allow_unsafe_direct:
            raise etcd_version.UnsafeEtcdError(reason, version)
        problems.append(reason)
    return problems


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
    if not cfg.gateway_mode:
        admin = EtcdAdmin.from_settings(cfg)
        try:
            overridden = check_direct_mode(cfg, admin)
        except etcd_version.UnsafeEtcdError as exc:
            print(f"etha-operator: refusing direct mode: {exc}", file=sys.stderr)
            sys.exit(2)
        except KVStoreError as exc:
            print(
                f"etha-operator: cannot check etcd's version for direct mode: {exc}",
                file=sys.stderr,
            )
            sys.exit(1)
        finally:
            admin.close()
        for reason in overridden:
            logger.warning(
                "direct mode on an unsafe etcd (ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT=true): %s", reason
            )
    try:
        metrics.serve(cfg.metrics_port)
    except OSError as exc:
        port = cfg.metrics_port
        print(f"etha-operator: cannot serve metrics on port {port}: {exc}", file=sys.stderr)
        sys.exit(1)
    asyncio.run(run(cfg))


if __name__ == "__main__":
    main()
