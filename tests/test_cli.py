"""The ``etha`` command, run as a subprocess against a real etcd with auth.

Every command runs as the console script ``make install`` put into the virtualenv (or
``python -m etha.cli`` where it is missing), with only the ``ETHA_KV_*`` variables a
worker pod gets; the user may read and write only its namespace's prefix.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etha.kvstore.etcd_client import EtcdClient
from tests.support.etcd_server import EtcdCluster, etcd_cluster
from tests.support.etcd_users import grant_prefix_user, root_client
from tests.support.gateway import GatewayProcess, register_tenant
from tests.support.ports import free_port
from tests.support.processes import end_process
from tests.support.tcpstore_server import TCPStoreServer
from tests.support.tenants import gateway_fixture
from tests.support.tls import make_tls

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(sys.executable).parent / "etha"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "etha.cli"]


@dataclass
class Tenant:
    namespace: str
    user: str
    password: str
    env: dict[str, str]


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ETHA_")}


def run(
    env: dict[str, str], *args: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    raw = subprocess.run(
        [*COMMAND, *args], env=env, input=stdin, capture_output=True, timeout=timeout
    )
    result = subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode("utf-8", "replace"), raw.stderr.decode()
    )
    # Expected failures never show a traceback.
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("etha: ")
    return lines[0]


@pytest.fixture(scope="module")
def root(etcd_auth: EtcdCluster) -> Iterator[EtcdClient]:
    client = root_client(etcd_auth)
    yield client
    client.close()


def make_tenant(cluster: EtcdCluster, root: EtcdClient) -> Tenant:
    namespace = f"cli-{uuid.uuid4().hex[:10]}"
    user, password = f"u-{namespace}", uuid.uuid4().hex
    grant_prefix_user(root, user, password, f"{namespace}/".encode())
    env = base_env()
    env.update(
        ETHA_KV_NAMESPACE=namespace,
        ETHA_KV_ENDPOINTS=",".join(cluster.urls),
        ETHA_KV_USERNAME=user,
        ETHA_KV_PASSWORD=password,
        ETHA_KV_TIMEOUT="5",
    )
    return Tenant(namespace, user, password, env)


@pytest.fixture
def tenant(etcd_auth: EtcdCluster, root: EtcdClient) -> Tenant:
    return make_tenant(etcd_auth, root)


def doctor(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = run(env, "doctor", "--json")
    return result, json.loads(result.stdout)


# -- get / put / rm / ls ---------------------------------------------------------------------


def test_put_get_ls_rm(tenant: Tenant, root: EtcdClient) -> None:
    env = tenant.env
    assert run(env, "put", "default/model/config", "lr=0.1").returncode == 0
    assert run(env, "put", "trainer/rank:0/ready", "1").returncode == 0
    # The key is stored as {namespace}/{component}/{key}.
    stored = root.range(f"{tenant.namespace}/default/model/config".encode()).kvs
    assert [kv.value for kv in stored] == [b"lr=0.1"]

    got = run(env, "get", "default/model/config")
    assert (got.returncode, got.stdout) == (0, "lr=0.1")
    listed = run(env, "ls")
    assert listed.stdout.splitlines() == ["default/model/config", "trainer/rank:0/ready"]
    assert run(env, "ls", "trainer/*").stdout.splitlines() == ["trainer/rank:0/ready"]
    rows = json.loads(run(env, "ls", "--json").stdout)
    assert [(r["key"], r["bytes"]) for r in rows] == [
        ("default/model/config", 6),
        ("trainer/rank:0/ready", 1),
    ]

    removed = run(env, "rm", "default/model/config")
    assert removed.returncode == 0
    assert root.range(f"{tenant.namespace}/default/model/config".encode()).kvs == []
    assert run(env, "ls").stdout.splitlines() == ["trainer/rank:0/ready"]


def test_put_from_stdin_keeps_binary_values(tenant: Tenant) -> None:
    payload = bytes(range(256))
    put = run(tenant.env, "put", "default/blob", "-", "--json", stdin=payload)
    assert json.loads(put.stdout) == {"key": "default/blob", "bytes": 256}
    got = json.loads(run(tenant.env, "get", "default/blob", "--json").stdout)
    assert base64.b64decode(got["value_base64"]) == payload
    assert got["exists"] is True


def test_missing_key_and_bad_input_fail_with_one_line(tenant: Tenant) -> None:
    line = one_line_error(run(tenant.env, "get", "default/nothing"), 1)
    assert "does not exist" in line
    one_line_error(run(tenant.env, "rm", "default/nothing"), 1)
    line = one_line_error(run(tenant.env, "get", "no-component"), 2)
    assert "<component>/<key>" in line
    line = one_line_error(run(tenant.env, "put", "default/../x", "1"), 2)
    assert "'..'" in line
    env = dict(tenant.env)
    del env["ETHA_KV_NAMESPACE"]
    line = one_line_error(run(env, "ls"), 2)
    assert "ETHA_KV_NAMESPACE" in line


def test_unreachable_store_fails_with_one_line_and_a_hint(tenant: Tenant) -> None:
    env = {**tenant.env, "ETHA_KV_ENDPOINTS": f"127.0.0.1:{free_port()}", "ETHA_KV_TIMEOUT": "1"}
    line = one_line_error(run(env, "get", "default/x"), 1)
    assert "etha doctor" in line


def test_a_key_outside_the_grant_is_refused(tenant: Tenant, root: EtcdClient) -> None:
    env = {**tenant.env, "ETHA_KV_NAMESPACE": "someone-else"}
    line = one_line_error(run(env, "put", "default/x", "1"), 1)
    assert "permission denied" in line
    assert root.range(b"someone-else/default/x").kvs == []


# -- watch ------------------------------------------------------------------------------------


def test_watch_prints_matching_events(tenant: Tenant, root: EtcdClient) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "watch", "default/rank:*", "--json", "--count", "3", "--timeout", "60"],
        env=tenant.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        started = proc.stderr.readline()
        assert "watching" in started, started
        ns = tenant.namespace
        root.put(f"{ns}/default/other".encode(), b"ignored")
        root.put(f"{ns}/default/rank:0".encode(), b"a")
        root.put(f"{ns}/default/rank:1".encode(), b"b")
        root.delete_range(f"{ns}/default/rank:0".encode())
        out, err = proc.communicate(timeout=60)
    finally:
        end_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["key"], e.get("value")) for e in events] == [
        ("PUT", "default/rank:0", "a"),
        ("PUT", "default/rank:1", "b"),
        ("DELETE", "default/rank:0", None),
    ]


# -- barrier ----------------------------------------------------------------------------------


def test_barrier_lists_exactly_the_missing_ranks(tenant: Tenant, root: EtcdClient) -> None:
    ns = tenant.namespace
    for rank, value in ((0, b"1"), (2, b"1"), (3, b"0"), (9, b"1")):
        root.put(f"{ns}/default/rank:{rank}/ready".encode(), value)
    root.put(f"{ns}/default/rank:x/ready".encode(), b"1")

    result = run(tenant.env, "barrier", "default/rank:*/ready", "5", "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["present"] == [0, 2]
    assert summary["missing"] == [1, 4]
    assert summary["other"] == {"3": {"value": "0"}}
    assert summary["unexpected"] == ["default/rank:9/ready", "default/rank:x/ready"]
    assert summary["complete"] is False

    text = run(tenant.env, "barrier", "default/rank:*/ready", "5").stdout
    assert "2 of 5 present" in text
    assert "missing ranks: 1 4" in text
    assert "other value: 3='0'" in text

    # --value changes what counts as present.
    other = json.loads(
        run(tenant.env, "barrier", "default/rank:*/ready", "4", "--value", "0", "--json").stdout
    )
    assert other["present"] == [3]
    assert other["missing"] == [1]


def test_barrier_watch_follows_until_complete(tenant: Tenant, root: EtcdClient) -> None:
    ns = tenant.namespace
    root.put(f"{ns}/default/rank:0/ready".encode(), b"1")
    proc = subprocess.Popen(
        [*COMMAND, "barrier", "default/rank:*/ready", "3", "--watch", "--timeout", "60"],
        env=tenant.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "1 of 3 present" in first, first
        time.sleep(0.2)
        root.put(f"{ns}/default/rank:2/ready".encode(), b"1")
        root.put(f"{ns}/default/rank:1/ready".encode(), b"1")
        out, err = proc.communicate(timeout=60)
    finally:
        end_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "3 of 3 present (value '1') - complete" in out
    assert "missing ranks: -" in out


def test_barrier_watch_times_out_naming_the_missing_ranks(tenant: Tenant, root: EtcdClient) -> None:
    root.put(f"{tenant.namespace}/default/rank:1/ready".encode(), b"1")
    result = run(tenant.env, "barrier", "default/rank:*/ready", "3", "--watch", "--timeout", "1")
    line = one_line_error(result, 1)
    assert "incomplete after 1s" in line
    assert "missing ranks: 0 2" in result.stdout


# -- doctor -----------------------------------------------------------------------------------


def test_doctor_passes_on_a_working_environment(tenant: Tenant, root: EtcdClient) -> None:
    result, report = doctor(tenant.env)
    assert result.returncode == 0, result.stdout
    assert report["ok"] is True and report["verdict"] == "OK"
    names = [c["name"] for c in report["checks"]]
    assert names[0] == "environment" and "log-in" in names and "round trip" in names
    # The probe key is gone again.
    assert root.range(f"{tenant.namespace}/".encode(), f"{tenant.namespace}0".encode()).kvs == []
    text = run(tenant.env, "doctor").stdout
    assert text.strip().endswith("verdict: OK")
    assert "ms for put + get + delete" in text
    assert tenant.password not in text


def _verdict(env: dict[str, str], problem: str) -> dict[str, Any]:
    result, report = doctor(env)
    assert result.returncode == 1, result.stdout
    assert report["ok"] is False
    assert report["problems"][0] == problem, report
    failed = next(c for c in report["checks"] if not c["ok"])
    assert failed["fix"], failed
    text = run(env, "doctor")
    assert f"verdict: {problem}:" in text.stdout
    assert "fix: " in text.stdout
    if env.get("ETHA_KV_PASSWORD"):
        assert env["ETHA_KV_PASSWORD"] not in text.stdout + result.stdout
    return failed  # type: ignore[no-any-return]


def test_doctor_names_a_missing_variable(tenant: Tenant) -> None:
    env = dict(tenant.env)
    del env["ETHA_KV_ENDPOINTS"]
    failed = _verdict(env, "environment")
    assert "ETHA_KV_ENDPOINTS is not set" in failed["detail"]
    env = {**tenant.env, "ETHA_KV_PASSWORD": ""}
    assert "ETHA_KV_PASSWORD is not set" in _verdict(env, "environment")["detail"]


def test_doctor_diagnoses_an_unreachable_endpoint(tenant: Tenant) -> None:
    env = {**tenant.env, "ETHA_KV_ENDPOINTS": f"http://127.0.0.1:{free_port()}"}
    failed = _verdict(env, "unreachable")
    assert "TCP connect failed" in failed["detail"]


def test_doctor_diagnoses_wrong_credentials(tenant: Tenant) -> None:
    env = {**tenant.env, "ETHA_KV_PASSWORD": "not-the-password"}
    failed = _verdict(env, "credentials")
    assert failed["name"] == "log-in"


def test_doctor_diagnoses_a_refused_prefix(tenant: Tenant) -> None:
    env = {**tenant.env, "ETHA_KV_NAMESPACE": f"{tenant.namespace}-other"}
    failed = _verdict(env, "permission_denied")
    assert "ETHA_KV_NAMESPACE" in failed["fix"]


def test_doctor_diagnoses_https_against_a_plaintext_server(tenant: Tenant, tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    env = {
        **tenant.env,
        "ETHA_KV_ENDPOINTS": tenant.env["ETHA_KV_ENDPOINTS"].replace("http://", "https://"),
        "ETHA_KV_CA_FILE": str(tls.ca_cert),
    }
    failed = _verdict(env, "tls_mismatch")
    assert "plaintext" in failed["detail"]


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, Path]]:
    workdir = tmp_path_factory.mktemp("etcd-tls-cli")
    tls = make_tls(workdir / "tls")
    with etcd_cluster(workdir / "etcd", tls=tls) as cluster:
        yield cluster, tls.ca_cert


def _tls_env(cluster: EtcdCluster, **extra: str) -> dict[str, str]:
    env = base_env()
    env.update(
        ETHA_KV_NAMESPACE=f"cli-{uuid.uuid4().hex[:8]}",
        ETHA_KV_ENDPOINTS=",".join(cluster.urls),
        ETHA_KV_TIMEOUT="5",
        **extra,
    )
    return env


def test_doctor_passes_over_tls(etcd_tls: tuple[EtcdCluster, Path]) -> None:
    cluster, ca = etcd_tls
    result, report = doctor(_tls_env(cluster, ETHA_KV_CA_FILE=str(ca)))
    assert result.returncode == 0, result.stdout
    assert any("server certificate verified" in c["detail"] for c in report["checks"])


def test_doctor_diagnoses_plaintext_against_a_tls_server(
    etcd_tls: tuple[EtcdCluster, Path],
) -> None:
    cluster, _ = etcd_tls
    env = _tls_env(cluster)
    env["ETHA_KV_ENDPOINTS"] = env["ETHA_KV_ENDPOINTS"].replace("https://", "http://")
    failed = _verdict(env, "tls_mismatch")
    assert "requires TLS" in failed["detail"]
    assert "https://" in failed["fix"]


def test_doctor_diagnoses_an_untrusted_server_certificate(
    etcd_tls: tuple[EtcdCluster, Path], tmp_path: Path
) -> None:
    cluster, _ = etcd_tls
    stranger = make_tls(tmp_path / "other-ca")
    env = _tls_env(cluster, ETHA_KV_CA_FILE=str(stranger.ca_cert))
    failed = _verdict(env, "tls_untrusted")
    assert "ETHA_KV_CA_FILE" in failed["fix"]


# -- through the etha gateway -------------------------------------------------------------------


gateway = gateway_fixture("gateway-cli")


def _gateway_env(
    gateway: GatewayProcess, username: str, secret: str, prefix: str
) -> dict[str, str]:
    env = base_env()
    env.update(
        ETHA_KV_NAMESPACE=prefix,
        ETHA_KV_ENDPOINTS=gateway.endpoint,
        ETHA_KV_USERNAME=username,
        ETHA_KV_PASSWORD=secret,
        ETHA_KV_TIMEOUT="5",
    )
    return env


def test_commands_and_doctor_through_the_gateway(gateway: GatewayProcess, root: EtcdClient) -> None:
    env = _gateway_env(gateway, *register_tenant(root))
    result, report = doctor(env)
    assert result.returncode == 0, result.stdout
    assert report["verdict"] == "OK"
    assert run(env, "put", "default/rank:0/ready", "1").returncode == 0
    assert run(env, "get", "default/rank:0/ready").stdout == "1"
    assert run(env, "ls").stdout.splitlines() == ["default/rank:0/ready"]
    summary = json.loads(run(env, "barrier", "default/rank:*/ready", "2", "--json").stdout)
    assert (summary["present"], summary["missing"]) == ([0], [1])
    assert run(env, "rm", "default/rank:0/ready").returncode == 0


def test_doctor_through_the_gateway_diagnoses_credentials_prefix_and_quota(
    gateway: GatewayProcess, root: EtcdClient
) -> None:
    username, secret, prefix = register_tenant(root)
    env = _gateway_env(gateway, username, secret, prefix)
    _verdict({**env, "ETHA_KV_PASSWORD": "not-the-secret"}, "credentials")
    _verdict({**env, "ETHA_KV_NAMESPACE": f"{prefix}-other"}, "permission_denied")

    username, secret, prefix = register_tenant(root, quotas={"keys": 1})
    env = _gateway_env(gateway, username, secret, prefix)
    assert run(env, "put", "default/only", "x").returncode == 0
    failed = _verdict(env, "quota")
    assert "'keys'" in failed["detail"]
    line = one_line_error(run(env, "put", "default/second", "y"), 1)
    assert "quota" in line


# -- TCPStore ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcpstore() -> Iterator[TCPStoreServer]:
    with TCPStoreServer() as server:
        yield server


def _tcpstore_env(port: int) -> dict[str, str]:
    env = base_env()
    env.update(
        ETHA_KV_BACKEND="tcpstore",
        ETHA_KV_NAMESPACE=f"cli-{uuid.uuid4().hex[:8]}",
        ETHA_KV_TCPSTORE_HOST="127.0.0.1",
        ETHA_KV_TCPSTORE_PORT=str(port),
        # What rank 0's pod says: doctor must still only connect as a client.
        ETHA_KV_TCPSTORE_IS_SERVER="true",
        ETHA_KV_TIMEOUT="5",
    )
    return env


def test_doctor_and_key_commands_on_tcpstore(tcpstore: TCPStoreServer) -> None:
    env = _tcpstore_env(tcpstore.port)
    result, report = doctor(env)
    assert result.returncode == 0, result.stdout
    assert any(c["name"] == "round trip" for c in report["checks"])
    client_env = {**env, "ETHA_KV_TCPSTORE_IS_SERVER": "false"}
    assert run(client_env, "put", "default/x", "42").returncode == 0
    assert run(client_env, "get", "default/x").stdout == "42"
    line = one_line_error(run(client_env, "ls"), 2)
    assert "needs the etcd backend" in line


def test_doctor_on_tcpstore_diagnoses_a_closed_port() -> None:
    failed = _verdict(_tcpstore_env(free_port()), "unreachable")
    assert "TCP connect failed" in failed["detail"]
