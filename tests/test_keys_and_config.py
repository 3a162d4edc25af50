"""Unit and property tests of key rules (keys.py), argument checks (base.py) and the
``ETHA_KV_*`` environment contract (config.py). No server is needed here."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from etha.kvstore import (
    ConfigurationError,
    EtcdConfig,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidValueError,
    KVStoreError,
    TCPStoreConfig,
    keys,
    parse_env,
)
from etha.kvstore import config as cfg
from etha.kvstore.base import (
    MAX_EXPECTED_COUNT,
    KVStore,
    check_bytes_value,
    check_expected_count,
    check_str_value,
    check_timeout,
)
from etha.kvstore.config import Endpoint, parse_endpoints

NAME_CHARS = string.ascii_letters + string.digits + "._:-"
SEGMENT_CHARS = string.ascii_letters + string.digits + "._:=@+,~%-"

names = st.text(NAME_CHARS, min_size=1, max_size=keys.MAX_NAME_LENGTH).filter(
    lambda n: n not in (".", "..")
)
segments = st.text(SEGMENT_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
valid_keys = st.lists(segments, min_size=1, max_size=8).map("/".join)
# Text that often looks like a key: the allowed characters plus everything that is not.
keyish = st.text(SEGMENT_CHARS + "/*. \t\n\x00ü&'()#?[]\\", max_size=40)


def _accepted_unchanged(validate: Callable[[str], str], value: str) -> bool:
    """False if ``validate`` rejects ``value``; if it accepts it, it returns it unchanged."""
    try:
        result = validate(value)
    except InvalidKeyError:
        return False
    assert result == value
    return True


def _segments_ok(value: str) -> bool:
    return all(seg and seg not in (".", "..") for seg in value.split("/"))


# -- keys: properties ---------------------------------------------------------------------------


@given(st.one_of(keyish, st.text(max_size=40)))
@example("a/../b")
@example("a//b")
@example("/a")
@example("a*")
@example("a-b")
def test_a_valid_key_is_returned_unchanged_and_is_safe(value: str) -> None:
    if not _accepted_unchanged(keys.validate_key, value):
        return
    assert "*" not in value
    assert _segments_ok(value)
    assert 1 <= len(value) <= keys.MAX_KEY_LENGTH
    assert set(value) <= set(SEGMENT_CHARS + "/")


@given(valid_keys)
def test_keys_built_from_allowed_segments_are_accepted(key: str) -> None:
    assume(len(key) <= keys.MAX_KEY_LENGTH)
    assert keys.validate_key(key) == key
    assert keys.validate_pattern(key) == key  # every key is also a (literal) pattern
    assert keys.compile_pattern(key).fullmatch(key)


@given(names, names, valid_keys)
def test_full_keys_stay_inside_the_namespace_and_split_back(ns: str, comp: str, key: str) -> None:
    full = keys.full_key(keys.validate_name(ns, "namespace"), comp, key)
    assert full.startswith(keys.namespace_prefix(ns))
    assert full.startswith(keys.component_prefix(ns, comp))
    assert full.split("/", 2) == [ns, comp, key]  # injective: the parts come back


@given(st.one_of(keyish, st.text(max_size=40)))
@example("a-b*")
@example("a(b*")
def test_a_valid_pattern_has_only_allowed_characters(value: str) -> None:
    if not _accepted_unchanged(keys.validate_pattern, value):
        return
    assert _segments_ok(value)
    assert set(value) <= set(SEGMENT_CHARS + "/*")


@given(
    st.lists(st.text(SEGMENT_CHARS + "/", max_size=8), min_size=2, max_size=5),
    st.data(),
)
def test_star_matches_any_text_including_slashes(parts: list[str], data: st.DataObject) -> None:
    pattern = "*".join(parts)
    assume(_segments_ok(pattern.replace("*", "x")) and pattern)
    assume(len(pattern) <= keys.MAX_KEY_LENGTH)
    keys.validate_pattern(pattern)
    fillers = [data.draw(st.text(SEGMENT_CHARS + "/", max_size=10)) for _ in parts[1:]]
    candidate = parts[0] + "".join(f + p for f, p in zip(fillers, parts[1:], strict=True))
    assert keys.compile_pattern(pattern).fullmatch(candidate)
    assert candidate.startswith(keys.literal_prefix(pattern))


@given(valid_keys, valid_keys)
def test_a_literal_pattern_matches_only_itself(a: str, b: str) -> None:
    assert bool(keys.compile_pattern(a).fullmatch(b)) == (a == b)


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text()), st.floats()))
def test_non_strings_are_invalid_keys_not_crashes(value: Any) -> None:
    for check in (keys.validate_key, keys.validate_pattern):
        with pytest.raises(InvalidKeyError):
            check(value)
    with pytest.raises(InvalidKeyError):
        keys.validate_name(value, "namespace")


@given(st.one_of(st.text(NAME_CHARS + "/* ", max_size=140), st.text(max_size=10)))
def test_names_never_contain_a_slash_or_star(value: str) -> None:
    try:
        keys.validate_name(value, "component")
    except InvalidKeyError as exc:
        assert "component" in str(exc)
        return
    assert "/" not in value and "*" not in value
    assert value not in (".", "..")
    assert 1 <= len(value) <= keys.MAX_NAME_LENGTH


# -- keys: examples -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        ("a//b", "empty segment"),
        ("/a", "empty segment"),
        ("a/", "empty segment"),
        ("a/../b", "'..' segment"),
        ("./a", "'.' segment"),
        ("a*b", "'*'"),
        ("a b", "invalid segment"),
        ("x" * 1025, "limit is 1024"),
    ],
)
def test_invalid_key_messages_say_what_is_wrong(value: str, fragment: str) -> None:
    with pytest.raises(InvalidKeyError, match=re.escape(fragment)):
        keys.validate_key(value)


def test_limits_are_inclusive() -> None:
    assert keys.validate_key("k" * keys.MAX_KEY_LENGTH)
    assert keys.validate_name("n" * keys.MAX_NAME_LENGTH, "namespace")
    with pytest.raises(InvalidKeyError):
        keys.validate_name("n" * (keys.MAX_NAME_LENGTH + 1), "namespace")


def test_pattern_charset_has_no_accidental_range() -> None:
    # A "%-*" range once slipped in: '-' was refused and '&', "'", '(' and ')' accepted.
    assert keys.validate_pattern("pair:a-b/rank:*/ready")
    for bad in ("a&*", "a'*", "a(*", "a)*"):
        with pytest.raises(InvalidKeyError):
            keys.validate_pattern(bad)


def test_invalid_key_error_is_a_value_error() -> None:
    assert issubclass(InvalidKeyError, ValueError)
    assert issubclass(InvalidKeyError, KVStoreError)
    assert issubclass(ConfigurationError, ValueError)


# -- base.py checks -------------------------------------------------------------------------------


class _Bare(KVStore):
    """The smallest concrete KVStore: only the shared helpers of the ABC are exercised."""

    def close(self, cleanup: bool = True) -> None: ...
    def delete(self, key: str, *, component: str | None = None) -> bool:
        raise NotImplementedError

    def exists(self, key: str, *, component: str | None = None) -> bool:
        raise NotImplementedError

    def get(self, key: str, *, component: str | None = None) -> bytes | None:
        raise NotImplementedError

    def get_bytes(self, key: str, *, component: str | None = None) -> bytes | None:
        raise NotImplementedError

    def set(self, key: str, value: str, *, component: str | None = None) -> None:
        raise NotImplementedError

    def set_bytes(self, key: str, data: bytes, *, component: str | None = None) -> None:
        raise NotImplementedError

    def wait_for_key(
        self, key: str, timeout: float = 3600.0, *, component: str | None = None
    ) -> bytes:
        raise NotImplementedError

    def wait_for_keys(
        self,
        key_pattern: str,
        expected_count: int,
        value: str = "1",
        timeout: float = 3600.0,
        candidate_keys: list[str] | None = None,
        *,
        component: str | None = None,
    ) -> list[str]:
        raise NotImplementedError

    def wait_for_value(
        self, key: str, expected: str, timeout: float = 3600.0, *, component: str | None = None
    ) -> bytes:
        raise NotImplementedError


def _documented_abstract_methods() -> set[str]:
    """The methods docs/api/etha.kvstore.base.rst marks ``:abstractmethod:``."""
    text = (Path(__file__).resolve().parents[1] / "docs/api/etha.kvstore.base.rst").read_text()
    methods = re.findall(r"\.\. py:method:: (\w+)\(.*\n((?:\s+:\w+:.*\n)*)", text)
    return {name for name, options in methods if ":abstractmethod:" in options}


def test_the_kvstore_abc_is_exactly_the_documented_interface() -> None:
    """A store written elsewhere implements the documented abstract methods, no more."""
    assert KVStore.__abstractmethods__ == _documented_abstract_methods()
    assert "wait_for_keys" in KVStore.__abstractmethods__
    _Bare("job-1", "trainer")  # the documented methods suffice to instantiate


def test_base_builds_full_keys_with_component_override() -> None:
    store = _Bare("job-1", "trainer")
    assert store._full_key("rank:0/ready", None) == "job-1/trainer/rank:0/ready"
    assert store._full_key("x", "eval") == "job-1/eval/x"
    prefix, regex = store._full_pattern("rank:*/ready", None)
    assert prefix == "job-1/trainer/"
    assert regex.fullmatch("rank:3/ready")
    assert not regex.fullmatch("rank:3/ready/x")
    with pytest.raises(InvalidKeyError, match="component"):
        store._full_key("x", "a/b")
    with pytest.raises(InvalidKeyError, match="namespace"):
        _Bare("a/b", "c")
    with pytest.raises(InvalidKeyError, match="component"):
        _Bare("a", "")


@pytest.mark.parametrize("good", [0, 0.0, 1, 2.5, 3600, 10**6])
def test_check_timeout_accepts_finite_non_negative_numbers(good: float) -> None:
    assert check_timeout(good) == float(good)


@pytest.mark.parametrize("bad", [-1, -1e-9, math.nan, math.inf, -math.inf, True, False, "1", None])
def test_check_timeout_rejects(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="timeout"):
        check_timeout(bad)


@pytest.mark.parametrize("good", [1, 2, MAX_EXPECTED_COUNT])
def test_check_expected_count_accepts(good: int) -> None:
    assert check_expected_count(good) == good


@pytest.mark.parametrize("bad", [0, -1, MAX_EXPECTED_COUNT + 1, True, 1.0, "1", None])
def test_check_expected_count_rejects(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="expected_count"):
        check_expected_count(bad)


@given(st.text())
def test_check_str_value_encodes_any_encodable_text(text: str) -> None:
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(InvalidValueError, match="UTF-8"):
            check_str_value(text)
        return
    assert check_str_value(text) == encoded


def test_check_str_value_rejects_non_text() -> None:
    for bad in (b"x", 1, None, bytearray(b"x")):
        with pytest.raises(InvalidValueError, match="set_bytes"):
            check_str_value(bad)
    with pytest.raises(InvalidValueError, match="UTF-8"):
        check_str_value("\udcff")


def test_check_bytes_value() -> None:
    assert check_bytes_value(b"\x00") == b"\x00"
    assert check_bytes_value(bytearray(b"ab")) == b"ab"
    assert check_bytes_value(memoryview(b"cd")) == b"cd"
    for bad in ("text", 1, None, [1, 2]):
        with pytest.raises(InvalidValueError, match="bytes"):
            check_bytes_value(bad)


# -- config: parse_env --------------------------------------------------------------------------

BASE_ETCD = {"ETHA_KV_NAMESPACE": "job-1", "ETHA_KV_ENDPOINTS": "127.0.0.1:2379"}
BASE_TCP = {
    "ETHA_KV_BACKEND": "tcpstore",
    "ETHA_KV_NAMESPACE": "job-1",
    "ETHA_KV_TCPSTORE_HOST": "10.0.0.1",
    "ETHA_KV_TCPSTORE_PORT": "29500",
    "ETHA_KV_TCPSTORE_IS_SERVER": "false",
}


def test_minimal_etcd_environment() -> None:
    config = parse_env(BASE_ETCD)
    assert config == EtcdConfig(namespace="job-1", endpoints=(Endpoint("127.0.0.1", 2379),))
    assert config.component == "default"
    assert config.timeout == 10.0
    assert config.tls is False


def test_full_etcd_environment(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem"))
    for path in (ca, cert, key):
        path.write_text("x")
    config = parse_env(
        {
            "ETHA_KV_BACKEND": " ETCD ",
            "ETHA_KV_NAMESPACE": "job-1",
            "ETHA_KV_COMPONENT": "trainer",
            "ETHA_KV_ENDPOINTS": "https://a:1, https://[::1]:2",
            "ETHA_KV_USERNAME": "u",
            "ETHA_KV_PASSWORD": " pass word ",
            "ETHA_KV_CA_FILE": str(ca),
            "ETHA_KV_CERT_FILE": str(cert),
            "ETHA_KV_KEY_FILE": str(key),
            "ETHA_KV_TIMEOUT": "2.5",
        }
    )
    assert isinstance(config, EtcdConfig)
    assert config.endpoints == (Endpoint("a", 1), Endpoint("::1", 2))
    assert config.password == " pass word "  # passwords are taken verbatim
    assert config.tls is True
    assert (config.component, config.timeout) == ("trainer", 2.5)
    assert "pass word" not in repr(config)


def test_ca_pem_turns_tls_on() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    config = parse_env({**BASE_ETCD, "ETHA_KV_CA_PEM": pem})
    assert isinstance(config, EtcdConfig)
    assert config.tls is True
    assert config.ca_pem is not None and config.ca_pem.strip() == pem.strip()
    assert pem not in repr(config)


def test_tcpstore_environment_and_torchrun_fallbacks() -> None:
    config = parse_env(BASE_TCP)
    assert config == TCPStoreConfig(namespace="job-1", host="10.0.0.1", port=29500, is_server=False)
    torchrun = parse_env(
        {
            "ETHA_KV_BACKEND": "tcpstore",
            "ETHA_KV_NAMESPACE": "job-1",
            "MASTER_ADDR": "master",
            "MASTER_PORT": "1234",
            "RANK": "0",
            "WORLD_SIZE": "8",
        }
    )
    assert torchrun == TCPStoreConfig(
        namespace="job-1", host="master", port=1234, is_server=True, world_size=8
    )
    explicit = parse_env({**BASE_TCP, "ETHA_KV_TCPSTORE_WORLD_SIZE": "4", "WORLD_SIZE": "8"})
    assert isinstance(explicit, TCPStoreConfig) and explicit.world_size == 4
    for raw, expected in [("1", True), ("TRUE", True), ("yes", True), ("off", False)]:
        parsed = parse_env({**BASE_TCP, "ETHA_KV_TCPSTORE_IS_SERVER": raw})
        assert isinstance(parsed, TCPStoreConfig) and parsed.is_server is expected


def test_empty_variables_count_as_unset() -> None:
    config = parse_env({**BASE_ETCD, "ETHA_KV_COMPONENT": "", "ETHA_KV_TIMEOUT": "  "})
    assert (config.component, config.timeout) == ("default", 10.0)


def test_parse_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in cfg.ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in BASE_TCP.items():
        monkeypatch.setenv(name, value)
    assert isinstance(parse_env(), TCPStoreConfig)


def _missing_file(tmp_path: Path) -> str:
    return str(tmp_path / "does-not-exist.pem")


def _bad_values(
    variable: str, values: dict[str, str], base: dict[str, str] = BASE_ETCD
) -> list[tuple[str, dict[str, str], str]]:
    """Error cases: ``base`` with ``variable`` set to each (labelled) bad value."""
    return [(label, {**base, variable: value}, variable) for label, value in values.items()]


# Every documented error: (environment, the variable the message must name).
ERROR_CASES: list[tuple[str, dict[str, str], str]] = [
    ("no namespace", {"ETHA_KV_ENDPOINTS": "a:1"}, "ETHA_KV_NAMESPACE"),
    *_bad_values("ETHA_KV_NAMESPACE", {"bad namespace": "a/b"}),
    *_bad_values("ETHA_KV_COMPONENT", {"bad component": "x*"}),
    *_bad_values("ETHA_KV_BACKEND", {"bad backend": "redis"}),
    *_bad_values(
        "ETHA_KV_TIMEOUT",
        {"bad timeout": "soon", "zero timeout": "0", "nan timeout": "nan", "inf timeout": "inf"},
    ),
    ("no endpoints", {"ETHA_KV_NAMESPACE": "n"}, "ETHA_KV_ENDPOINTS"),
    *_bad_values(
        "ETHA_KV_ENDPOINTS",
        {
            "empty endpoint": "a:1,,b:2",
            "no port": "a",
            "bad port": "a:99999",
            "bad scheme": "grpc://a:1",
            "path": "http://a:1/v3",
            "mixed schemes": "http://a:1,https://b:2",
        },
    ),
    ("user no password", {**BASE_ETCD, "ETHA_KV_USERNAME": "u"}, "ETHA_KV_PASSWORD"),
    ("password no user", {**BASE_ETCD, "ETHA_KV_PASSWORD": "p"}, "ETHA_KV_USERNAME"),
    (
        "ca pem not pem",
        {**BASE_ETCD, "ETHA_KV_CA_PEM": "not a certificate"},
        "ETHA_KV_CA_PEM",
    ),
    ("tcpstore var on etcd", {**BASE_ETCD, "ETHA_KV_TCPSTORE_PORT": "1"}, "ETHA_KV_TCPSTORE_PORT"),
    ("etcd var on tcpstore", {**BASE_TCP, "ETHA_KV_ENDPOINTS": "a:1"}, "ETHA_KV_ENDPOINTS"),
    ("password on tcpstore", {**BASE_TCP, "ETHA_KV_PASSWORD": "p"}, "ETHA_KV_PASSWORD"),
    (
        "no host",
        {k: v for k, v in BASE_TCP.items() if k != "ETHA_KV_TCPSTORE_HOST"},
        "ETHA_KV_TCPSTORE_HOST",
    ),
    (
        "no port",
        {k: v for k, v in BASE_TCP.items() if k != "ETHA_KV_TCPSTORE_PORT"},
        "ETHA_KV_TCPSTORE_PORT",
    ),
    ("bad tcp port", {**BASE_TCP, "ETHA_KV_TCPSTORE_PORT": "http"}, "ETHA_KV_TCPSTORE_PORT"),
    ("tcp port 0", {**BASE_TCP, "ETHA_KV_TCPSTORE_PORT": "0"}, "ETHA_KV_TCPSTORE_PORT"),
    (
        "bad master port",
        {k: v for k, v in BASE_TCP.items() if k != "ETHA_KV_TCPSTORE_PORT"} | {"MASTER_PORT": "x"},
        "MASTER_PORT",
    ),
    ("bad is_server", {**BASE_TCP, "ETHA_KV_TCPSTORE_IS_SERVER": "maybe"}, "IS_SERVER"),
    (
        "no is_server nor rank",
        {k: v for k, v in BASE_TCP.items() if k != "ETHA_KV_TCPSTORE_IS_SERVER"},
        "ETHA_KV_TCPSTORE_IS_SERVER",
    ),
    (
        "bad rank",
        {k: v for k, v in BASE_TCP.items() if k != "ETHA_KV_TCPSTORE_IS_SERVER"} | {"RANK": "a"},
        "RANK",
    ),
    ("bad world", {**BASE_TCP, "ETHA_KV_TCPSTORE_WORLD_SIZE": "x"}, "ETHA_KV_TCPSTORE_WORLD_SIZE"),
    ("zero world", {**BASE_TCP, "ETHA_KV_TCPSTORE_WORLD_SIZE": "0"}, "ETHA_KV_TCPSTORE_WORLD_SIZE"),
    ("bad WORLD_SIZE", {**BASE_TCP, "WORLD_SIZE": "-2"}, "WORLD_SIZE"),
]


@pytest.mark.parametrize(
    ("env", "variable"),
    [(env, var) for _, env, var in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_every_configuration_error_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_env(env)
    assert variable in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["ETHA_KV_CA_FILE", "ETHA_KV_CERT_FILE", "ETHA_KV_KEY_FILE"])
def test_missing_files_are_named(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigurationError, match=name) as info:
        parse_env({**BASE_ETCD, name: _missing_file(tmp_path)})
    assert "no such file" in str(info.value)


def test_cert_and_key_go_together(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigurationError, match="ETHA_KV_KEY_FILE"):
        parse_env({**BASE_ETCD, "ETHA_KV_CERT_FILE": str(cert)})
    with pytest.raises(ConfigurationError, match="ETHA_KV_CERT_FILE"):
        parse_env({**BASE_ETCD, "ETHA_KV_KEY_FILE": str(cert)})


def test_tls_files_with_http_endpoints_are_a_contradiction(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigurationError, match="ETHA_KV_ENDPOINTS"):
        parse_env({**BASE_ETCD, "ETHA_KV_ENDPOINTS": "http://a:1", "ETHA_KV_CA_FILE": str(ca)})
    with pytest.raises(ConfigurationError, match="ETHA_KV_CA_FILE"):
        parse_env(
            {
                **BASE_ETCD,
                "ETHA_KV_CA_FILE": str(ca),
                "ETHA_KV_CA_PEM": "-----BEGIN CERTIFICATE-----",
            }
        )


def test_secrets_never_appear_in_errors() -> None:
    secret = "s3cr3t-Value"
    for env in (
        {**BASE_ETCD, "ETHA_KV_PASSWORD": secret},  # no username
        {**BASE_TCP, "ETHA_KV_PASSWORD": secret},  # wrong backend
    ):
        with pytest.raises(ConfigurationError) as info:
            parse_env(env)
        assert secret not in str(info.value)
    assert cfg.SECRET_VARIABLES <= cfg.ALL_VARIABLES
    assert all(name.startswith(cfg.PREFIX) for name in cfg.ALL_VARIABLES)


# -- config: round trips --------------------------------------------------------------------------

hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    st.ip_addresses().map(str),
)
ports = st.integers(1, 65535)
timeouts = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)


def assert_env_round_trips(config: EtcdConfig | TCPStoreConfig) -> None:
    """``config`` written to variables (only known ones) and read back is ``config``."""
    env = config.to_env()
    assert set(env) <= cfg.ALL_VARIABLES
    assert parse_env(env) == config


@settings(max_examples=200)
@given(
    names,
    names,
    st.lists(st.builds(Endpoint, hosts, ports), min_size=1, max_size=4).map(tuple),
    st.booleans(),
    st.one_of(st.none(), st.tuples(st.text(NAME_CHARS, min_size=1), st.text(min_size=1))),
    timeouts,
)
def test_etcd_config_to_env_round_trips(
    ns: str,
    comp: str,
    endpoints: tuple[Endpoint, ...],
    tls: bool,
    creds: tuple[str, str] | None,
    timeout: float,
) -> None:
    username, password = creds if creds else (None, None)
    assume(password is None or password != "")
    assert_env_round_trips(
        EtcdConfig(ns, endpoints, comp, username, password, tls=tls, timeout=timeout)
    )


@settings(max_examples=200)
@given(
    names, names, hosts, ports, st.booleans(), st.one_of(st.none(), st.integers(1, 10**6)), timeouts
)
def test_tcpstore_config_to_env_round_trips(
    ns: str, comp: str, host: str, port: int, is_server: bool, world: int | None, timeout: float
) -> None:
    assert_env_round_trips(
        TCPStoreConfig(ns, host, port, is_server, component=comp, world_size=world, timeout=timeout)
    )


@given(st.lists(st.builds(Endpoint, hosts, ports), min_size=1, max_size=4))
def test_parse_endpoints_reads_what_endpoint_str_writes(endpoints: list[Endpoint]) -> None:
    raw = ",".join(str(ep) for ep in endpoints)
    assert parse_endpoints(raw) == (tuple(endpoints), None)
    assert parse_endpoints(",".join(f"https://{ep}" for ep in endpoints)) == (
        tuple(endpoints),
        True,
    )
