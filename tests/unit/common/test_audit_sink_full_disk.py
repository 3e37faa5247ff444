"""The audit client when neither the audit log nor its disk outbox can take records.

Session 23's chaos drill (docs/operations.md, "Chaos drills as operator and attacker"):
with the data directory's disk full, privacy's AppendAudit answered UNAVAILABLE (its log
on the full disk) and the sender's disk outbox (same volume) failed too, so the sink
dropped ~1,400 records as ``outbox_failed``; privacy's own sink (no outbox) dropped its
batch after ``max_attempts``. Now such records are kept in memory, in order, and
retried (bounded by the queue): a disk that fills and frees loses nothing.
"""

from __future__ import annotations

import sqlite3
import threading
import time

from services.common import audit
from services.common.audit import AuditSink, MemoryAuditTransport, TransientAuditError
from services.common.identity import Principal, Role

ALICE = Principal("alice", Role.ANALYST)


def _dropped(component: str, reason: str) -> float:
    return audit.DROPPED.labels(component, reason)._value.get()


def _held(component: str) -> float:
    return audit.HELD.labels(component)._value.get()


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


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


def _sink(transport, component, outbox=None, **kwargs) -> AuditSink:
    options = dict(max_delay_s=0.005, backoff_s=0.005, max_spool_backoff_s=0.02, max_attempts=2,
                   sleep=lambda s: None)
    options.update(kwargs)
    return AuditSink(transport, component=component, outbox=outbox, **options)


def test_a_log_that_cannot_take_records_keeps_them_in_memory_until_it_can():
    # privacy's own sink (no outbox) with its log's disk full: before, the batch was
    # dropped as send_failed after max_attempts.
    log = _Log()
    sink = _sink(log, "t-held-log")
    before = _dropped("t-held-log", "send_failed")
    try:
        for i in range(40):
            sink.record(audit.ASSIGN, f"household:a{i}", principal=ALICE)
        assert _wait_for(lambda: log.failures >= 6 and _held("t-held-log") > 0)
        for i in range(40, 60):   # recorded while the disk is full: queued behind
            sink.record(audit.ASSIGN, f"household:a{i}", principal=ALICE)
        assert sink.dropped == 0 and sink.pending == 60
        log.up.set()   # the disk frees
        assert sink.flush(10)
    finally:
        sink.close()
    assert [r.resource for r in log.records] == [f"household:a{i}" for i in range(60)]
    assert _dropped("t-held-log", "send_failed") == before and sink.dropped == 0
    assert _held("t-held-log") == 0


def test_records_neither_the_log_nor_the_outbox_takes_are_kept_and_delivered_in_order(tmp_path):
    # clustering's sink in the drill: AppendAudit UNAVAILABLE, its outbox on the same
    # full volume. Before: every batch dropped as outbox_failed.
    log = _Log()
    outbox = _FullDiskOutbox(tmp_path / "audit-outbox-t.db")
    sink = _sink(log, "t-held-outbox", outbox)
    before = _dropped("t-held-outbox", "outbox_failed")
    try:
        for i in range(100):
            sink.record(audit.INGEST, f"household:b{i}", principal=ALICE)
        assert _wait_for(lambda: outbox.put_failures >= 3)
        assert sink.dropped == 0 and sink.pending == 100
        outbox.full.clear()   # the disk frees; the log (privacy) still refuses
        assert sink.flush(10) and outbox.pending() == 100 and not log.records
        for i in range(100, 120):   # behind the spooled ones
            sink.record(audit.INGEST, f"household:b{i}", principal=ALICE)
        log.up.set()
        assert _wait_for(lambda: len(log.records) == 120)
    finally:
        sink.close()
    assert [r.resource for r in log.records] == [f"household:b{i}" for i in range(120)]
    assert _dropped("t-held-outbox", "outbox_failed") == before and sink.dropped == 0


def test_held_records_go_straight_to_the_log_when_it_returns_first(tmp_path):
    log = _Log()
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    sink = _sink(log, "t-held-direct", outbox)
    try:
        for i in range(30):
            sink.record(audit.INGEST, f"r{i}", principal=ALICE)
        assert _wait_for(lambda: outbox.put_failures >= 2)
        log.up.set()   # the log is back, the outbox's disk still full
        assert sink.flush(10)
    finally:
        sink.close()
    assert [r.resource for r in log.records] == [f"r{i}" for i in range(30)]
    assert outbox.pending() == 0 and sink.dropped == 0


def test_memory_is_bounded_by_the_queue_and_what_does_not_fit_is_counted(tmp_path):
    log = _Log()
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    sink = _sink(log, "t-held-bound", outbox, max_queue=20, max_batch=5)
    before = _dropped("t-held-bound", "queue_full")
    try:
        accepted = [sink.record(audit.INGEST, f"r{i}", principal=ALICE) for i in range(10)]
        assert _wait_for(lambda: outbox.put_failures >= 2)
        accepted += [sink.record(audit.INGEST, f"r{i}", principal=ALICE) for i in range(10, 60)]
        assert sink.pending <= 20 + 5
        refused = accepted.count(False)
        assert refused >= 60 - 25 and _dropped("t-held-bound", "queue_full") - before == refused
        outbox.full.clear()
        log.up.set()
        assert sink.flush(10)
    finally:
        sink.close()
    kept = [f"r{i}" for i, ok in enumerate(accepted) if ok]
    assert [r.resource for r in log.records] == kept   # every accepted record, in order
    assert sink.dropped == refused


def test_close_while_records_are_held_gives_them_a_last_try_then_counts_them(tmp_path):
    log = _Log()
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    sink = _sink(log, "t-held-close", outbox, max_spool_backoff_s=30.0, backoff_s=5.0)
    before = _dropped("t-held-close", "outbox_failed")
    for i in range(25):
        sink.record(audit.INGEST, f"r{i}", principal=ALICE)
    assert _wait_for(lambda: outbox.put_failures >= 1 and _held("t-held-close") > 0)
    started = time.monotonic()
    sink.close(timeout_s=5)   # a long backoff pending: close does not wait it out
    assert time.monotonic() - started < 3
    assert _dropped("t-held-close", "outbox_failed") - before == 25 and sink.dropped == 25


def test_an_outbox_that_fails_after_a_delivery_does_not_stop_the_sink(tmp_path):
    # The outbox's delete after a delivery failing (its disk full) used to raise out of
    # the sink's thread: every later record of the process stayed undelivered.
    log = _Log()
    outbox = _FullDiskOutbox(tmp_path / "o.db")
    outbox.full.clear()
    sink = _sink(log, "t-held-remove", outbox)
    try:
        for i in range(10):
            sink.record(audit.INGEST, f"r{i}", principal=ALICE)
        assert sink.flush(10) and outbox.pending() == 10
        outbox.fail_removes = 2
        log.up.set()
        assert _wait_for(lambda: outbox.pending() == 0)
        sink.record(audit.INGEST, "after", principal=ALICE)
        assert sink.flush(10)
    finally:
        sink.close()
    assert [r.resource for r in log.records] == [f"r{i}" for i in range(10)] + ["after"]
