"""Prototype (not library code): waits of one process share one read and one watch.

Measured by the barrier benchmark as kind ``etha-etcd-view`` next to ``etha-etcd``, to size a
proposed change of ``EtcdKVStore.wait_for_keys``: today every waiter reads the
whole prefix (one Range returning up to N keys), so N ranks cost O(N^2) key-values in
etcd and in the clients. Here the first waiter of a process on a prefix reads it once
and starts one watch that keeps a local copy of the prefix; later waiters of the same
process use that copy at once (it is at least as fresh as anything they could have read
before they arrived, and follows every later event). Matching is shared too: one set of
matching keys per (pattern, value), updated once per event, not once per waiter.

Left out on purpose (a library version needs them): compaction (re-read and re-watch),
watch errors (permission denied, stream lost beyond the timeout), component override.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from etha.kvstore import keys as _keys
from etha.kvstore.errors import KVTimeoutError

PUT = 0


class _Matcher:
    def __init__(self, regex: re.Pattern[str], want: bytes, strip: int) -> None:
        self.regex, self.want, self.strip = regex, want, strip
        self.matched: set[bytes] = set()
        #: waiters as (count, event): set once ``matched`` reaches count, so that one
        #: event wakes only the waiters it completes (no herd of notify_all)
        self.waiters: list[tuple[int, threading.Event]] = []

    def wake(self) -> None:
        if self.waiters:
            n = len(self.matched)
            still = []
            for count, ev in self.waiters:
                if n >= count:
                    ev.set()
                else:
                    still.append((count, ev))
            self.waiters = still

    def update(self, key: bytes, value: bytes | None) -> None:
        rel = key[self.strip :].decode("utf-8", "replace")
        if not self.regex.fullmatch(rel):
            return
        if value == self.want:
            self.matched.add(key)
        else:
            self.matched.discard(key)


class _View:
    """A local copy of ``[prefix, range_end)`` kept current by one watch."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.kvs: dict[bytes, bytes] = {}
        self.matchers: dict[tuple[str, bytes, int], _Matcher] = {}
        self.refs = 0
        self.loaded = threading.Event()
        self.watcher: Any = None

    def load(self, client: Any, prefix: bytes, range_end: bytes) -> None:
        resp = client.range(prefix, range_end)
        with self.cond:
            self.kvs = {bytes(kv.key): bytes(kv.value) for kv in resp.kvs}
        self.watcher = client.watch_hub.watch(
            prefix, range_end, resp.header.revision + 1, apply=self._apply
        )
        self.loaded.set()

    def _apply(self, events: Any) -> None:
        # runs in the watch hub's reader thread: short, and never "done"
        with self.cond:
            for ev in events:
                key = bytes(ev.kv.key)
                value = bytes(ev.kv.value) if ev.type == PUT else None
                if value is None:
                    self.kvs.pop(key, None)
                else:
                    self.kvs[key] = value
                for m in self.matchers.values():
                    m.update(key, value)
            for m in self.matchers.values():
                m.wake()

    def matcher(self, regex: re.Pattern[str], want: bytes, strip: int) -> _Matcher:
        """The shared matcher for (pattern, value); call with ``cond`` held."""
        key = (regex.pattern, want, strip)
        m = self.matchers.get(key)
        if m is None:
            m = self.matchers[key] = _Matcher(regex, want, strip)
            for k, v in self.kvs.items():
                m.update(k, v)
        return m


_lock = threading.Lock()
_views: dict[tuple[int, bytes, bytes], _View] = {}


def wait_for_keys(
    store: Any, pattern: str, count: int, value: str = "1", timeout: float = 60.0
) -> list[str]:
    """``store.wait_for_keys(pattern, count, value, timeout)`` over a shared view."""
    comp_prefix, regex = store._full_pattern(pattern, None)
    prefix = (comp_prefix + _keys.literal_prefix(pattern)).encode()
    from etha.kvstore.etcd_client import prefix_range_end

    range_end = prefix_range_end(prefix)
    client = store._client
    vkey = (id(client), prefix, range_end)
    with _lock:
        view = _views.get(vkey)
        creator = view is None
        if view is None:
            view = _views[vkey] = _View()
        view.refs += 1
    deadline = time.monotonic() + timeout
    try:
        if creator:
            view.load(client, prefix, range_end)
        elif not view.loaded.wait(timeout):
            raise KVTimeoutError(f"timed out waiting for the shared read of {prefix!r}")
        strip = len(comp_prefix.encode())
        done = threading.Event()
        with view.cond:
            m = view.matcher(regex, value.encode(), strip)
            if len(m.matched) >= count:
                return sorted(k[strip:].decode() for k in m.matched)
            m.waiters.append((count, done))
        if not done.wait(max(0.0, deadline - time.monotonic())):
            with view.cond:
                m.waiters = [w for w in m.waiters if w[1] is not done]
                raise KVTimeoutError(
                    f"timed out after {timeout}s: {len(m.matched)} of {count} keys matched"
                )
        with view.cond:
            return sorted(k[strip:].decode() for k in m.matched)
    finally:
        with _lock:
            view.refs -= 1
            if view.refs == 0:
                _views.pop(vkey, None)
                if view.watcher is not None:
                    view.watcher.cancel()
