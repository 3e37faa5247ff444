"""The audit client when neither the audit log nor its disk outbox can take records.

Session 23's chaos drill (docs/operations.md, "Chaos drills as operator and attacker"):
with the data directory's disk full, privacy's AppendAudit answered UNAVAILABLE (its log
on the full disk) and the sender's disk outbox (same volume) failed too, so the sink
dropped ~1,400 records as ``outbox_failed``; privacy's own sink (no outbox) dropped its
batch after ``max_attempts``. Now such records are kept in memory, in order, and
retried (bounded by the queue): a disk that fills and frees loses nothing.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
import time

from services.common import audit
from services.common.audit import AuditSink, MemoryAuditTransport, TransientAuditError
from services.common.identity import Principal, Role
from tests.helpers.waiting import wait_for

ALICE = Principal("alice", Role.ANALYST)


def _dropped(component: str, reason: str) -> float:
    return audit.DROPPED.labels(component, reason)._value.get()


def _held(component: str) -> float:
    return audit.HELD.labels(component)._value.get()


# The sink's thread acts within milliseconds (its delays are 5-20 ms here): poll often.
_wait_for = functools.partial(wait_for, timeout_s=10.0, interval_s=0.01)


class _Log(MemoryAuditTransport):
    """An audit log that answers UNAVAILABLE (its disk full) until ``up`` is set, and
    appends a record_id once (as AppendAudit does)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = threading.Event()
        self.failures = 0

    def send(self, records):
        if not self.up.is_set():
            self.failures += 1
            raise TransientAuditError("database unavailable: database or disk is full")
        known = {r.record_id for r in self.records}
        super().send([r for r in records if r.record_id not in known])


