"""A transaction a thread holds open while a test does something beside it: a writer frozen
inside its transaction (a hung peer, a SIGSTOPped replica), so the test can show what waits
for it and what does not."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def transaction_held_open(database: Any, statements: Callable[[Any], object],
                          hold_s: float = 30.0) -> Iterator[None]:
    """Run ``statements(tx)`` in a transaction of ``database`` on a thread of its own and keep
    that transaction open for the ``with`` block; on leaving it, let the transaction commit
    and wait for the thread. Raises what the statements raised, before the block runs."""
    held, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def holder() -> None:
        try:
            with database.transaction() as tx:
                statements(tx)
                held.set()
                release.wait(hold_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failed.append(exc)
            held.set()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        assert held.wait(10), "the held transaction did not open within 10 s"
        if failed:
            raise failed[0]
        yield
    finally:
        release.set()
        thread.join(hold_s)
    if failed:
        raise failed[0]


def answered_beside_a_held_write(database: Any, read: Callable[[], Any], wait_s: float = 10.0) -> Any:
    """``read()``'s answer, run on a thread while a write transaction of ``database`` is held
    open; AssertionError if it did not return within ``wait_s`` — it waited for the write, as
    a read in a write transaction (SQLite: ``BEGIN IMMEDIATE``) does (review28, review33)."""
    answers: list = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            answers.append(read())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failed.append(exc)

    with transaction_held_open(database, lambda tx: tx.execute("CREATE TABLE held_write (x INTEGER)")):
        reader = threading.Thread(target=run, daemon=True)
        reader.start()
        reader.join(wait_s)
        returned_while_held = not reader.is_alive()
    reader.join()
    if failed:
        raise failed[0]
    assert returned_while_held, "the read waited for the write transaction to end"
    return answers[0]
