"""Logging a background loop's failures without flooding the logs.

A background loop (clustering's model refresh, the population prior, feedback's periodic
steps, the deletion worker) runs again and again; during a database outage each pass
fails the same way. Until session 21 every failure logged a full traceback: clustering
wrote one per refreshed account for as long as the outage lasted. ``FailureLog`` logs
the first failure of a run with its traceback, then, while the same failure repeats, one
line every ``summary_every_s`` seconds with how many there were, and one line when the
loop succeeds again (``recovered``). A different failure (another exception type or
message) gets its own traceback. Every failure is still counted where the loop counts it.

Use::

    failures = FailureLog(log, "background model refresh")
    try:
        work()
    except Exception:
        failures.failed()          # inside the except block: the traceback is the current one
    else:
        failures.succeeded()
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# How often a failure that keeps repeating is summarised (one line).
SUMMARY_EVERY_S = 60.0

_NUMBERS = re.compile(r"\d+(\.\d+)?")


def failure_signature(exc: BaseException) -> str:
    """What makes two failures "the same": the exception's type and its message's first
    line with the numbers blanked (a timeout's seconds, a pool's counts, an id)."""
    first_line = (str(exc).splitlines() or [""])[0][:300]
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {_NUMBERS.sub('#', first_line)}"


@dataclass
class _Run:
    signature: str
    started: float
    last_summary: float
    total: int = 1
    since_summary: int = 0


class FailureLog:
    """One background loop's failures, logged as described above (thread-safe; ``key``
    separates independent steps of one loop, e.g. feedback's periodic steps)."""

    def __init__(self, logger: logging.Logger, what: str, summary_every_s: float = SUMMARY_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._what = what
        self._every = summary_every_s
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def _name(self, key: str) -> str:
        return f"{self._what} {key}".strip()

    def failed(self, exc: BaseException | None = None, key: str = "") -> None:
        """Record a failure (call it in the ``except`` block, or pass ``exc``)."""
        if exc is None:
            exc = sys.exc_info()[1]
        signature = failure_signature(exc) if exc is not None else "unknown"
        now = self._clock()
        summary = None
        with self._lock:
            run = self._runs.get(key)
            first = run is None or run.signature != signature
            if first:
                self._runs[key] = _Run(signature, now, now)
            else:
                run.total += 1
                run.since_summary += 1
                if now - run.last_summary >= self._every:
                    summary = (run.since_summary, now - run.last_summary, run.total, now - run.started)
                    run.since_summary, run.last_summary = 0, now
        if first:
            # The first of a run (or a new kind of failure): the whole traceback, once.
            self._log.error("%s failed (repeats are summarised every %.0f s)", self._name(key), self._every,
                            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
        elif summary is not None:
            n, over, total, since = summary
            self._log.error("%s still failing: %d more times in the last %.0f s (%d since %.0f s ago): %s",
                            self._name(key), n, over, total, since, signature)

    def succeeded(self, key: str = "") -> None:
        """Record a success: one line if it ends a run of failures."""
        if key not in self._runs:   # the common case, without the lock
            return
        with self._lock:
            run = self._runs.pop(key, None)
        if run is not None:
            self._log.warning("%s recovered after %d failures in %.0f s", self._name(key), run.total,
                              self._clock() - run.started)
