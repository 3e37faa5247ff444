"""Which request streams of one caller count against its bound (server._OpenStreams,
attack25): those holding a worker while waiting for their messages — silent, or sending a
message now and then — and not a busy stream, however long it runs (review25: the time a
stream had waited was summed over its life, so a stream busy 75 % of the time passed the
1 s grace after 4 s and counted as idle: a client running more than four long
AssignSessions streams had the newer ones cancelled). Real threads and iterators; the
context records its cancellation."""

from __future__ import annotations

import threading
import time

from services.common.server import _OpenStreams


class _Context:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def _run(streams: _OpenStreams, n: int, gap_s: float | None, work_s: float, run_s: float) -> list[bool]:
    """``n`` streams of one caller, each client sending its next message ``gap_s`` after the
    server took the last (None: never), the handler working ``work_s`` on each; which were
    cancelled after ``run_s``."""
    stop = threading.Event()
    contexts = [_Context() for _ in range(n)]

    def client(context):
        while not stop.wait(gap_s) and not context.cancelled.is_set():
            yield b"batch"

    def handler(context):
        for _ in streams.messages("svc:batch-scorer", client(context), context):
            if context.cancelled.is_set():
                return
            time.sleep(work_s)

    threads = [threading.Thread(target=handler, args=(c,), daemon=True) for c in contexts]
    for t in threads:
        t.start()
    time.sleep(run_s)
    stop.set()
    for t in threads:
        t.join(5)
    return [c.cancelled.is_set() for c in contexts]


def test_busy_streams_of_one_caller_are_not_cancelled_however_long_they_run():
    cancelled = _run(_OpenStreams(per_caller=2, grace_s=0.2), 4, gap_s=0.005, work_s=0.03, run_s=2.5)
    assert not any(cancelled), cancelled


def test_silent_and_trickling_streams_over_the_bound_are_cancelled():
    assert sum(_run(_OpenStreams(per_caller=2, grace_s=0.2), 4, gap_s=None, work_s=0.0, run_s=1.5)) == 2
    assert sum(_run(_OpenStreams(per_caller=2, grace_s=0.2), 4, gap_s=0.1, work_s=0.0, run_s=1.5)) == 2
