"""``init_process_group(init_method="etha://...")`` on real etcd with per-namespace auth."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import etha.distributed
from etha.distributed.rendezvous import RendezvousSpec, parse_url
from etha.distributed.store import EthaStore
from etha.kvstore.config import EtcdConfig
from etha.kvstore.errors import ConfigurationError
from tests.support.etcd_server import EtcdCluster
from tests.support.etcd_users import all_keys, read_key
from tests.support.tenants import gateway_tenant_fixture, namespace_fixture
from tests.support.workers import child_env, procs, tail

pytestmark = pytest.mark.timeout(150)


# -- URL parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("etha:///run-1?rank=2&world_size=4", {}, RendezvousSpec(2, 4, "run-1")),
        ("etha://run-1?rank=0&world_size=1", {}, RendezvousSpec(0, 1, "run-1")),
        ("etha://", {"RANK": "3", "WORLD_SIZE": "8"}, RendezvousSpec(3, 8, "default")),
        (
            "etha://?world_size=-1",
            {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job7"},
            RendezvousSpec(1, 2, "job7"),
        ),
        (
            "etha://",
            {
                "RANK": "1",
                "WORLD_SIZE": "2",
                "TORCHELASTIC_RUN_ID": "job7",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "1",
            },
            RendezvousSpec(1, 2, "job7." + hashlib.sha256(b"h:1").hexdigest()[:8]),
        ),
        (
            "etha:///explicit",
            {
                "RANK": "1",
                "WORLD_SIZE": "2",
                "TORCHELASTIC_RUN_ID": "job7",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "1",
            },
            RendezvousSpec(1, 2, "explicit"),
        ),
        (
            "etha:///r?rank=1&world_size=2&component=pg",
            {"RANK": "0", "WORLD_SIZE": "9"},
            RendezvousSpec(1, 2, "r", "pg"),
        ),
    ],
)
def test_parse_url(url: str, env: dict[str, str], expected: RendezvousSpec) -> None:
    assert parse_url(url, env) == expected


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("etha:///r", {"WORLD_SIZE": "2"}, "rank parameter missing"),
        ("etha:///r?rank=0", {}, "world size parameter missing"),
        ("etha:///r?rank=x&world_size=2", {}, "rank='x' is not an integer"),
        ("etha:///r?rank=2&world_size=2", {}, "rank 2 is not below world_size 2"),
        ("etha:///r?rank=0&world_size=0", {}, "world_size=0 must be at least 1"),
        ("etha://a/b?rank=0&world_size=1", {}, "names the run twice"),
        ("etha:///a/b?rank=0&world_size=1", {}, "run id"),
        ("etha:///r?rank=0&world_size=1&bogus=1", {}, "unknown URL parameter 'bogus'"),
        ("tcp://h:1?rank=0&world_size=1", {}, "does not start with etha://"),
    ],
)
def test_parse_url_errors(url: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match="etha:// rendezvous") as info:
        parse_url(url, env)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_handler_is_registered_with_torch() -> None:
    etha.distributed.register()  # idempotent
    from torch.distributed.rendezvous import _rendezvous_handlers

    assert _rendezvous_handlers["etha"] is etha.distributed.etha_rendezvous_handler


# -- real rendezvous ----------------------------------------------------------------------


ns_a = namespace_fixture("rdzv-a")
ns_b = namespace_fixture("rdzv-b")


@pytest.fixture
def etha_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """This process's ETHA_KV_* variables, restored afterwards."""
    import os

    for name in list(os.environ):
        if name.startswith("ETHA_KV_"):
            monkeypatch.delenv(name)
    yield monkeypatch


GLOO_WORKER = """
import json, os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
import etha.distributed  # registers etha://

url, out, how = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = {"timeout": timedelta(seconds=90)}
if how == "args":  # rank and world size as arguments; torch puts them into the URL
    kwargs.update(rank=int(os.environ.pop("RANK")), world_size=int(os.environ.pop("WORLD_SIZE")))
dist.init_process_group("gloo", init_method=url, **kwargs)
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1), 1.0])
dist.all_reduce(t)
dist.barrier()
# A new group rendezvouses through the store again, after init_process_group returned.
group = dist.new_group(list(range(world)))
u = torch.tensor([float(rank)])
dist.all_reduce(u, group=group)
with open(out, "w") as f:
    json.dump({"rank": rank, "world": world, "sum": t.tolist(), "group_sum": u.item()}, f)
dist.destroy_process_group()
"""


#: A tenant behind a real etha gateway: the workers reach etcd only through it.
ns_gateway = gateway_tenant_fixture("gateway")


