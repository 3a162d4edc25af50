"""The README's first library example, run as written by 8 worker processes.

Rank 0 is made the fastest: it writes ``model/config`` and leaves before the other
ranks have read it. The example must still complete on every rank, which it does only
because it closes with ``cleanup=False`` (with the default, rank 0 would delete the
value as it leaves and the slower ranks would time out).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from etha.kvstore.config import EtcdConfig, parse_endpoints
from tests.support.etcd_server import ROOT_USER, EtcdCluster

pytestmark = pytest.mark.timeout(180)

README = Path(__file__).resolve().parent.parent / "README.md"
WORLD = 8


def readme_example() -> str:
    """The first ```python block of the README's "Using the library" section."""
    text = README.read_text()
    section = text.split("## Using the library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md lost its 'Using the library' example"
    return match.group(1)


def test_readme_example_completes_when_rank_0_is_fastest(
    etcd_auth: EtcdCluster, namespace: str, tmp_path: Path
) -> None:
    example = readme_example()
    assert "cleanup=False" in example
    # The ranks other than 0 start late, so rank 0 has written, read and closed first.
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            rank = int(os.environ["RANK"])
            world_size = int(os.environ["WORLD_SIZE"])
            payload = b"config-" + os.environ["PAYLOAD_TAG"].encode()
            if rank != 0:
                time.sleep(1.5)
            """
        )
        + example
        + textwrap.dedent(
            """
            assert config == payload, (config, payload)
            with open(os.environ["DONE_DIR"] + f"/{rank}", "w") as f:
                f.write("ok")
            """
        )
    )
    endpoints, _ = parse_endpoints(",".join(etcd_auth.endpoints))
    config = EtcdConfig(
        namespace=namespace,
        endpoints=endpoints,
        username=ROOT_USER,
        password=etcd_auth.root_password,
    )
    done = tmp_path / "done"
    done.mkdir()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ)
        env.update(config.to_env())
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            PAYLOAD_TAG=namespace,
            DONE_DIR=str(done),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    failures = []
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                failures.append(f"rank {rank} exited {proc.returncode}: {out.decode()[-800:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failures, "\n".join(failures)
    assert sorted(p.name for p in done.iterdir()) == [str(r) for r in range(WORLD)]
