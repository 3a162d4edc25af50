"""KV Store abstraction - designed around etcd capabilities.

:class:`KVStore` is the interface documented in ``docs/api/etha.kvstore.base.rst``. Backends
implement the abstract methods; the concrete helpers here hold the rules that every
backend shares (key layout, validation, argument checks), so that both backends reject
the same inputs with the same errors.
"""

from __future__ import annotations

import abc
import math
import re
from types import TracebackType
from typing import NamedTuple

from etha.kvstore import keys as _keys
from etha.kvstore.errors import InvalidArgumentError, InvalidValueError

DEFAULT_WAIT_TIMEOUT = 3600.0
#: Upper bound for ``wait_for_keys(expected_count=...)``: far above any job's rank count,
#: low enough that a typo (``10**12``) is rejected instead of waiting for an hour.
MAX_EXPECTED_COUNT = 1_000_000


class KeysWait(NamedTuple):
    """A :meth:`KVStore.wait_for_keys` call with its arguments checked."""

    #: the component prefix ``{namespace}/{component}/``
    prefix: str
    #: the pattern as given, relative to the component
    pattern: str
    #: the compiled pattern, matching keys relative to the component
    regex: re.Pattern[str]
    #: keys needed, ``1..MAX_EXPECTED_COUNT``
    expected_count: int
    #: the value they must hold, encoded
    value: bytes
    #: seconds, finite and >= 0
    timeout: float
    #: as given (unchecked: only backends that poll need them)
    candidate_keys: list[str] | None


class KVStore(abc.ABC):
    """Abstract KV store interface.

    Key format: {namespace}/{component}/{key}

    :param namespace: Namespace for key isolation
    :param component: Default component name
    """

    namespace: str
    component: str

    def __init__(self, namespace: str, component: str) -> None:
        """Initialize KVStore.

        :param namespace: Namespace for key isolation
        :param component: Default component name
        :raises InvalidKeyError: if either name is invalid (see :mod:`etha.kvstore.keys`)
        """
        self.namespace = _keys.validate_name(namespace, "namespace")
        self.component = _keys.validate_name(component, "component")

    # -- the abstract interface (docs/api/etha.kvstore.base.rst) ------------------------

    @abc.abstractmethod
    def close(self, cleanup: bool = True) -> None:
        """Close the store and release resources.

        :param cleanup: If True, delete coordination keys (etcd only)

        With ``cleanup=True`` (the default, so also when a ``with`` block ends) the etcd
        backend deletes every key *this store object* wrote. A rank that leaves first
        would then delete a value that slower ranks still wait for: a store whose keys
        others read must close with ``cleanup=False`` and leave the clean-up to the
        operator's job-end deletion of the namespace.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, component: str | None = None) -> bool:
        """Delete a key.

        :returns: True if key was deleted, False if it didn't exist
        """

    @abc.abstractmethod
    def exists(self, key: str, *, component: str | None = None) -> bool:
        """Check if a key exists.

        :returns: True if key exists, False otherwise
        """

    @abc.abstractmethod
    def get(self, key: str, *, component: str | None = None) -> bytes | None:
        """Get value for a key.

        :returns: The value as bytes, or None if key doesn't exist
        """

    @abc.abstractmethod
    def get_bytes(self, key: str, *, component: str | None = None) -> bytes | None:
        """Retrieve binary data stored with :meth:`set_bytes`.

        etcd returns bytes directly; TCPStore decodes from base64.

        :returns: Binary data, or None if key doesn't exist
        """

    @abc.abstractmethod
    def set(self, key: str, value: str, *, component: str | None = None) -> None:
        """Set a key-value pair.

        :param value: The value to store (string)
        """

    @abc.abstractmethod
    def set_bytes(self, key: str, data: bytes, *, component: str | None = None) -> None:
        """Store binary data.

        etcd stores bytes directly; TCPStore encodes to base64.
        """

    @abc.abstractmethod
    def wait_for_key(
        self, key: str, timeout: float = DEFAULT_WAIT_TIMEOUT, *, component: str | None = None
    ) -> bytes:
        """Wait for a key to exist and return its value.

        etcd uses a watch; TCPStore polls.

        :returns: The value as bytes
        :raises TimeoutError: If timeout is reached before key exists
        """

    @abc.abstractmethod
    def wait_for_keys(
        self,
        key_pattern: str,
        expected_count: int,
        value: str = "1",
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        candidate_keys: list[str] | None = None,
        *,
        component: str | None = None,
    ) -> list[str]:
        """Wait until expected_count keys matching pattern have the specified value.

        Pattern syntax: ``*`` matches any sequence of characters, so
        ``"pair:foo/rank:*/ready"`` matches ``"pair:foo/rank:0/ready"``.

        etcd uses a watch plus a prefix query and ignores ``candidate_keys``; TCPStore
        polls ``candidate_keys``, which it requires.

        :returns: List of matched keys (relative to the component, sorted)
        :raises TimeoutError: If timeout is reached before expected_count keys are found
        """

    @abc.abstractmethod
    def wait_for_value(
        self,
        key: str,
        expected: str,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        *,
        component: str | None = None,
    ) -> bytes:
        """Wait for a key to have a specific value.

        :returns: The value as bytes when matched
        :raises TimeoutError: If timeout is reached before value matches
        """

    # -- shared helpers for backends ---------------------------------------------------

    def _component(self, component: str | None) -> str:
        if component is None:
            return self.component
        return _keys.validate_name(component, "component")

    def _full_key(self, key: str, component: str | None) -> str:
        """Validate ``key`` and return its stored form ``{namespace}/{component}/{key}``."""
        comp = self._component(component)
        return _keys.full_key(self.namespace, comp, _keys.validate_key(key))

    def _component_prefix(self, component: str | None) -> str:
        return _keys.component_prefix(self.namespace, self._component(component))

    def _full_pattern(self, key_pattern: str, component: str | None) -> tuple[str, re.Pattern[str]]:
        """Validate a pattern; return the component prefix and the compiled relative pattern."""
        pattern = _keys.validate_pattern(key_pattern)
        return self._component_prefix(component), _keys.compile_pattern(pattern)

    def __enter__(self) -> KVStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r}, component={self.component!r})"


def check_str_value(value: object, what: str = "value") -> bytes:
    """Encode a ``set`` value; only a str that is valid UTF-8 is accepted."""
    if not isinstance(value, str):
        raise InvalidValueError(
            f"{what} must be a str, got {type(value).__name__}; use set_bytes() for binary data"
        )
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidValueError(
            f"{what} is not valid UTF-8 text ({exc.reason} at index {exc.start});"
            " use set_bytes() for binary data"
        ) from None


def check_bytes_value(data: object) -> bytes:
    """Return ``data`` as bytes; bytes, bytearray and memoryview are accepted."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise InvalidValueError(f"data must be bytes, got {type(data).__name__}; use set() for text")


