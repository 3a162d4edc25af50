"""etha: coordination for distributed jobs on an operator-provisioned etcd prefix."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source of truth: pyproject.toml. tests/test_version.py checks that the chart
    # and the image carry the same version.
    __version__ = version("etha")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
