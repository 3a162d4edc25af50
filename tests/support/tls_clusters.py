"""Module-scoped fixtures for etcd over TLS: one set of test certificates, one cluster.

A test module assigns them to the fixture names it uses::

    tls_files = tls_files_fixture("tls")
    etcd_mtls = tls_cluster_fixture("etcd-mtls", client_cert_auth=True)

The cluster fixture takes the module's ``tls_files`` fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.tls import TLSFiles, make_tls


def tls_files_fixture(dirname: str) -> Callable[..., TLSFiles]:
    """A module-scoped fixture: a fresh CA with server and client pairs in ``dirname``."""

    @pytest.fixture(scope="module")
    def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
        return make_tls(tmp_path_factory.mktemp(dirname))

    return tls_files


def tls_cluster_fixture(
    dirname: str, *, client_cert_auth: bool = False
) -> Callable[..., Iterator[EtcdCluster]]:
    """A module-scoped fixture: etcd with auth, serving the module's ``tls_files``.

    With ``client_cert_auth`` clients must also present a certificate.
    """

    @pytest.fixture(scope="module")
    def cluster(
        tmp_path_factory: pytest.TempPathFactory, tls_files: TLSFiles
    ) -> Iterator[EtcdCluster]:
        with etcd_cluster(
            tmp_path_factory.mktemp(dirname),
            auth=True,
            tls=tls_files,
            client_cert_auth=client_cert_auth,
        ) as started:
            yield started

    return cluster
