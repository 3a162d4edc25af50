"""Which etcd versions direct mode may run on.

In direct mode every worker logs in to etcd itself, and etcd's own permission checks are
the only tenant boundary. Those checks have known bypasses; on an affected version a
worker can read or write other jobs' keys. The operator asks etcd its version at start
(``Maintenance.Status`` on every listed endpoint) and refuses direct mode on an affected
version unless ``ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT=true`` says the cluster has a single
tenant. Gateway mode does not depend on etcd's permission checks at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from etha.kvstore.errors import ConfigurationError

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Advisory:
    """A known way around etcd's permission checks, and the 3.5 release that fixed it."""

    id: str
    summary: str
    fixed_in_3_5: Version | None


#: Every 3.5 release: while a NOSPACE alarm is active, requests skip the permission check.
NOSPACE_BYPASS = Advisory(
    "NOSPACE",
    "under a NOSPACE alarm (etcd out of space) requests skip the permission check",
    None,
)
ADVISORIES: tuple[Advisory, ...] = (
    NOSPACE_BYPASS,
    Advisory("GHSA-rfx7-8w68-q57q", "permission check bypass (fixed in 3.5.28, 3.6.9)", (3, 5, 28)),
    Advisory("GHSA-q8m4-xhhv-38mg", "permission check bypass (fixed in 3.5.28, 3.6.9)", (3, 5, 28)),
    Advisory(
        "GHSA-x35m-3gp4-4fh5",
        "PrevKv and leases inside transactions bypass authorisation (fixed in 3.5.30)",
        (3, 5, 30),
    ),
    Advisory("GHSA-xg4h-6gfc-h4m8", "permission check bypass (fixed in 3.5.33)", (3, 5, 33)),
)
#: The first release the operator accepts for direct mode without the override: the 3.6
#: line carries the fixes above and has no NOSPACE bypass. Later advisories are not known
#: to this code; gateway mode is the supported setup for shared clusters.
MIN_SAFE: Version = (3, 6, 11)

_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


def parse_version(text: str) -> Version:
    """``3.5.1`` (or ``v3.5.1-rc.0``) -> ``(3, 5, 1)``.

    :raises ConfigurationError: not a version etcd reports
    """
    match = _VERSION.match(text.strip())
    if match is None:
        raise ConfigurationError(f"etcd reported version {text!r}, which is not major.minor.patch")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def advisories_for(version: Version) -> list[Advisory]:
    """The known permission bypasses of ``version`` (empty: none known)."""
    if version >= MIN_SAFE:
        return []
    if version[:2] != (3, 5):
        # Older lines (3.4 and before) and early 3.6 releases: not vouched for.
        return [a for a in ADVISORIES if a is not NOSPACE_BYPASS]
    return [a for a in ADVISORIES if a.fixed_in_3_5 is None or version < a.fixed_in_3_5]


def refusal(endpoint: str, version_text: str) -> str | None:
    """Why direct mode must not run against this member, or None when it may."""
    version = parse_version(version_text)
    found = advisories_for(version)
    if not found:
        return None
    listed = "; ".join(f"{a.id}: {a.summary}" for a in found)
    return (
        f"etcd {version_text} at {endpoint} has known permission bypasses ({listed}), so in"
        " direct mode any job could read and write other jobs' keys. Fix: use gateway mode"
        " (ETHA_OPERATOR_MODE=gateway, the default, with ETHA_OPERATOR_GATEWAY_ENDPOINTS),"
        f" or upgrade etcd to {'.'.join(map(str, MIN_SAFE))} or later; on a cluster with a"
        " single tenant only, set ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT=true"
    )


class UnsafeEtcdError(ConfigurationError):
    """Direct mode was asked for on an etcd version with known permission bypasses."""

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version
