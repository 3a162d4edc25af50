"""The one exception hierarchy of :mod:`etha.kvstore`.

Every error the library raises derives from :class:`KVStoreError`. Where Python has a
built-in exception with the same meaning, the etha class also derives from it, so that
``except TimeoutError`` and ``except ValueError`` keep working as the API reference
(docs/api) promises.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every error raised by etha.kvstore.

    Errors made from a server's answer also carry ``code`` (the gRPC status name, e.g.
    ``"PERMISSION_DENIED"``), ``details`` (the server's message) and ``endpoint`` (the
    ``host:port`` that answered); they are None on errors raised before anything was sent.
    """

    code: str | None = None
    details: str | None = None
    endpoint: str | None = None


class InvalidArgumentError(KVStoreError, ValueError):
    """An argument was rejected before anything was sent to the server."""


class InvalidKeyError(InvalidArgumentError):
    """A namespace, component, key or pattern is not valid."""


class InvalidValueError(InvalidArgumentError):
    """A value has the wrong type, is not UTF-8, or is too large for the backend."""


class ConfigurationError(InvalidArgumentError):
    """The store configuration (for example the ``ETHA_KV_*`` environment) is wrong."""


class PermissionDeniedError(KVStoreError, PermissionError):
    """The server refused the operation: bad credentials or a key outside the grant."""


class UnavailableError(KVStoreError, ConnectionError):
    """No server could be reached, or the connection broke and could not be recovered."""


class KVTimeoutError(KVStoreError, TimeoutError):
    """A wait or a request did not complete within its timeout."""


class QuotaExceededError(KVStoreError):
    """A quota refused the write; nothing was changed.

    ``quota`` names the limit: one of the gateway's per-tenant quotas (``bytes``,
    ``keys``, ``value_bytes``, ``watches``, ``requests_per_second``) or ``etcd_space``
    (etcd's storage is, or is nearly, full). Branch on ``quota``, not on the message.
    """

    def __init__(self, message: str, *, quota: str) -> None:
        super().__init__(message)
        self.quota = quota


class NotFoundError(KVStoreError, LookupError):
    """The server has no such object (an etcd user, role or lease); nothing was changed."""


class AlreadyExistsError(KVStoreError):
    """The object to create (an etcd user or role) already exists; nothing was changed."""


class StoreClosedError(KVStoreError):
    """The store was used after :meth:`KVStore.close`."""


__all__ = [
    "AlreadyExistsError",
    "ConfigurationError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidValueError",
    "KVStoreError",
    "KVTimeoutError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "StoreClosedError",
    "UnavailableError",
]
