"""A bounded, thread-safe least-recently-used cache.

Used for encoded chunk responses (bounded by bytes) and for the byte layout of TIFF files
(bounded by count). Keys always include the file's identity and modification time, so an
edited file is a new key and is never served stale; stale entries simply age out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    """At most ``capacity`` units of values, each weighing ``weigh(value)`` units.

    A value heavier than the whole capacity is not stored. ``hits`` and ``misses`` count
    lookups, for the metrics.
    """

    def __init__(self, capacity: int, weigh: Callable[[V], int] = lambda _: 1) -> None:
        self.capacity = capacity
        self._weigh = weigh
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        """The value stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``, evicting the least recently used entries to make room."""
        weight = self._weigh(value)
        if weight > self.capacity:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.weight -= old[1]
            self._entries[key] = (value, weight)
            self.weight += weight
            while self.weight > self.capacity:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.weight -= dropped

    def __len__(self) -> int:
        return len(self._entries)
