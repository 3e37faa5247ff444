"""A small bounded, aging map: key -> (value, when noted), read only while fresh.

What a service keeps to skip a read it made a moment ago ("this household held rows",
"the database said version 7"): a note is good for ``max_age_s`` after it was made (a read
past that answers as if it were never made), at most ``max_items`` are kept (noting one more
drops the oldest noted), and ``discard`` forgets one at once (an erasure: no id of an erased
household stays in memory for it). Noting a key again renews it.

Safe to share between threads (every RPC thread notes and reads): each call takes one lock.
Until session 29's review an unlocked OrderedDict of this shape raised KeyError / "mutated
during iteration" when two threads dropped the same oldest note (INTERNAL for that RPC).

Why not cachetools.TTLCache: it is not thread-safe, so every read would take a lock anyway
(a read reorders its LRU list); its bound drops the least recently *read* note, not the oldest
noted; and it does not tell a note's age, which ``ClusteringStore.confirm_model_versions``
needs (notes older than half their life are asked again). Neither is a dependency here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class AgingMap(Generic[K, V]):
    """key -> value noted within the last ``max_age_s`` (by ``clock``), at most ``max_items``."""

    def __init__(self, max_age_s: float, max_items: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_items < 1:
            raise ValueError("max_items: must be at least 1")
        self.max_age_s = max_age_s
        self.max_items = max_items
        self._clock = clock
        # key -> (value, when noted); oldest noted first (a note again moves it last).
        self._notes: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, key: K, value: V = None) -> None:  # type: ignore[assignment]
        self.note_many((key,), value)

    def note_many(self, keys: Iterable[K], value: V = None) -> None:  # type: ignore[assignment]
        """Note each of ``keys`` with ``value`` as of now, and drop the notes past their age
        (useless then) or past ``max_items`` (the oldest): none is kept longer than it serves."""
        with self._lock:
            now = self._clock()
            notes = self._notes
            for key in keys:
                notes[key] = (value, now)
                notes.move_to_end(key)
            self._drop_stale(now)

    def get(self, key: K) -> V | None:
        """The value noted for ``key`` if noted within ``max_age_s``, else None."""
        with self._lock:
            held = self._notes.get(key)
            now = self._clock()
        return held[0] if held is not None and now - held[1] < self.max_age_s else None

    def age(self, key: K) -> float | None:
        """Seconds since ``key`` was noted, None when it is not held or no longer fresh."""
        with self._lock:
            held = self._notes.get(key)
            now = self._clock()
        if held is None or now - held[1] >= self.max_age_s:
            return None
        return now - held[1]

    def __contains__(self, key: object) -> bool:
        return self.age(key) is not None  # type: ignore[arg-type]

    def missing(self, keys: Iterable[K]) -> list[K]:
        """Those of ``keys`` not held fresh, in the order given (one lock for them all)."""
        with self._lock:
            now = self._clock()
            self._drop_stale(now)
            notes = self._notes
            return [k for k in keys if k not in notes]

    def discard(self, key: K) -> None:
        with self._lock:
            self._notes.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._notes.clear()

    def __len__(self) -> int:
        """How many notes are held (stale ones not dropped yet included)."""
        with self._lock:
            return len(self._notes)

    def _drop_stale(self, now: float) -> None:
        """Under the lock: the oldest notes while past their age or past ``max_items``."""
        notes = self._notes
        while notes:
            _, at = next(iter(notes.values()))
            if now - at < self.max_age_s and len(notes) <= self.max_items:
                break
            notes.popitem(last=False)
