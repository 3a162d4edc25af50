"""The one wait loop of the etcd backend: read at revision R, watch from R + 1.

:func:`wait` reads (the caller's ``read``), and when the result is not there yet,
watches the view's range from the read's revision + 1 on the client's shared watch
stream, folding events into the view in the hub's reader thread: no polling, and no
event between the read and the watch is missed. A compacted watch (or a view that
asks for it with :data:`REREAD`) reads again. :class:`~etha.kvstore.etcd.EtcdKVStore`
and :class:`~etha.distributed.store.EthaStore` both wait through it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, cast

from etha.kvstore.errors import KVStoreError
from etha.kvstore.etcdv3.client import EtcdClient, prefix_range_end
from etha.kvstore.etcdv3.watch import PUT, WatchCompacted

T = TypeVar("T")


def show(value: bytes, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Reread:
    """What :meth:`View.apply` returns when the waiter must read again (see :func:`wait`)."""


#: The one :class:`Reread`.
REREAD = Reread()


class View(Generic[T]):
    """What a wait knows of its key range: loaded from a read, updated by events.

    ``apply`` runs in the watch hub's reader thread; it returns the wait's result, None
    (not yet), or :data:`REREAD` (read again, then watch again).
    """

    key: bytes
    range_end: bytes | None

    def fresh(self) -> View[T]:
        raise NotImplementedError

    def load(self, kvs: Iterable[Any]) -> T | None:
        raise NotImplementedError

    def apply(self, events: Iterable[Any]) -> T | Reread | None:
        raise NotImplementedError

    def seen(self) -> str:
        raise NotImplementedError


class KeyView(View[bytes]):
    """One key; done when it exists (``want`` None) or holds ``want``."""

    def __init__(self, key: bytes, want: bytes | None) -> None:
        self.key = key
        self.range_end = None
        self.want = want
        self.value: bytes | None = None

    def fresh(self) -> KeyView:
        return KeyView(self.key, self.want)

    def _check(self) -> bytes | None:
        value = self.value
        if value is None or (self.want is not None and value != self.want):
            return None
        return value

    def load(self, kvs: Iterable[Any]) -> bytes | None:
        for kv in kvs:
            self.value = kv.value
        return self._check()

    def apply(self, events: Iterable[Any]) -> bytes | None:
        for event in events:
            self.value = event.kv.value if event.type == PUT else None
            result = self._check()
            if result is not None:
                return result
        return None

    def seen(self) -> str:
        value = self.value
        return "the key does not exist" if value is None else f"last value {show(value)}"


class PatternView(View[list[str]]):
    """Keys under a prefix matching a pattern; done when ``count`` of them hold ``want``.

    The range read and the watch cover exactly the keys that start with the pattern's
    literal prefix, so a pattern with one ``*`` (``rank:*/ready``) matches a key when its
    bytes end with the literal suffix, and a pattern without ``*`` only the prefix
    itself: tested on the raw bytes, without decoding or a regex (keys are ASCII). Other
    patterns use the regex on the decoded relative key.
    """

    def __init__(
        self,
        prefix: bytes,
        strip: int,
        regex: re.Pattern[str],
        count: int,
        want: bytes,
        pattern: str,
    ) -> None:
        self.key = prefix
        self.range_end = prefix_range_end(prefix)
        self.strip = strip
        self.regex = regex
        self.pattern = pattern
        self.count = count
        self.want = want
        #: full keys (bytes) that hold ``want``
        self.matched: set[bytes] = set()
        parts = pattern.split("*")
        if len(parts) == 1:
            self.matches: Callable[[bytes], bool] = prefix.__eq__
        elif len(parts) == 2:
            suffix = parts[1].encode()
            shortest = len(prefix) + len(suffix)
            self.matches = lambda key: key.endswith(suffix) and len(key) >= shortest
        else:
            fullmatch = regex.fullmatch
            self.matches = lambda key: fullmatch(key[strip:].decode("utf-8", "replace")) is not None

    def fresh(self) -> PatternView:
        return PatternView(self.key, self.strip, self.regex, self.count, self.want, self.pattern)

    def _done(self) -> list[str] | None:
        if len(self.matched) < self.count:
            return None
        strip = self.strip
        return sorted(key[strip:].decode("utf-8", "replace") for key in self.matched)

    def load(self, kvs: Iterable[Any]) -> list[str] | None:
        matches, want, matched = self.matches, self.want, self.matched
        for kv in kvs:
            key = kv.key
            if matches(key) and kv.value == want:
                matched.add(key)
        return self._done()

    def apply(self, events: Iterable[Any]) -> list[str] | None:
        matches, want, matched = self.matches, self.want, self.matched
        for event in events:
            kv = event.kv
            key = kv.key
            if not matches(key):
                continue
            if event.type == PUT and kv.value == want:
                matched.add(key)
            else:
                matched.discard(key)
        return self._done()

    def seen(self) -> str:
        return f"{len(self.matched)} of {self.count} keys matched"


def wait(
    client: EtcdClient,
    read: Callable[[], tuple[T | None, View[T], int]],
    deadline: float,
    timed_out: Callable[[View[T], str | None], KVStoreError | Exception],
) -> T:
    """Wait for a result: ``read()``, then watch, until ``deadline`` (monotonic).

    :param read: reads the range and returns ``(result or None, the view loaded from
        the read, the read's revision)``; it is called again after a compaction or when
        the view's ``apply`` returns :data:`REREAD`
    :param timed_out: the error to raise when ``deadline`` passes, given the view and
        the watch stream's state (None when the time ran out right after a read)
    """
    while True:
        result, view, revision = read()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise timed_out(view, None)
        hub = client.watch_hub
        watcher = hub.watch(view.key, view.range_end, revision + 1, view.apply)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise timed_out(view, hub.describe())
                try:
                    outcome = watcher.get(remaining)
                except WatchCompacted:
                    break  # re-read at the current revision, then watch again
                if outcome is REREAD:
                    break
                if outcome is not None:
                    return cast(T, outcome)
        finally:
            watcher.cancel()


__all__ = ["REREAD", "KeyView", "PatternView", "Reread", "View", "show", "wait"]
