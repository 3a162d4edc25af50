"""The tenant registry's contract: where records live in etcd and what they hold.

The operator writes one :class:`TenantRecord` per KVNamespace; every gateway replica
watches :data:`REGISTRY_PREFIX` and keeps the records in memory. Deleting a record
revokes the tenant at once: its tokens stop working on every replica (a token names the
record's ``mod_revision``, so rotating the secret also retires the old tokens).

Why etcd and not the Kubernetes API: the gateway then needs nothing but etcd (no
Kubernetes credentials, no RBAC to read Secrets), the registry is as available as the
data it guards, and a replica sees a revocation through the same watch machinery it
already runs. The prefix starts with ``!`` (0x21). A ``keyPrefix`` is made of
``[A-Za-z0-9._:-]``, whose smallest byte is ``-`` (0x2d), so every tenant range
``[<prefix>/, <prefix>0)`` lies inside :data:`TENANT_KEYSPACE` and the registry lies
outside it: the gateway's own etcd role can be read-write on the tenants' keys and
read-only on the registry.

Secrets are 256-bit random values made by the operator. Because they cannot be guessed,
a fast hash (SHA-256) is as strong as bcrypt here, and log-ins cost microseconds, not a
bcrypt round. Only the hash is stored; :func:`secret_matches` compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from etha.kvstore.errors import ConfigurationError
from etha.kvstore.keys import validate_name

#: Every tenant range lies in ``[TENANT_KEYSPACE[0], TENANT_KEYSPACE[1])``.
TENANT_KEYSPACE = (b"-", b"\x7f")
#: Every registry key starts with this; no tenant prefix can reach it (see above).
REGISTRY_PREFIX = b"!etha/registry/"
#: Tenant records: ``!etha/registry/tenants/<username>``.
TENANTS_PREFIX = REGISTRY_PREFIX + b"tenants/"
#: Record format version; a replica ignores (and reports) records it does not understand.
RECORD_VERSION = 1
#: Bytes of randomness in an operator-made secret.
SECRET_BYTES = 32

#: Quota names, as they appear in records, settings, errors and metric labels.
QUOTA_NAMES = ("bytes", "keys", "value_bytes", "watches", "requests_per_second")


def new_secret() -> str:
    """A fresh 256-bit secret, URL-safe text (what goes into ``ETHA_KV_PASSWORD``)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    """The stored form of a secret: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_sha256: str) -> bool:
    """Constant-time check of ``secret`` against a stored :func:`hash_secret`."""
    return hmac.compare_digest(hash_secret(secret).encode(), secret_sha256.encode())


def tenant_key(username: str) -> bytes:
    """The registry key of a tenant's record."""
    return TENANTS_PREFIX + validate_name(username, "tenant username").encode()


def tenant_range(prefix: str) -> tuple[bytes, bytes]:
    """The etcd range ``[<prefix>/, <prefix>0)`` a tenant may touch (``0`` follows ``/``)."""
    validate_name(prefix, "tenant key prefix")
    return f"{prefix}/".encode(), f"{prefix}0".encode()


@dataclass(frozen=True)
class TenantRecord:
    """One tenant: who may log in, which prefix they reach, and their quota overrides.

    :param username: the log-in name (``ETHA_KV_USERNAME``)
    :param prefix: the etha namespace, i.e. the key prefix without its trailing ``/``
    :param secret_sha256: :func:`hash_secret` of the tenant's secret
    :param quotas: overrides of the gateway's default quotas, by :data:`QUOTA_NAMES`;
        a missing name takes the default, ``0`` means unlimited
    :param owner: a human-readable owner (``<namespace>/<name>`` of the KVNamespace),
        for logs and metrics; not used for authorisation
    """

    username: str
    prefix: str
    secret_sha256: str = field(repr=False)
    quotas: Mapping[str, int] = field(default_factory=dict)
    owner: str = ""

    def __post_init__(self) -> None:
        validate_name(self.username, "tenant username")
        validate_name(self.prefix, "tenant key prefix")
        if len(self.secret_sha256) != 64 or any(
            c not in "0123456789abcdef" for c in self.secret_sha256
        ):
            raise ConfigurationError("secret_sha256 must be 64 lowercase hex digits")
        for name, value in self.quotas.items():
            if name not in QUOTA_NAMES:
                raise ConfigurationError(
                    f"unknown quota {name!r}; known quotas are {', '.join(QUOTA_NAMES)}"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(
                    f"quota {name!r} must be a non-negative integer (0 = unlimited), got {value!r}"
                )

    @property
    def key(self) -> bytes:
        return tenant_key(self.username)

    @property
    def range(self) -> tuple[bytes, bytes]:
        return tenant_range(self.prefix)

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "version": RECORD_VERSION,
            "username": self.username,
            "prefix": self.prefix,
            "secret_sha256": self.secret_sha256,
            "quotas": dict(self.quotas),
            "owner": self.owner,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> TenantRecord:
        """Parse a stored record.

        :raises ConfigurationError: not a record of :data:`RECORD_VERSION`, or invalid
        """
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"tenant record is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("version") != RECORD_VERSION:
            version = body.get("version") if isinstance(body, dict) else None
            raise ConfigurationError(
                f"tenant record has version {version!r};"
                f" this gateway reads version {RECORD_VERSION}: upgrade the gateway"
            )
        try:
            return cls(
                username=body["username"],
                prefix=body["prefix"],
                secret_sha256=body["secret_sha256"],
                quotas=dict(body.get("quotas") or {}),
                owner=str(body.get("owner", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigurationError(f"tenant record lacks field {exc}") from None


__all__ = [
    "QUOTA_NAMES",
    "RECORD_VERSION",
    "REGISTRY_PREFIX",
    "SECRET_BYTES",
    "TENANTS_PREFIX",
    "TENANT_KEYSPACE",
    "TenantRecord",
    "hash_secret",
    "new_secret",
    "secret_matches",
    "tenant_key",
    "tenant_range",
]
