"""Group commit: many callers' small writes become one transaction, and each caller is
answered only once its write is durable.

Used wherever a hot path must record something without paying a transaction per call
(the prediction log, the audit log): callers ``submit`` items and wait on the returned
``Commit``; a background thread takes batches of at most ``max_batch`` items, waiting
at most ``max_delay_s`` for a batch to fill, and calls ``flush(items)`` once per batch.
If ``flush`` raises, every waiter of that batch gets the exception, so nothing is
acknowledged that was not stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("hearth.batching")


class Commit:
    """The outcome of one batch, shared by every submission in it: the waiters of a
    batch wait on one event that the writer sets once. (A ``Future`` per submission cost
    a Condition, a lock and a notify each, on every assign and audit append: the
    commit's own hand-offs were a tenth of the clustering service's Python CPU.)"""

    __slots__ = ("_done", "_result", "_error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: object = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None):
        """flush()'s result for the batch, or its exception; TimeoutError when the batch
        is not committed within ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"group commit not done within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def _settle(self, result: object = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()


class _Batch:
    __slots__ = ("items", "weight", "commit")

    def __init__(self) -> None:
        self.items: list = []
        self.weight = 0
        self.commit = Commit()


class GroupCommitter(Generic[T]):
    def __init__(self, flush: Callable[[Sequence[T]], object], *, max_batch: int = 512,
                 max_delay_s: float = 0.002, name: str = "group-commit") -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        # Batches being filled, oldest first: a submission joins the newest one unless it
        # is full. The writer is woken only when a batch opens or fills, not per item.
        self._batches: deque[_Batch] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T], weight: int | None = None) -> Commit:
        """Queue items for the next batch; the returned ``Commit`` resolves to flush()'s
        result for the batch (or raises its exception). ``weight`` is what the submission
        counts towards ``max_batch`` (default ``len(items)``): a caller that submits one
        item standing for many records (a pre-built chunk) says how many."""
        items = list(items)
        weight = len(items) if weight is None else weight
        with self._cond:
            if self._closed:
                raise RuntimeError("committer is closed")
            batches = self._batches
            if batches and batches[-1].weight < self._max_batch:
                batch = batches[-1]
                wake = False
            else:
                batch = _Batch()
                batches.append(batch)
                wake = True
            batch.items += items
            batch.weight += weight
            if wake or batch.weight >= self._max_batch:
                self._cond.notify()
            return batch.commit

    def write(self, items: Sequence[T], timeout_s: float = 10.0, weight: int | None = None):
        """Submit (``weight`` as in ``submit``) and wait until durable."""
        return self.submit(items, weight).result(timeout_s)

    def close(self) -> None:
        """Flush what is queued, then stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join(30)

    def _next_batch(self) -> _Batch | None:
        """The oldest batch once it is full or ``max_delay_s`` after the writer saw it
        (more submissions join it meanwhile); None when closed and nothing is left."""
        with self._cond:
            while not self._batches:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self._max_delay
            while (len(self._batches) == 1 and self._batches[0].weight < self._max_batch
                   and not self._closed):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._batches.popleft()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                result = self._flush(batch.items)
            except BaseException as exc:  # noqa: BLE001 - hand the failure to every waiter
                log.warning("group commit of %d items failed: %s", len(batch.items), exc)
                batch.commit._settle(error=exc)
            else:
                batch.commit._settle(result)
