"""The version is written once (pyproject.toml); the chart and the image must agree."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import etha

ROOT = Path(__file__).resolve().parent.parent


def project_version() -> str:
    # (tomllib is 3.11+; etha supports 3.10.)
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^\[project\]$.*?^version = "([^"]+)"$', text, re.M | re.S)
    assert match, "pyproject.toml lost [project] version"
    return match.group(1)


def test_package_reports_the_project_version() -> None:
    assert etha.__version__ == project_version()


def test_chart_carries_the_project_version() -> None:
    chart = yaml.safe_load((ROOT / "charts/etha-operator/Chart.yaml").read_text())
    expected = project_version()
    assert chart["appVersion"] == expected, "set appVersion in Chart.yaml to pyproject's version"
    assert chart["version"] == expected, "set version in Chart.yaml to pyproject's version"


def test_image_carries_the_project_version() -> None:
    match = re.search(r"^ARG VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile lost its ARG VERSION"
    assert match.group(1) == project_version(), "set ARG VERSION in the Dockerfile"
