"""Tokens: issued by one replica, verified by any replica with the keys; forgeries fail."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from etha.gateway.tokens import InvalidToken, TokenSigner, load_keys
from etha.kvstore.errors import ConfigurationError

KEY_A = b"a" * 32
KEY_B = b"b" * 40


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_round_trip_names_user_revision_and_expiry() -> None:
    clock = Clock()
    signer = TokenSigner([KEY_A], ttl=600, clock=clock)
    claims = signer.verify(signer.issue("etha-u1", 42))
    assert (claims.username, claims.revision, claims.expires) == ("etha-u1", 42, 1_000_600)


def test_another_replica_with_the_same_keys_verifies() -> None:
    token = TokenSigner([KEY_A]).issue("u", 1)
    assert TokenSigner([KEY_A]).verify(token).username == "u"


def test_expired_token_is_refused() -> None:
    clock = Clock()
    signer = TokenSigner([KEY_A], ttl=10, clock=clock)
    token = signer.issue("u", 1)
    clock.now += 9
    signer.verify(token)
    clock.now += 1
    with pytest.raises(InvalidToken) as err:
        signer.verify(token)
    assert err.value.reason == "expired"


def test_wrong_key_is_refused() -> None:
    token = TokenSigner([KEY_A]).issue("u", 1)
    with pytest.raises(InvalidToken) as err:
        TokenSigner([KEY_B]).verify(token)
    assert err.value.reason == "bad_signature"


def test_rotation_first_key_signs_all_keys_verify() -> None:
    old = TokenSigner([KEY_A]).issue("u", 1)
    rotated = TokenSigner([KEY_B, KEY_A])
    assert rotated.verify(old).username == "u"
    new = rotated.issue("u", 1)
    with pytest.raises(InvalidToken):
        TokenSigner([KEY_A]).verify(new)  # signed with B, the new first key


def _parts(token: str) -> list[str]:
    return token.split(".")


def _payload(token: str) -> dict[str, object]:
    raw = _parts(token)[1]
    result: dict[str, object] = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    return result


def _encode(body: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()


def test_forged_payload_with_the_original_signature_is_refused() -> None:
    signer = TokenSigner([KEY_A])
    token = signer.issue("tenant-a", 7)
    body = _payload(token)
    body["u"] = "tenant-b"  # claim to be another tenant
    version, _, signature = _parts(token)
    with pytest.raises(InvalidToken) as err:
        signer.verify(f"{version}.{_encode(body)}.{signature}")
    assert err.value.reason == "bad_signature"
    body = _payload(token)
    body["exp"] = int(body["exp"]) + 10**6  # type: ignore[call-overload]
    with pytest.raises(InvalidToken):
        signer.verify(f"{version}.{_encode(body)}.{signature}")


def test_other_tenants_token_names_the_other_tenant() -> None:
    # The server compares the claims with the record; a token is never "any tenant".
    signer = TokenSigner([KEY_A])
    assert signer.verify(signer.issue("tenant-a", 3)).username == "tenant-a"
    assert signer.verify(signer.issue("tenant-b", 3)).username == "tenant-b"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],  # truncated signature
        lambda t: t[: len(t) // 2],  # truncated anywhere
        lambda t: t.rsplit(".", 1)[0],  # no signature
        lambda t: "etha2" + t[5:],  # other version
        lambda t: t + ".x",  # extra part
        lambda t: "",  # empty
        lambda t: t.replace(".", ".=", 1),  # padding
        lambda t: t + "A" * 2000,  # oversized
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # flipped bits
    ],
)
def test_mangled_tokens_are_refused(mangle: object) -> None:
    signer = TokenSigner([KEY_A])
    token = signer.issue("u", 1)
    with pytest.raises(InvalidToken):
        signer.verify(mangle(token))  # type: ignore[operator]


def test_signed_garbage_payload_is_malformed() -> None:
    # Only someone with the key could make this; it must still not crash the verifier.
    import hashlib
    import hmac

    payload = base64.urlsafe_b64encode(b'{"u": 1, "r": "x"}').rstrip(b"=").decode()
    signed = f"etha1.{payload}"
    mac = hmac.new(KEY_A, signed.encode(), hashlib.sha256).digest()
    token = f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(InvalidToken) as err:
        TokenSigner([KEY_A]).verify(token)
    assert err.value.reason == "malformed"


def test_key_file_first_line_signs(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026\n{KEY_B.decode()}\n\n{KEY_A.decode()}\n")
    keys = load_keys(str(path))
    assert keys == [KEY_B, KEY_A]


def test_key_file_errors_name_the_variable_not_the_key(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort-secret\n")
    with pytest.raises(ConfigurationError, match="ETHA_GATEWAY_TOKEN_KEY_FILE") as err:
        load_keys(str(short))
    assert "tooshort-secret" not in str(err.value)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigurationError, match="no key"):
        load_keys(str(empty))
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_keys(str(tmp_path / "missing"))
