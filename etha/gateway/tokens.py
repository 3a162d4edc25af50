"""HMAC-signed log-in tokens that any gateway replica can verify.

A token is ``etha1.<payload>.<signature>``: ``payload`` is the base64url (unpadded) JSON
``{"u": username, "r": record mod_revision, "exp": unix seconds}`` and ``signature``
the base64url HMAC-SHA256 of ``etha1.<payload>`` under a signing key. Replicas share
the keys through a file (one key per line): the first line signs, every line verifies,
so a key is rotated by adding the new one first, waiting one token lifetime, then
dropping the old one.

The token names the record's ``mod_revision``: the caller checks it against the record
it holds, so a deleted or rewritten record (a revocation, a new secret) retires every
token issued for it at once. This module is pure: no I/O except :func:`load_keys`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from etha.kvstore.errors import ConfigurationError, KVStoreError

VERSION = "etha1"
#: Shortest signing key accepted (characters of the key file's line).
MIN_KEY_LENGTH = 32
DEFAULT_TTL = 600.0
#: A token longer than this is refused before any parsing (usernames are <= 128 chars).
MAX_TOKEN_LENGTH = 1024
#: Verified tokens remembered (see :meth:`TokenSigner.verify`).
_CACHE_SIZE = 65536


class InvalidToken(KVStoreError):
    """The token is not one this gateway issued, or no longer valid.

    ``reason`` is a short label for metrics: ``malformed``, ``bad_signature`` or
    ``expired``. The message never contains the token.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says: who, which record revision, until when."""

    username: str
    revision: int
    expires: int


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or "=" in text:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_keys(path: str, variable: str = "ETHA_GATEWAY_TOKEN_KEY_FILE") -> list[bytes]:
    """The signing keys in ``path``: one per line, blank lines and ``#`` comments skipped.

    :raises ConfigurationError: unreadable, no key, or a key shorter than
        :data:`MIN_KEY_LENGTH` characters (naming ``variable`` and the line, never the key)
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{variable}={path!r}: cannot read the key file: {exc}") from None
    keys: list[bytes] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_KEY_LENGTH:
            raise ConfigurationError(
                f"{variable}={path!r}: the key on line {number} is {len(line)} characters;"
                f" use at least {MIN_KEY_LENGTH} random characters"
                " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        keys.append(line.encode())
    if not keys:
        raise ConfigurationError(f"{variable}={path!r} holds no key; put one key per line")
    return keys


class TokenSigner:
    """Issues tokens with the first key and verifies them with any key.

    :param keys: signing keys, newest first
    :param ttl: seconds a new token stays valid
    :param clock: the time source (seconds since the epoch), replaceable in tests
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ConfigurationError("a token signer needs at least one key")
        if not ttl > 0:
            raise ConfigurationError(f"token TTL must be positive, got {ttl}")
        self._keys = [hmac.new(k, digestmod=hashlib.sha256) for k in keys]
        self.ttl = float(ttl)
        self._clock = clock
        #: tokens verified before, by their exact text: a client sends the same token with
        #: every request, so the signature is checked once per token, not per request
        self._verified: dict[str, TokenClaims] = {}

    def _sign(self, index: int, message: bytes) -> bytes:
        mac = self._keys[index].copy()
        mac.update(message)
        return mac.digest()

    def issue(self, username: str, revision: int) -> str:
        """A token for ``username`` whose record has ``mod_revision`` ``revision``."""
        expires = int(self._clock() + self.ttl)
        # The same JSON as json.dumps of the dict, without building one per log-in.
        body = f'{{"u":{json.dumps(username)},"r":{int(revision)},"exp":{expires}}}'.encode()
        signed = f"{VERSION}.{_b64encode(body)}"
        return f"{signed}.{_b64encode(self._sign(0, signed.encode()))}"

    def verify(self, token: str) -> TokenClaims:
        """The claims of a valid, unexpired token signed with one of the keys.

        :raises InvalidToken: malformed, forged (no key's signature matches), or expired
        """
        claims = self._verified.get(token)
        if claims is not None:
            if claims.expires <= self._clock():
                del self._verified[token]
                raise InvalidToken("expired", "the token has expired; log in again")
            return claims
        claims = self._verify(token)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.clear()  # crude but bounded; a miss only costs one HMAC
        self._verified[token] = claims
        return claims

    def _verify(self, token: str) -> TokenClaims:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("malformed", "the token is too long to be one of ours")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise InvalidToken("malformed", f"the token is not an {VERSION} token")
        try:
            signature = _b64decode(parts[2])
        except (ValueError, binascii.Error):
            raise InvalidToken("malformed", "the token's signature is not base64url") from None
        signed = f"{parts[0]}.{parts[1]}".encode()
        # Every key is tried (no early exit on the first byte): compare_digest is
        # constant-time per key, and which key matched leaks nothing useful.
        matched = False
        for index in range(len(self._keys)):
            if hmac.compare_digest(self._sign(index, signed), signature):
                matched = True
        if not matched:
            raise InvalidToken("bad_signature", "the token's signature does not match")
        try:
            body = json.loads(_b64decode(parts[1]))
            username, revision, expires = body["u"], body["r"], body["exp"]
        except (ValueError, binascii.Error, KeyError, TypeError):
            raise InvalidToken("malformed", "the token's payload is not valid") from None
        if not isinstance(username, str) or type(revision) is not int or type(expires) is not int:
            raise InvalidToken("malformed", "the token's payload has wrong types")
        if expires <= self._clock():
            raise InvalidToken("expired", "the token has expired; log in again")
        return TokenClaims(username=username, revision=revision, expires=expires)


__all__ = [
    "DEFAULT_TTL",
    "MIN_KEY_LENGTH",
    "VERSION",
    "InvalidToken",
    "TokenClaims",
    "TokenSigner",
    "load_keys",
]