def run_ranks(
    code: str,
    config: EtcdConfig,
    world: int,
    tmp_path: Path,
    args: Callable[[int, str], list[str]],
) -> list[dict[str, Any]]:
    """Run ``code`` as ranks 0..world-1 of one job in ``config``'s namespace.

    Rank r gets ``args(r, out)`` and writes its JSON result to ``out``; every rank must
    exit 0 (else the logs' tails are shown). Returns the results in rank order.
    """
    script = tmp_path / "worker.py"
    script.write_text(code)
    outs = [str(tmp_path / f"out{r}.json") for r in range(world)]
    with procs() as p:
        logs = [tmp_path / f"rank{r}.log" for r in range(world)]
        workers = [
            p.python(
                script,
                args(r, outs[r]),
                child_env(config, RANK=str(r), WORLD_SIZE=str(world)),
                logs[r],
            )
            for r in range(world)
        ]
        codes = p.wait_all(workers, timeout=120)
        assert codes == [0] * world, "\n---\n".join(tail(log) for log in logs)
    return [json.loads(Path(out).read_text()) for out in outs]


@pytest.mark.parametrize("path", ["etcd", "gateway"])
def test_four_processes_all_reduce_and_barrier(
    etcd_auth: EtcdCluster, path: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ns_a: EtcdConfig = request.getfixturevalue("ns_a" if path == "etcd" else "ns_gateway")
    run = f"run-{uuid.uuid4().hex[:8]}"
    world = 4
    outputs = run_ranks(
        GLOO_WORKER,
        ns_a,
        world,
        tmp_path,
        lambda r, out: [f"etha:///{run}", out, "args" if r % 2 else "env"],
    )
    results = sorted(outputs, key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert all(r["world"] == world for r in results)
    assert all(r["sum"] == [10.0, 4.0] for r in results)  # 1+2+3+4, and one per rank
    assert all(r["group_sum"] == 6.0 for r in results)
    # Every key the rendezvous and gloo wrote is under the namespace's c10d/<run>/ prefix.
    written = [k for k in all_keys(etcd_auth) if run in k]
    assert written, "the rendezvous wrote no keys at all?"
    assert all(k.startswith(f"{ns_a.namespace}/c10d/{run}/") for k in written), written


INLINE_STORE_WORKER = """
import gc, json, os, sys, weakref
from datetime import timedelta
import torch
import torch.distributed as dist
from etha.distributed import EthaStore
from etha.kvstore import parse_env

scope, out = sys.argv[1], sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
# The inline idiom: no Python reference to the store is kept by the caller.
dist.init_process_group(
    "gloo", store=EthaStore(parse_env(), scope=scope, timeout=timedelta(seconds=60)),
    rank=rank, world_size=world,
)
gc.collect()
store = dist.distributed_c10d._get_default_store().underlying_store
kind = type(store).__name__
ref, client = weakref.ref(store), store.client
del store
group = dist.new_group(list(range(world)))
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t, group=group)
del group
dist.destroy_process_group()
gc.collect()
with open(out, "w") as f:
    json.dump({"kind": kind, "sum": t.item(), "freed": ref() is None, "closed": client.closed}, f)
"""


def test_inline_store_survives_gc_and_is_freed_after_destroy(
    ns_a: EtcdConfig, tmp_path: Path
) -> None:
    # torch keeps only the C++ half of a Python store; the Python half must stay alive
    # while torch uses it (new_group after gc) and go once the process group is gone.
    scope = f"inline-{uuid.uuid4().hex[:8]}"
    for result in run_ranks(INLINE_STORE_WORKER, ns_a, 4, tmp_path, lambda r, out: [scope, out]):
        assert result == {"kind": "EthaStore", "sum": 10.0, "freed": True, "closed": True}


def test_inline_store_without_a_readable_refcount_lives_while_a_group_exists(
    ns_a: EtcdConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fallback for a torch whose object layout the probe does not recognise.
    import gc
    import weakref

    from etha.distributed import store as store_module

    monkeypatch.setattr(store_module, "_LAYOUT_CHECKED", False)
    scope = f"fallback-{uuid.uuid4().hex[:8]}"
    dist.init_process_group(
        "gloo", store=EthaStore(ns_a, scope=scope, timeout=timedelta(seconds=30)),
        rank=0, world_size=1,
    )  # fmt: skip
    try:
        gc.collect()
        held = dist.distributed_c10d._get_default_store().underlying_store
        assert isinstance(held, EthaStore)
        ref = weakref.ref(held)
        del held
        group = dist.new_group([0])
        t = torch.tensor([3.0])
        dist.all_reduce(t, group=group)
        assert t.item() == 3.0
        del group
    finally:
        dist.destroy_process_group()
    gc.collect()
    assert ref() is None


def test_single_process_in_this_process(
    etha_env: pytest.MonkeyPatch, ns_a: EtcdConfig, etcd_auth: EtcdCluster
) -> None:
    for name, value in ns_a.to_env().items():
        etha_env.setenv(name, value)
    run = f"solo-{uuid.uuid4().hex[:8]}"
    dist.init_process_group(
        "gloo", init_method=f"etha://{run}", rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    try:
        t = torch.tensor([5.0])
        dist.all_reduce(t)
        assert t.item() == 5.0
        store = dist.distributed_c10d._get_default_store()
        store.set("user-key", "v")
        assert store.get("user-key") == b"v"
    finally:
        dist.destroy_process_group()
    assert any(
        k.startswith(f"{ns_a.namespace}/c10d/{run}/") and k.endswith("user-key")
        for k in all_keys(etcd_auth)
    )


def test_rendezvous_store_timeout_comes_from_init_process_group(
    etha_env: pytest.MonkeyPatch, ns_a: EtcdConfig
) -> None:
    for name, value in ns_a.to_env().items():
        etha_env.setenv(name, value)
    store, rank, world = next(
        dist.rendezvous("etha:///t-timeout", rank=1, world_size=3, timeout=timedelta(seconds=7))
    )
    assert (rank, world) == (1, 3)
    assert isinstance(store, EthaStore)
    assert store.timeout == timedelta(seconds=7)
    assert store.prefix == f"{ns_a.namespace}/c10d/t-timeout/"
    store.close()


@pytest.fixture
def dead_endpoints_env(etha_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """ETHA_KV_* pointing at two ports nothing listens on; a 30 s request deadline."""
    from tests.support.ports import free_port

    etha_env.setenv("ETHA_KV_BACKEND", "etcd")
    etha_env.setenv("ETHA_KV_NAMESPACE", "dead")
    etha_env.setenv("ETHA_KV_ENDPOINTS", f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    etha_env.setenv("ETHA_KV_TIMEOUT", "30")
    return etha_env


def test_rendezvous_against_dead_endpoints_fails_within_its_timeout_like_tcp(
    dead_endpoints_env: pytest.MonkeyPatch,
) -> None:
    from tests.support.ports import free_port

    errors: list[type[BaseException]] = []
    for url in (
        f"tcp://127.0.0.1:{free_port()}?rank=1&world_size=2",
        "etha:///x?rank=1&world_size=2",
    ):
        started = time.monotonic()
        with pytest.raises(dist.DistNetworkError) as info:
            next(dist.rendezvous(url, timeout=timedelta(seconds=2)))
        elapsed = time.monotonic() - started
        if url.startswith("etha"):
            # (tcp:// itself may take one more connect back-off, about 1.5 s.)
            assert elapsed < 3.0, f"{url}: failed after {elapsed:.1f}s, not within 2 s + 1 s"
        errors.append(type(info.value))
    assert errors[0] is errors[1]
    assert "etcd" in str(info.value)


def test_torchrun_handler_against_dead_endpoints_fails_within_read_timeout(
    dead_endpoints_env: pytest.MonkeyPatch,
) -> None:
    # torch's c10d backend raises RendezvousConnectionError when its store is unreachable.
    from torch.distributed.elastic.rendezvous import (
        RendezvousConnectionError,
        RendezvousParameters,
    )

    from etha.distributed.elastic import create_rdzv_handler

    params = RendezvousParameters(
        backend="etha", endpoint="", run_id="dead", min_nodes=1, max_nodes=1, read_timeout="2"
    )
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="etcd") as info:
        create_rdzv_handler(params)
    assert time.monotonic() - started < 3.0
    assert isinstance(info.value.__cause__, dist.DistNetworkError)


def test_first_calls_on_dead_endpoints_honour_the_store_timeout(
    dead_endpoints_env: pytest.MonkeyPatch,
) -> None:
    from etha.kvstore import parse_env

    config = parse_env()
    assert isinstance(config, EtcdConfig)
    store = EthaStore(config, timeout=timedelta(seconds=2))
    try:
        for action in (lambda: store.get("k"), lambda: store.set("k", "v")):
            started = time.monotonic()
            with pytest.raises(dist.DistNetworkError):
                action()
            assert time.monotonic() - started < 3.0
    finally:
        store.close()


def test_namespace_a_credentials_cannot_rendezvous_in_namespace_b(
    etha_env: pytest.MonkeyPatch, ns_a: EtcdConfig, ns_b: EtcdConfig, etcd_auth: EtcdCluster
) -> None:
    # Namespace B has a job running; A's credentials point at B's namespace.
    run = "shared-run"
    b_store = EthaStore(ns_b, component="c10d", scope=run)
    b_store.set("rank0/addr", "10.0.0.1:1234")
    for name, value in ns_a.to_env().items():
        etha_env.setenv(name, value)
    etha_env.setenv("ETHA_KV_NAMESPACE", ns_b.namespace)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="permission denied"):
        dist.init_process_group(
            "gloo", init_method=f"etha:///{run}", rank=1, world_size=2,
            timeout=timedelta(seconds=60),
        )  # fmt: skip
    assert time.monotonic() - started < 30, "refused only after waiting: should fail at once"
    assert not dist.is_initialized()
    with pytest.raises(dist.DistStoreError, match="permission denied"):
        next(dist.rendezvous(f"etha:///{run}", rank=1, world_size=2))
    config = dataclasses.replace(ns_a, namespace=ns_b.namespace)
    store = EthaStore(config, component="c10d", scope=run)
    with pytest.raises(dist.DistStoreError, match="permission denied"):
        store.get("rank0/addr")
    with pytest.raises(dist.DistStoreError, match="permission denied"):
        store.set("rank0/addr", "attacker")
    assert read_key(etcd_auth, f"{ns_b.namespace}/c10d/{run}/rank0/addr") == b"10.0.0.1:1234"
    store.close()
    b_store.close()
