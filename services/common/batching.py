"""Group commit: many callers' small writes become one transaction, and each caller is
answered only once its write is durable.

Used wherever a hot path must record something without paying a transaction per call
(the prediction log, the audit log): callers ``submit`` items and wait on the returned
future; a background thread drains the queue into batches of at most ``max_batch``
items, waiting at most ``max_delay_s`` for a batch to fill, and calls ``flush(items)``
once per batch. If ``flush`` raises, every future of that batch gets the exception, so
nothing is acknowledged that was not stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("hearth.batching")
_STOP = object()


class GroupCommitter(Generic[T]):
    def __init__(self, flush: Callable[[Sequence[T]], object], *, max_batch: int = 512,
                 max_delay_s: float = 0.002, name: str = "group-commit") -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, items: Sequence[T], weight: int | None = None) -> Future:
        """Queue items for the next batch; the future resolves to flush()'s result for
        the batch (or raises its exception). ``weight`` is what the submission counts
        towards ``max_batch`` (default ``len(items)``): a caller that submits one item
        standing for many records (a pre-built chunk) says how many."""
        if self._closed:
            raise RuntimeError("committer is closed")
        future: Future = Future()
        items = list(items)
        self._queue.put((items, future, len(items) if weight is None else weight))
        return future

    def write(self, items: Sequence[T], timeout_s: float = 10.0):
        """Submit and wait until durable."""
        return self.submit(items).result(timeout_s)

    def close(self) -> None:
        """Flush what is queued, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            pending = [first]
            count = first[2]
            deadline = time.monotonic() + self._max_delay
            while count < self._max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                pending.append(nxt)
                count += nxt[2]
            items = [item for batch, _, _ in pending for item in batch]
            try:
                result = self._flush(items)
            except BaseException as exc:  # noqa: BLE001 - hand the failure to every waiter
                log.warning("group commit of %d items failed: %s", len(items), exc)
                for _, future, _ in pending:
                    future.set_exception(exc)
            else:
                for _, future, _ in pending:
                    future.set_result(result)
