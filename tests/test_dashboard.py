"""The Grafana dashboard queries only metrics the code exports, and covers all of them.

Metric names are read from the code's own definitions (``Counter("name", ...)`` and kin
in the modules of the operator and of ``etha.gateway``, parsed with ``ast``), and turned
into the sample names prometheus_client exposes (``_total`` for counters; ``_bucket``,
``_sum``, ``_count`` for histograms).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "etha-operator" / "dashboards" / "etha.json"
OPERATOR_PACKAGE = ROOT / "operator" / "etha_operator"
GATEWAY_PACKAGE = ROOT / "etha" / "gateway"
KINDS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
#: Sample names in a query: every identifier that starts with etha_.
METRIC_TOKEN = re.compile(r"\betha_[a-z0-9_]+\b")


def defined_metrics(package: Path) -> dict[str, str]:
    """name -> kind for every prometheus_client metric constructed in ``package``'s modules."""
    found: dict[str, str] = {}
    for path in sorted(package.glob("*.py")):
        found.update(_defined_in(path))
    return found


def _defined_in(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if kind not in KINDS:
            continue
        name_node: ast.expr | None = node.args[0] if node.args else None
        for keyword in node.keywords:
            if keyword.arg == "name":
                name_node = keyword.value
        assert isinstance(name_node, ast.Constant) and isinstance(name_node.value, str), (
            f"{path}:{node.lineno}: metric name is not a string literal; this test reads names"
            " from the code"
        )
        found[name_node.value] = kind
    return found


def sample_names(metrics: dict[str, str]) -> dict[str, str]:
    """Exposed sample name -> the metric it belongs to."""
    samples: dict[str, str] = {}
    for name, kind in metrics.items():
        if kind == "Counter":
            base = name.removesuffix("_total")
            samples[f"{base}_total"] = name
            samples[f"{base}_created"] = name
        elif kind in ("Histogram", "Summary"):
            for suffix in ("_bucket", "_sum", "_count", "_created"):
                samples[name + suffix] = name
        else:
            samples[name] = name
    return samples


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    queries: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                queries.append((panel["title"], target["expr"]))
            walk(panel.get("panels") or [])

    walk(data["panels"])
    return queries


def used_metrics(prefix: str) -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for title, expr in dashboard_queries():
        for token in METRIC_TOKEN.findall(expr):
            if token.startswith(prefix):
                used.setdefault(token, []).append(title)
    return used


def check(prefix: str, package: Path) -> None:
    metrics = defined_metrics(package)
    assert metrics, f"no metric definitions found in {package}"
    samples = sample_names(metrics)
    used = used_metrics(prefix)
    unknown = {token: titles for token, titles in used.items() if token not in samples}
    assert not unknown, f"the dashboard queries metrics {package.name} does not define: {unknown}"
    covered = {samples[token] for token in used}
    assert covered == set(metrics), f"no panel shows {sorted(set(metrics) - covered)}"


def test_the_dashboard_is_valid_grafana_json() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    assert dashboard_queries()


def test_operator_panels_use_only_exported_metrics_and_show_all_of_them() -> None:
    check("etha_operator_", OPERATOR_PACKAGE)


def test_gateway_panels_use_only_exported_metrics_and_show_all_of_them() -> None:
    check("etha_gateway_", GATEWAY_PACKAGE)


def test_the_check_catches_a_metric_the_code_does_not_export() -> None:
    samples = sample_names(defined_metrics(OPERATOR_PACKAGE))
    assert "etha_operator_reconciles_total" in samples
    assert "etha_operator_provision_seconds_bucket" in samples
    assert "etha_operator_reconciles" not in samples  # a counter is exposed as _total
    assert "etha_operator_kvnamespaces_total" not in samples  # a gauge has no _total
