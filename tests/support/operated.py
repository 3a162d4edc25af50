"""The emulated Kubernetes API with the real operator running against it.

The one home of "start an emulator, write its kubeconfig, run the operator on a given
etcd": the kubectl/helm tests, the end-to-end dry run and the hostile-tenant world.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.etcd_server import EtcdCluster
from tests.support.kube_emulator import EmulatorServer
from tests.support.operator_runner import OperatorProcess


@dataclass
class OperatedKube:
    """A running emulator and operator; ``env`` is what a kubectl or helm child needs."""

    kube: EmulatorServer
    operator: OperatorProcess
    kubeconfig: Path
    env: dict[str, str]


@contextmanager
def operated_kube(
    cluster: EtcdCluster, workdir: Path, **operator_kwargs: Any
) -> Iterator[OperatedKube]:
    """An emulator and the operator on ``cluster`` as root; both stopped on exit.

    ``operator_kwargs`` go to :class:`OperatorProcess` (``gateway_endpoints``, ``env``).
    The kubeconfig, the operator's log and kubectl's discovery cache ($HOME/.kube) go
    under ``workdir``.
    """
    with EmulatorServer() as kube:
        kubeconfig = kube.write_kubeconfig(workdir / "kubeconfig")
        with OperatorProcess(
            kubeconfig=kubeconfig,
            etcd_endpoints=cluster.urls,
            root_password=cluster.root_password,
            log_path=workdir / "operator.log",
            **operator_kwargs,
        ) as operator:
            env = {
                "KUBECONFIG": str(kubeconfig),
                "HOME": str(workdir),
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            }
            yield OperatedKube(kube, operator, kubeconfig, env)
