"""A thread that runs one blocking call (a wait) and records how it ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Waiter(threading.Thread):
    """Runs ``fn`` in a daemon thread; :attr:`result` or :attr:`error`, and :attr:`elapsed`."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None
        self.elapsed = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        self.elapsed = time.monotonic() - started


def wait_threads_gone(before: set[threading.Thread], grace: float = 5.0) -> list[str]:
    """Names of threads started since ``before`` that are still alive after ``grace`` s."""
    deadline = time.monotonic() + grace
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            return [t.name for t in extra]
        time.sleep(0.05)
