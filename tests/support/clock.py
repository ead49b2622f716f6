"""A clock the test moves by hand, for the code's injectable ``clock=`` parameters."""

from __future__ import annotations

import threading


class FakeClock:
    """Returns ``now``; the test sets it or calls :meth:`advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
