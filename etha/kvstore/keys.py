"""Validation of namespaces, components, keys and patterns.

The full key of an entry is ``{namespace}/{component}/{key}``. The rules below make that
mapping injective and keep every key inside its namespace's prefix, which is what the
operator grants to a namespace's credentials:

* **namespace** and **component**: 1-128 characters from ``A-Z a-z 0-9 . _ - :``, not
  ``.`` or ``..``. They never contain ``/``, so they cannot reach another prefix.
* **key**: 1-1024 characters, one or more ``/``-separated segments. Each segment is
  non-empty, is not ``.`` or ``..``, and uses ``A-Z a-z 0-9 . _ - : = @ + , ~ %``.
  No leading or trailing ``/``, no ``//``, no ``*``, no whitespace or control
  characters.
* **pattern** (``wait_for_keys``): a key in which segments may also contain ``*``. A
  ``*`` matches any sequence of characters, ``/`` included (docs/api/etha.kvstore.base.rst).
"""

from __future__ import annotations

import re
from functools import lru_cache

from etha.kvstore.errors import InvalidKeyError

MAX_NAME_LENGTH = 128
MAX_KEY_LENGTH = 1024

_NAME_RE = re.compile(r"[A-Za-z0-9._:-]+")
_SEGMENT_CHARS = r"A-Za-z0-9._:=@+,~%-"
_SEGMENT_RE = re.compile(f"[{_SEGMENT_CHARS}]+")
# "*" goes first: after the trailing "-" of _SEGMENT_CHARS it would form a range "%-*".
_PATTERN_SEGMENT_RE = re.compile(f"[*{_SEGMENT_CHARS}]+")


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_text(value: object, what: str, limit: int) -> str:
    """Return ``value`` if it is a non-empty str of at most ``limit`` characters, else raise."""
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidKeyError(f"{what} must not be empty")
    if len(value) > limit:
        raise InvalidKeyError(
            f"{what} {_describe(value)} is {len(value)} characters; the limit is {limit}"
        )
    return value


def validate_name(value: object, what: str) -> str:
    """Return ``value`` if it is a valid namespace or component name, else raise."""
    value = _check_text(value, what, MAX_NAME_LENGTH)
    if value in (".", ".."):
        raise InvalidKeyError(f"{what} must not be {value!r}")
    if not _NAME_RE.fullmatch(value):
        raise InvalidKeyError(
            f"{what} {_describe(value)} is invalid: use only letters, digits and . _ - :"
            " (no '/', '*' or spaces)"
        )
    return value


def _validate_path(value: object, what: str, segment_re: re.Pattern[str], allowed: str) -> str:
    value = _check_text(value, what, MAX_KEY_LENGTH)
    for segment in value.split("/"):
        if not segment:
            shown = _describe(value)
            raise InvalidKeyError(
                f"{what} {shown} has an empty segment (leading, trailing or doubled '/')"
            )
        if segment in (".", ".."):
            shown = _describe(value)
            raise InvalidKeyError(
                f"{what} {shown} has a {segment!r} segment, which could escape its prefix"
            )
        if not segment_re.fullmatch(segment):
            raise InvalidKeyError(
                f"{what} {_describe(value)} has an invalid segment {_describe(segment)}:"
                f" use only {allowed}"
            )
    return value


def validate_key(value: object) -> str:
    """Return ``value`` if it is a valid key, else raise :class:`InvalidKeyError`."""
    if isinstance(value, str) and "*" in value:
        raise InvalidKeyError(
            f"key {_describe(value)} contains '*', which is only allowed in wait_for_keys patterns"
        )
    return _validate_path(value, "key", _SEGMENT_RE, "letters, digits, '/' and . _ - : = @ + , ~ %")


def validate_pattern(value: object) -> str:
    """Return ``value`` if it is a valid ``wait_for_keys`` pattern, else raise."""
    return _validate_path(
        value,
        "key pattern",
        _PATTERN_SEGMENT_RE,
        "letters, digits, '/', '*' and . _ - : = @ + , ~ %",
    )


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a validated pattern into a regex that must match a whole key."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def literal_prefix(pattern: str) -> str:
    """The part of ``pattern`` before its first ``*``: every match starts with it."""
    return pattern.split("*", 1)[0]


def full_key(namespace: str, component: str, key: str) -> str:
    """Join validated parts into the stored key ``{namespace}/{component}/{key}``."""
    return f"{namespace}/{component}/{key}"


def component_prefix(namespace: str, component: str) -> str:
    """The stored prefix of every key of one component, trailing ``/`` included."""
    return f"{namespace}/{component}/"


def namespace_prefix(namespace: str) -> str:
    """The stored prefix of every key of a namespace, trailing ``/`` included."""
    return f"{namespace}/"