class _FullDiskOutbox(audit.AuditOutbox):
    """A disk outbox on a volume that is full while ``full`` is set (SQLite's error)."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.full = threading.Event()
        self.full.set()
        self.put_failures = 0
        self.fail_removes = 0

    def put(self, records):
        if self.full.is_set():
            self.put_failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        super().put(records)

    def remove(self, keys):
        if self.fail_removes:
            self.fail_removes -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().remove(keys)


@contextlib.contextmanager
def _sink(component, outbox=None, **kwargs):
    """(the log, the sink): a sink of ``component`` with fast retries over a ``_Log`` (its
    disk full until ``log.up`` is set) and ``outbox``; closed after the block."""
    log = _Log()
    options = dict(max_delay_s=0.005, backoff_s=0.005, max_spool_backoff_s=0.02, max_attempts=2,
                   sleep=lambda s: None)
    options.update(kwargs)
    sink = AuditSink(log, component=component, outbox=outbox, **options)
    try:
        yield log, sink
    finally:
        sink.close()


def _record(sink, resources, action=audit.INGEST) -> list[bool]:
    return [sink.record(action, resource, principal=ALICE) for resource in resources]


def test_a_log_that_cannot_take_records_keeps_them_in_memory_until_it_can():
    # privacy's own sink (no outbox) with its log's disk full: before, the batch was
    # dropped as send_failed after max_attempts.
    before = _dropped("t-held-log", "send_failed")
    with _sink("t-held-log") as (log, sink):
        _record(sink, [f"household:a{i}" for i in range(40)], audit.ASSIGN)
        _wait_for(lambda: log.failures >= 6 and _held("t-held-log") > 0, what="failed sends and held records")
        _record(sink, [f"household:a{i}" for i in range(40, 60)], audit.ASSIGN)   # while the disk is full: queued behind
        assert sink.dropped == 0 and sink.pending == 60
        log.up.set()   # the disk frees
        assert sink.flush(10)
    assert [r.resource for r in log.records] == [f"household:a{i}" for i in range(60)]
    assert _dropped("t-held-log", "send_failed") == before and sink.dropped == 0
    assert _held("t-held-log") == 0


def test_records_neither_the_log_nor_the_outbox_takes_are_kept_and_delivered_in_order(tmp_path):
    # clustering's sink in the drill: AppendAudit UNAVAILABLE, its outbox on the same
    # full volume. Before: every batch dropped as outbox_failed.
    outbox = _FullDiskOutbox(tmp_path / "audit-outbox-t.db")
    before = _dropped("t-held-outbox", "outbox_failed")
    with _sink("t-held-outbox", outbox) as (log, sink):
        _record(sink, [f"household:b{i}" for i in range(100)])
        _wait_for(lambda: outbox.put_failures >= 3, what="3 failed spools")
        assert sink.dropped == 0 and sink.pending == 100
        outbox.full.clear()   # the disk frees; the log (privacy) still refuses
        assert sink.flush(10) and outbox.pending() == 100 and not log.records
        _record(sink, [f"household:b{i}" for i in range(100, 120)])   # behind the spooled ones
        log.up.set()
        _wait_for(lambda: len(log.records) == 120, what="120 records in the log")
    assert [r.resource for r in log.records] == [f"household:b{i}" for i in range(120)]
    assert _dropped("t-held-outbox", "outbox_failed") == before and sink.dropped == 0


def test_held_records_go_straight_to_the_log_when_it_returns_first(tmp_path):
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    with _sink("t-held-direct", outbox) as (log, sink):
        _record(sink, [f"r{i}" for i in range(30)])
        _wait_for(lambda: outbox.put_failures >= 2, what="2 failed spools")
        log.up.set()   # the log is back, the outbox's disk still full
        assert sink.flush(10)
    assert [r.resource for r in log.records] == [f"r{i}" for i in range(30)]
    assert outbox.pending() == 0 and sink.dropped == 0


def test_memory_is_bounded_by_the_queue_and_what_does_not_fit_is_counted(tmp_path):
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    before = _dropped("t-held-bound", "queue_full")
    with _sink("t-held-bound", outbox, max_queue=20, max_batch=5) as (log, sink):
        accepted = _record(sink, [f"r{i}" for i in range(10)])
        _wait_for(lambda: outbox.put_failures >= 2, what="2 failed spools")
        accepted += _record(sink, [f"r{i}" for i in range(10, 60)])
        assert sink.pending <= 20 + 5
        refused = accepted.count(False)
        assert refused >= 60 - 25 and _dropped("t-held-bound", "queue_full") - before == refused
        outbox.full.clear()
        log.up.set()
        assert sink.flush(10)
    kept = [f"r{i}" for i, ok in enumerate(accepted) if ok]
    assert [r.resource for r in log.records] == kept   # every accepted record, in order
    assert sink.dropped == refused


def test_close_while_records_are_held_gives_them_a_last_try_then_counts_them(tmp_path):
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    before = _dropped("t-held-close", "outbox_failed")
    with _sink("t-held-close", outbox, max_spool_backoff_s=30.0, backoff_s=5.0) as (_log, sink):
        _record(sink, [f"r{i}" for i in range(25)])
        _wait_for(lambda: outbox.put_failures >= 1 and _held("t-held-close") > 0, what="a failed spool, records held")
        started = time.monotonic()
        sink.close(timeout_s=5)   # a long backoff pending: close does not wait it out
        assert time.monotonic() - started < 3
    assert _dropped("t-held-close", "outbox_failed") - before == 25 and sink.dropped == 25


def test_an_outbox_that_fails_after_a_delivery_does_not_stop_the_sink(tmp_path):
    # The outbox's delete after a delivery failing (its disk full) used to raise out of
    # the sink's thread: every later record of the process stayed undelivered.
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    outbox.full.clear()
    with _sink("t-held-remove", outbox) as (log, sink):
        _record(sink, [f"r{i}" for i in range(10)])
        assert sink.flush(10) and outbox.pending() == 10
        outbox.fail_removes = 2
        log.up.set()
        _wait_for(lambda: outbox.pending() == 0, what="an empty outbox")
        _record(sink, ["after"])
        assert sink.flush(10)
    assert [r.resource for r in log.records] == [f"r{i}" for i in range(10)] + ["after"]


class _StuckOutbox(audit.AuditOutbox):
    """An outbox on a volume that fills after records were spooled: while ``full`` is set
    nothing is written, put or deleted (SQLite's "database or disk is full")."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.full = threading.Event()
        self.remove_through_calls = 0

    def put(self, records):
        if self.full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        super().put(records)

    def remove(self, keys):
        if self.full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        super().remove(keys)

    def remove_through(self, key):
        self.remove_through_calls += 1
        if self.full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        super().remove_through(key)


@contextlib.contextmanager
def _spooled_then_stuck(tmp_path, component, spooled: int):
    """(the log, the outbox, the sink): ``spooled`` records in the outbox while the log was
    down, then the outbox's volume full (``_StuckOutbox``) and the log back."""
    outbox = _StuckOutbox(tmp_path / f"{component}.db")
    with _sink(component, outbox, max_batch=8) as (log, sink):
        _record(sink, [f"household:s{i}" for i in range(spooled)])
        _wait_for(lambda: outbox.pending() == spooled, what=f"{spooled} records in the outbox")
        outbox.full.set()
        log.up.set()
        try:
            yield log, outbox, sink
        finally:
            outbox.full.clear()   # before the sink's close, which would wait on the full volume


def test_with_the_log_up_and_the_outbox_unable_to_delete_every_record_reaches_the_log_in_order(tmp_path):
    """review24: records spooled while the log was down, then the outbox's volume full
    (clustering's data directory filled by its own database) and the log back. The drain
    delivered the outbox's oldest batch but could not delete it, so it sent that batch
    again and again and never the ones behind it, and every new record went to the
    outbox (order) and was held in memory: nothing new reached the log while the volume
    stayed full (then ``queue_full``). Measured with a real file-size limit: 300 spooled
    + 40 new, none of the 40 delivered in 15 s. Now what was delivered is remembered:
    the drain goes on past it, and once the outbox holds nothing undelivered new records
    go straight to the log."""
    with _spooled_then_stuck(tmp_path, "t-stuck-outbox", 30) as (log, outbox, sink):
        _record(sink, [f"household:s{i}" for i in range(30, 40)])
        _wait_for(lambda: len(log.records) == 40, what="40 records in the log")
        assert [r.resource for r in log.records] == [f"household:s{i}" for i in range(40)]
        assert sink.dropped == 0
        outbox.full.clear()   # the volume frees: the delivered rows are deleted
        _wait_for(lambda: outbox.pending() == 0, what="an empty outbox")
        _record(sink, [f"household:s{i}" for i in range(40, 45)])
        assert sink.flush(10)
    assert [r.resource for r in log.records] == [f"household:s{i}" for i in range(45)]


def test_delivered_records_the_outbox_cannot_delete_do_not_spin_the_sink(tmp_path):
    """review24: with every spooled record delivered but none deletable, the drain has
    nothing to send; it backs off before trying the delete again instead of looping."""
    with _spooled_then_stuck(tmp_path, "t-stuck-spin", 10) as (log, outbox, sink):
        _wait_for(lambda: len(log.records) == 10, what="10 records in the log")
        time.sleep(0.5)
        assert outbox.remove_through_calls < 60, outbox.remove_through_calls   # backoff of 0.005 s doubling to 0.02 s: <= ~25 in 0.5 s
