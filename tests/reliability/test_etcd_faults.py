"""K workers on a 3-member etcd cluster (auth on) while members are SIGKILLed and SIGSTOPped.

Checked: zero lost acknowledged writes (every acked key read back as root), no duplicated
write, no stale read of a worker's own write, every barrier completes or fails with a
clear etha error, no worker crashes or hangs. Figures go to ETHA_CHAOS_OUT (make chaos).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from etha.kvstore.etcd_client import EtcdClient
from tests.reliability.conftest import make_prefix_user, wait_healthy_with_auth
from tests.support.chaos import EtcdWorkload, FaultLog, WorkloadReport, full_scale, record, scaled
from tests.support.etcd_server import ROOT_USER, EtcdCluster, EtcdMember
from tests.support.etcd_users import root_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500 if full_scale() else 400)]

#: etcd's default election timeout is 1 s; a pause must outlast it to force an election
#: (paused leader) or a client failover (paused member a client is connected to).
PAUSE_S = 3.0
DOWN_S = 2.0
SETTLE_S = 2.0


def member_values(cluster: EtcdCluster, key: bytes) -> dict[str, str]:
    """``key``'s value as each member holds it (serializable reads: no leader involved)."""
    values: dict[str, str] = {}
    for node in cluster.nodes:
        with EtcdClient(
            [f"{cluster.scheme}://{node.endpoint}"],
            username=ROOT_USER,
            password=cluster.root_password,
            timeout=10.0,
        ) as member:
            kvs = member.range(key, serializable=True).kvs
            values[node.endpoint] = kvs[0].value.decode() if kvs else "<missing>"
    return values


@contextmanager
def running_workload(
    cluster: EtcdCluster, root: EtcdClient, workers: int, barrier_timeout: float
) -> Iterator[EtcdWorkload]:
    """``workers`` threads as a fresh prefix-scoped user, 3 rounds in; stopped on exit.

    The caller verifies the stopped workload (``load.verify(root)``) after the block.
    """
    user = make_prefix_user(root)
    load = EtcdWorkload(
        cluster.urls,
        username=user.name,
        password=user.password,
        workers=workers,
        namespace=user.namespace,
        request_timeout=5.0,
        barrier_timeout=barrier_timeout,
    ).start()
    try:
        load.wait_rounds(3)
        yield load
    finally:
        load.stop()


def restart_leader(cluster: EtcdCluster) -> float:
    """SIGKILL the leader, start it again after DOWN_S; seconds until healthy again."""
    leader = cluster.leader()
    leader.kill()
    time.sleep(DOWN_S)
    leader.start()
    return wait_healthy_with_auth(cluster)


def pause_member(member: EtcdMember, seconds: float) -> None:
    """SIGSTOP ``member`` for ``seconds``, then let it run again."""
    member.pause()
    time.sleep(seconds)
    member.resume()


def settle(cluster: EtcdCluster) -> None:
    """Wait for the cluster to answer with auth again, then give the workers SETTLE_S."""
    wait_healthy_with_auth(cluster)
    time.sleep(SETTLE_S)


def record_and_check(section: str, report: WorkloadReport, faults: FaultLog, **extra: Any) -> None:
    """Record the workload's and the faults' figures plus ``extra``, then check them."""
    figures = report.to_dict()
    figures.update(faults=faults.counts, fault_durations_s=faults.durations_s, **extra)
    record(section, figures)
    print(figures)
    _check(report)


def _check(report: WorkloadReport) -> None:
    assert report.unclear_errors == [], report.unclear_errors
    assert report.writes_lost == 0, report.lost_keys
    # A duplicated put (etcd version 2 for a key written once) is recorded, not failed on:
    # the client re-sends a put after "request timed out" (UNAVAILABLE) or after its
    # attempt deadline on a member that may be hung, which leaves the same value. What
    # it does to a counter (a CAS, never re-sent) is checked by the test below.
    assert report.stale_reads == 0
    assert report.writes_acknowledged > 0
    assert report.barriers_completed > 0
    # Each barrier is either completed or failed (with a clear error, checked above).
    assert report.barriers_completed + report.barriers_failed == report.rounds * report.workers


