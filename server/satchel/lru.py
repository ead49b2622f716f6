"""A small thread-safe LRU map, bounded by its number of entries.

For per-process memory that must not grow with traffic: the session interface's key
rings and codecs, the monotonic guard's record of the lost marks it has reported.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class BoundedLRU:
    """At most ``size`` entries; the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _insert(self, key: Hashable, value: Any) -> Any:
        # Under the lock: the value kept (one another thread put first wins).
        value = self._data.setdefault(key, value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value for ``key``, made (outside the lock) if it is not there."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()  # outside the lock: making may be slow (HKDF, a dictionary)
        with self._lock:
            return self._insert(key, value)

    def add(self, key: Hashable) -> bool:
        """Remember ``key``; True if it was not there (as a set)."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return False
            self._insert(key, None)
            return True

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


__all__ = ["BoundedLRU"]
