"""Direct mode is refused on etcd versions with known permission bypasses.

The test etcd is a 3.5 release: every 3.5 release skips permission checks under a
NOSPACE alarm, so the operator must refuse to start in direct mode without the override.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.operator_runner import OperatorProcess

pytestmark = pytest.mark.timeout(120)


def test_direct_mode_on_etcd_3_5_is_refused_naming_the_advisories(
    operator_factory: Callable[..., OperatorProcess],
) -> None:
    proc = operator_factory(ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT="false")
    with pytest.raises(RuntimeError, match="exited early"):
        proc.start(timeout=30)
    log = proc.log()
    assert "refusing direct mode" in log
    for advisory in (
        "NOSPACE",
        "GHSA-rfx7-8w68-q57q",
        "GHSA-q8m4-xhhv-38mg",
        "GHSA-x35m-3gp4-4fh5",
        "GHSA-xg4h-6gfc-h4m8",
    ):
        assert advisory in log
    assert "ETHA_OPERATOR_MODE=gateway" in log
    assert "etha operator started" not in log


def test_the_override_starts_direct_mode_with_a_warning(
    operator_factory: Callable[..., OperatorProcess],
) -> None:
    proc = operator_factory(ETHA_OPERATOR_ALLOW_UNSAFE_DIRECT="true").start()
    try:
        log = proc.log()
        assert "direct mode on an unsafe etcd" in log and "NOSPACE" in log
        assert "etha operator started: direct mode" in log
    finally:
        proc.stop()