def test_workers_survive_leader_kills_and_member_pauses(trio: EtcdCluster) -> None:
    workers = scaled(6, 16)
    kills = scaled(1, 5)
    pauses = scaled(1, 5)
    rng = random.Random(6)
    faults = FaultLog()
    recovery: list[float] = []
    with root_client(trio) as root:
        with running_workload(trio, root, workers, barrier_timeout=60.0) as load:
            for i in range(max(kills, pauses)):
                if i < kills:
                    with faults.fault("leader_sigkill"):
                        recovery.append(restart_leader(trio))
                    time.sleep(SETTLE_S)
                if i < pauses:
                    # Alternate: pause the leader (forces an election), or a random follower.
                    leader = trio.leader()
                    followers = [m for m in trio.nodes if m is not leader]
                    member = leader if i % 2 == 0 else rng.choice(followers)
                    with faults.fault("leader_sigstop" if member is leader else "follower_sigstop"):
                        pause_member(member, PAUSE_S)
                    settle(trio)
        record_and_check(
            "etcd_cluster_faults",
            load.verify(root),
            faults,
            cluster_recovery_after_restart_s=[round(r, 3) for r in recovery],
            pause_s=PAUSE_S,
            down_s=DOWN_S,
            members=3,
            auth=True,
        )


def test_long_pause_of_the_member_every_client_is_connected_to(trio: EtcdCluster) -> None:
    """Every client starts on the first endpoint; that member is SIGSTOPped for long.

    A paused member accepts TCP but never answers, so requests run into a deadline
    rather than failing over at once: a retryable attempt's (a third of the request
    timeout), or the watch hub's unanswered progress request (2 s + 3 s). Measured: the
    longest stall; required: nothing lost, clear errors.
    """
    workers = scaled(6, 16)
    pause = float(scaled(8, 20))
    faults = FaultLog()
    with root_client(trio) as root:
        with running_workload(trio, root, workers, barrier_timeout=90.0) as load:
            first = trio.nodes[0]
            was_leader = trio.leader() is first
            with faults.fault("first_endpoint_sigstop"):
                pause_member(first, pause)
            settle(trio)
        record_and_check(
            "etcd_long_pause_of_connected_member",
            load.verify(root),
            faults,
            pause_s=pause,
            paused_member_was_leader=was_leader,
            request_timeout_s=5.0,
        )


def test_counters_stay_exact_through_leader_kills(trio: EtcdCluster) -> None:
    """torch's ``Store.add`` on etcd (EthaStore: a compare-and-swap loop) under leader kills.

    Every acknowledged add must be counted exactly once: the final value lies between
    the acknowledged adds and the acknowledged plus the failed ones (a failed add has an
    unknown outcome). A mutation that was applied and then re-sent by the client's
    failover would count twice and push the value above that bound.
    """
    from etha.distributed.store import EthaStore
    from etha.kvstore.config import EtcdConfig
    from etha.kvstore.etcd_client import EtcdClient

    workers = scaled(4, 16)
    kills = scaled(2, 5)
    with root_client(trio) as root:
        user = make_prefix_user(root)
        config = EtcdConfig(
            namespace=user.namespace,
            endpoints=EtcdClient(trio.urls).endpoints,
            username=user.name,
            password=user.password,
            timeout=5.0,
        )
        acked = [0] * workers
        failed = [0] * workers
        stop = threading.Event()

        def adder(i: int) -> None:
            client = EtcdClient.from_config(config)
            store = EthaStore(config, client=client, scope="counters")
            try:
                while not stop.is_set():
                    try:
                        store.add("total", 1)
                        acked[i] += 1
                    except Exception:  # outcome unknown; counted as such
                        failed[i] += 1
                        time.sleep(0.05)
            finally:
                client.close()

        threads = [threading.Thread(target=adder, args=(i,), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            for _ in range(kills):
                restart_leader(trio)
                time.sleep(SETTLE_S)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert not any(t.is_alive() for t in threads), "an adder hung"
        key = f"{user.namespace}/torch/counters/total".encode()
        total = int(root.range(key).kvs[0].value)
        per_member = member_values(trio, key)
    figures = {
        "workers": workers,
        "leader_sigkills": kills,
        "adds_acknowledged": sum(acked),
        "adds_failed": sum(failed),
        "counter_value": total,
        "over_counted_by": max(0, total - sum(acked) - sum(failed)),
        "under_counted_by": max(0, sum(acked) - total),
    }
    figures["value_per_member"] = per_member
    record("etcd_counter_under_leader_kills", figures)
    print(figures)
    if len(set(per_member.values())) > 1:
        # etcd 3.5.0-3.5.2 may apply a committed entry twice or not at all on a member
        # SIGKILLed mid-apply (its consistent index was not saved atomically with the data;
        # etcd-io/etcd#13766, fixed in 3.5.3). The members then disagree and no client can
        # be exact on top of them. The only etcd these tests have is 3.5.1: say so instead
        # of blaming the counter.
        pytest.xfail(
            f"etcd's members disagree on the counter ({per_member}): etcd 3.5.1's crash"
            " inconsistency (etcd-io/etcd#13766), not etha's add"
        )
    assert sum(acked) <= total, "an acknowledged add was lost"
    assert total <= sum(acked) + sum(failed), f"adds were applied twice: {figures}"