def check_timeout(timeout: object) -> float:
    """Return ``timeout`` as a float if it is a finite number of seconds >= 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"timeout must be a number of seconds, got {timeout!r}")
    value = float(timeout)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise InvalidArgumentError(
            f"timeout must be a finite number of seconds >= 0, got {timeout!r}"
        )
    return value


def check_expected_count(expected_count: object) -> int:
    """Return ``expected_count`` if it is an int in ``1..MAX_EXPECTED_COUNT``."""
    if isinstance(expected_count, bool) or not isinstance(expected_count, int):
        raise InvalidArgumentError(f"expected_count must be an int, got {expected_count!r}")
    if not 1 <= expected_count <= MAX_EXPECTED_COUNT:
        raise InvalidArgumentError(
            f"expected_count must be between 1 and {MAX_EXPECTED_COUNT}, got {expected_count}"
        )
    return expected_count


class CheckedWaitsKVStore(KVStore):
    """A :class:`KVStore` whose wait methods check their arguments in one place.

    etha's backends derive from it and implement only the waiting itself,
    :meth:`_wait_for_value` and :meth:`_wait_for_keys`. :class:`KVStore` stays the
    interface as documented, its wait methods abstract: a store written elsewhere
    derives from it directly.
    """

    def wait_for_key(
        self, key: str, timeout: float = DEFAULT_WAIT_TIMEOUT, *, component: str | None = None
    ) -> bytes:
        """See :meth:`KVStore.wait_for_key`."""
        return self._wait_for_value(self._full_key(key, component), None, check_timeout(timeout))

    def wait_for_keys(
        self,
        key_pattern: str,
        expected_count: int,
        value: str = "1",
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        candidate_keys: list[str] | None = None,
        *,
        component: str | None = None,
    ) -> list[str]:
        """See :meth:`KVStore.wait_for_keys`."""
        prefix, regex = self._full_pattern(key_pattern, component)
        wait = KeysWait(
            prefix=prefix,
            pattern=key_pattern,
            regex=regex,
            expected_count=check_expected_count(expected_count),
            value=check_str_value(value, "value"),
            timeout=check_timeout(timeout),
            candidate_keys=candidate_keys,
        )
        return self._wait_for_keys(wait)

    @abc.abstractmethod
    def _wait_for_keys(self, wait: KeysWait) -> list[str]:
        """:meth:`wait_for_keys` with its arguments checked (the backend's part)."""

    def wait_for_value(
        self,
        key: str,
        expected: str,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        *,
        component: str | None = None,
    ) -> bytes:
        """See :meth:`KVStore.wait_for_value`."""
        full = self._full_key(key, component)
        want = check_str_value(expected, "expected")
        return self._wait_for_value(full, want, check_timeout(timeout))

    @abc.abstractmethod
    def _wait_for_value(self, full_key: str, want: bytes | None, timeout: float) -> bytes:
        """Wait until ``full_key`` (checked) exists, or with ``want`` holds ``want``;
        return its value. The backend's part of :meth:`wait_for_key` and
        :meth:`wait_for_value`; ``timeout`` is checked.

        :raises KVTimeoutError: when ``timeout`` seconds pass first
        """
