"""Malformed ``ETHA_KV_*`` environments and KVNamespace specs (hypothesis, offline).

Extends tests/test_keys_and_config.py (hand-written bad environments) and
tests/operator/test_validation.py (the operator refusing a second owner of a prefix):
here any text in any variable, and any JSON in any spec field, gives either a valid
config/spec or the documented error, never another exception.
"""

from __future__ import annotations

from typing import Any

import pytest
from etha_operator import model
from etha_operator.etcd_admin import prefix_grant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etha.kvstore import from_env
from etha.kvstore.config import ALL_VARIABLES, EtcdConfig, TCPStoreConfig, parse_env
from etha.kvstore.errors import ConfigurationError
from etha.kvstore.keys import MAX_NAME_LENGTH, validate_name
from tests.support.chaos import scaled

FUZZ = settings(max_examples=scaled(300, 3000), deadline=None)

plausible = {
    "ETHA_KV_BACKEND": st.sampled_from(["etcd", "tcpstore", "ETCD", "redis", "", " etcd "]),
    "ETHA_KV_NAMESPACE": st.sampled_from(["job-1", "a/b", "", "x" * 129, "..", "ns:1"]),
    "ETHA_KV_ENDPOINTS": st.sampled_from(
        [
            "127.0.0.1:2379",
            "http://a:1,https://b:2",
            "a",
            "a:0",
            "a:99999",
            "ftp://a:1",
            ",",
            "[::1]:2379",
        ]
    ),
    "ETHA_KV_USERNAME": st.sampled_from(["u", "", " "]),
    "ETHA_KV_PASSWORD": st.sampled_from(["p", "", "s3cret-value"]),
    "ETHA_KV_TIMEOUT": st.sampled_from(["10", "0", "-1", "nan", "inf", "1e309", "abc", "0.5"]),
    "ETHA_KV_TCPSTORE_PORT": st.sampled_from(["29500", "0", "65536", "x", "-1"]),
    "ETHA_KV_TCPSTORE_HOST": st.sampled_from(["localhost", "", "10.0.0.1"]),
    "ETHA_KV_TCPSTORE_IS_SERVER": st.sampled_from(["true", "no", "maybe", "1"]),
    "ETHA_KV_TCPSTORE_WORLD_SIZE": st.sampled_from(["4", "0", "-3", "many"]),
    "ETHA_KV_CA_PEM": st.sampled_from(["-----BEGIN CERTIFICATE-----\nxx", "garbage"]),
    "ETHA_KV_CA_FILE": st.sampled_from(["/nonexistent/ca.pem", "", "/etc/hostname"]),
    "RANK": st.sampled_from(["0", "1", "x"]),
}
variables = sorted(ALL_VARIABLES | {"RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"})
environments = st.dictionaries(
    st.sampled_from(variables),
    st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "\udcff"])),
    max_size=8,
) | st.fixed_dictionaries({}, optional=plausible)


@FUZZ
@given(env=environments)
def test_parse_env_gives_a_config_or_a_configuration_error(env: dict[str, str]) -> None:
    try:
        config = parse_env(env)
    except ConfigurationError as exc:
        message = str(exc)
        assert "ETHA_KV_" in message or any(v in message for v in ("RANK", "MASTER_", "WORLD_"))
        password = env.get("ETHA_KV_PASSWORD", "").strip()
        # (unless the same text is also the value of another variable, which may be shown)
        elsewhere = any(password in v for k, v in env.items() if k != "ETHA_KV_PASSWORD")
        if len(password) >= 6 and not elsewhere:
            assert password not in message, "a password leaked into an error message"
        return
    assert isinstance(config, (EtcdConfig, TCPStoreConfig))
    assert validate_name(config.namespace, "namespace") == config.namespace
    assert config.timeout > 0
    assert parse_env(config.to_env()) == config  # what is accepted round-trips


@settings(max_examples=scaled(100, 800), deadline=None)
@given(
    env=st.fixed_dictionaries(
        {}, optional={k: v for k, v in plausible.items() if k != "ETHA_KV_BACKEND"}
    )
)
def test_from_env_opens_an_etcd_store_or_raises_configuration_error(env: dict[str, str]) -> None:
    """from_env() itself (etcd stores connect lazily, so no server is needed here)."""
    env["ETHA_KV_BACKEND"] = "etcd"
    try:
        store = from_env(env)
    except ConfigurationError:
        return
    store.close(cleanup=False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=140),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)
spec_fields = {
    "keyPrefix": json_values | st.sampled_from(["ok", "a/b", "x" * 128, "x" * 129, "", ".."]),
    "jobRef": json_values
    | st.fixed_dictionaries(
        {
            "apiVersion": st.sampled_from(["batch/v1", "apps/v1", 1]),
            "kind": st.sampled_from(["Job", "Pod"]),
        },
        optional={
            "name": json_values | st.sampled_from(["train", "Train", "a" * 63, "a" * 64, "-x"])
        },
    ),
    "onJobEnd": json_values | st.sampled_from(["Delete", "Keep", "Revoke", "delete"]),
    "ttlSecondsAfterJobEnd": json_values | st.sampled_from([0, -1, 31536000, 31536001, True, "10"]),
    "component": json_values | st.sampled_from(["default", "", "a*b"]),
}
specs = (
    json_values
    | st.fixed_dictionaries({}, optional=spec_fields)
    | st.dictionaries(st.text(max_size=10), json_values, max_size=3)
)


@FUZZ
@given(spec=specs)
def test_kvnamespace_specs_are_valid_or_refused_with_the_field_named(spec: Any) -> None:
    try:
        parsed = model.parse_spec(spec)
    except model.SpecError as exc:
        assert "spec" in str(exc)
        return
    assert isinstance(spec, dict)
    assert parsed.job.api_version == "batch/v1" and parsed.job.kind == "Job"
    if parsed.key_prefix is not None:
        assert validate_name(parsed.key_prefix, "prefix") == parsed.key_prefix
        assert len(parsed.key_prefix) <= MAX_NAME_LENGTH
    assert 0 <= parsed.ttl_seconds_after_job_end <= model.MAX_TTL
    assert parsed.on_job_end in model.ON_JOB_END


prefixes = st.text(alphabet="abz019._:-", min_size=1, max_size=MAX_NAME_LENGTH).filter(
    lambda p: p not in (".", "..")
)


@settings(
    max_examples=scaled(500, 5000),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(a=prefixes, b=prefixes)
def test_grants_of_different_prefixes_never_overlap(a: str, b: str) -> None:
    """Why refusing an *equal* prefix is enough: distinct valid prefixes grant disjoint ranges."""
    ga, gb = prefix_grant(a), prefix_grant(b)
    overlap = ga.key < gb.range_end and gb.key < ga.range_end
    assert overlap == (a == b)


@pytest.mark.parametrize("length", [MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1, 10_000])
def test_overlong_prefixes_are_refused(length: int) -> None:
    spec = {
        "keyPrefix": "p" * length,
        "jobRef": {"apiVersion": "batch/v1", "kind": "Job", "name": "j"},
    }
    if length <= MAX_NAME_LENGTH:
        assert model.parse_spec(spec).key_prefix == "p" * length
    else:
        with pytest.raises(model.SpecError, match=r"spec\.keyPrefix"):
            model.parse_spec(spec)
